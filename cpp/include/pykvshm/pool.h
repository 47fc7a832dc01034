// A process's handle on a pool: the mapping, its member slot, the block
// allocator, the prefix index and recovery.  One Pool object = one member.
//
// Thread safety: every method may be called from several threads of the same
// process at once (the shared structures are lock-free; the process-local pin
// table has a mutex).  close() may run while other threads are inside calls that
// hold a Pool::Call (the Python binding holds one around every call): later calls
// then fail with kClosed and close() waits for those in flight before it unmaps.
// A Pool object must not be used after fork(): the child opens the pool again.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "pykvshm/copy_engine.h"
#include "pykvshm/errors.h"
#include "pykvshm/host_lock.h"
#include "pykvshm/layout.h"
#include "pykvshm/mapping.h"
#include "pykvshm/shards.h"
#include "pykvshm/state.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

struct GeometryIn {
  uint32_t num_layers = 0, num_kv_heads = 0, head_dim = 0, block_tokens = 0;
  uint32_t dtype_code = 0, dtype_size = 0;
};

struct PoolOptions {
  MapOptions map;
  layout::Coherence coherence = layout::Coherence::kCoherent;
  bool block_checksums = false;  // create only
  uint32_t max_members = layout::kDefaultMaxMembers;  // create only: member slots (one is the spare)
  uint64_t host_id = 0;          // 0: derive from boot id + pid namespace
  uint64_t lease_ns = 10'000'000'000ull;  // members of other hosts are dead after this silence
  // Create only, noncoherent pools: lock shards (a power of two up to max_lock_shards();
  // 1 = one pool-wide lock; 0 = automatic: up to 8, fewer in small pools).  Coherent: 1.
  uint32_t lock_shards = 0;
  unsigned copy_threads = 1;                    // the copy engine's threads (process-local)
  CopyKernel copy_kernel = CopyKernel::kAuto;   // the copy engine's kernel (process-local)
};

struct Stats {
  uint64_t total = 0, free = 0, writing = 0, sealed = 0, evicting = 0, pinned = 0;
  uint64_t members = 0;
  std::array<uint64_t, layout::kCounterCount> counters{};
};

struct RecoveryReport {
  uint64_t members_recovered = 0;  // dead member slots this call reclaimed and freed
  uint64_t blocks_freed = 0;       // WRITING / EVICTING blocks they held
  uint64_t pins_dropped = 0;       // pins they held
};

struct LockStats {  // this handle's use of the noncoherent lock (all zero in a coherent pool)
  uint64_t acquisitions = 0;   // outermost acquisitions
  uint64_t takeovers = 0;      // acquisitions that took over from a dead process of this host
  uint64_t hosts_skipped = 0;  // times a host with a stale heartbeat was passed over
  uint32_t host_line = 0;      // this host's line in the lock table
  uint32_t lock_shards = 1;    // the pool's lock shards (1: one pool-wide lock)
  uint64_t shard_acquisitions = 0;  // outermost acquisitions of one lock shard alone
  uint64_t shard_takeovers = 0;     // lock shard words taken over from a dead or silent holder
  uint64_t unguarded_writes = 0;    // metadata lines written back without holding their lock (a bug if > 0)
};

struct MemberInfo {
  uint32_t slot;
  uint64_t status;
  uint32_t epoch;
  uint32_t pid;
  uint64_t host_id;
  uint64_t start_time;
  uint64_t heartbeat_ns;
  uint64_t attach_ns;
  bool self;
  bool alive;
};

// Size of the layout for a geometry and a byte budget (used by create and tests).
struct LayoutPlan {
  uint64_t num_blocks = 0, index_slots = 0, total_bytes = 0;
  uint32_t transfer_max_blocks = 0;
  uint32_t max_members = layout::kDefaultMaxMembers;
  layout::RegionDesc regions[layout::kRegionCount]{};
};
LayoutPlan plan_layout(const layout::Geometry& g, uint64_t capacity_bytes, uint64_t size_align,
                       uint32_t max_members = layout::kDefaultMaxMembers);
layout::Geometry make_geometry(const GeometryIn& in);  // throws kGeometry on an invalid geometry
uint32_t dtype_size_for_code(uint32_t code);           // 0 for an unknown code

// Validates a superblock image (the first bytes of a pool) against the size of
// its backing store.  Throws the matching Error; never writes anything.
void validate_superblock(const uint8_t* bytes, size_t n, uint64_t file_size, const std::string& name);
uint64_t superblock_checksum(const layout::Superblock* sb);

// The calls in flight on one handle, so that close() can wait for them instead
// of unmapping under them.  One word: a "shut" bit, a "final" bit (close() has
// committed) and the count of calls in flight.
class CallGate {
 public:
  void enter() {
    uint64_t w = word_.fetch_add(1, std::memory_order_acquire);
    if (w & kShut) {
      leave();
      raise(ErrorCode::kClosed, "the pool handle is closed (or being closed by another thread)");
    }
  }
  void leave() noexcept {
    uint64_t w = word_.fetch_sub(1, std::memory_order_release) - 1;
    if ((w & kCount) == 0 && (w & kShut)) word_.notify_all();
  }
  // Refuse new calls.  `final`: for good (close() itself); otherwise reopen() may undo it.
  void shut(bool final) noexcept { word_.fetch_or(final ? kShut | kFinal : kShut, std::memory_order_acq_rel); }
  void reopen() noexcept {
    uint64_t w = word_.load(std::memory_order_relaxed);
    while (!(w & kFinal) && !word_.compare_exchange_weak(w, w & ~kShut, std::memory_order_acq_rel)) {
    }
  }
  bool is_shut() const noexcept { return (word_.load(std::memory_order_acquire) & kShut) != 0; }
  void wait_idle() const noexcept {  // until no call is in flight (after shut)
    for (uint64_t w = word_.load(std::memory_order_acquire); w & kCount; w = word_.load(std::memory_order_acquire))
      word_.wait(w, std::memory_order_acquire);
  }

 private:
  static constexpr uint64_t kShut = 1ull << 63, kFinal = 1ull << 62, kCount = kFinal - 1;
  std::atomic<uint64_t> word_{0};
};

class Pool {
 public:
  // Held around a call by a caller that may race close() (see the note at the top).
  class Call {
   public:
    explicit Call(const Pool& p) : g_(p.calls_) { g_.enter(); }
    ~Call() { g_.leave(); }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;

   private:
    CallGate& g_;
  };

  static std::unique_ptr<Pool> create(const std::string& name, const GeometryIn& g, uint64_t capacity,
                                      const PoolOptions& opt);
  // With `expect`, a pool of another geometry is refused before anything is written.
  static std::unique_ptr<Pool> open(const std::string& name, const PoolOptions& opt,
                                    const GeometryIn* expect = nullptr);
  // A monitor: validates the superblock like open(), then maps the pool PROT_READ
  // from an O_RDONLY fd and takes no member slot (so a user with read permission
  // only can watch a pool).  stats(), members(), check(), transfer_info() and the
  // description work; everything that would change the pool raises kReadOnly.
  // Noncoherent pools: the monitor cannot take the pool lock, so it reads with
  // invalidation and what it sees is a best-effort snapshot.  `opt.map` must ask
  // for no placement.
  static std::unique_ptr<Pool> open_read_only(const std::string& name, const PoolOptions& opt,
                                              const GeometryIn* expect = nullptr);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Releases pins, aborts unfinished writes, frees the member slot, unmaps; first
  // refuses new calls and waits for the Calls in flight.  Idempotent.
  void close();
  bool closed() const { return calls_.is_shut(); }
  // Refuse new calls (closed() turns true) without closing yet; reopen_calls()
  // undoes it unless close() has begun.  Lets a caller check, without racing new
  // calls, whether it may close (the Python layer checks for live views).
  void shut_calls() noexcept { calls_.shut(false); }
  void reopen_calls() noexcept { calls_.reopen(); }
  bool read_only() const { return read_only_; }

  // ---- description ----
  const layout::Geometry& geometry() const { return geo_; }
  uint64_t num_blocks() const { return nblocks_; }
  uint64_t index_slots() const { return nslots_; }
  uint64_t total_bytes() const { return map_.size(); }
  uint64_t data_offset() const { return data_off_; }
  const std::string& path() const { return map_.path(); }
  const Mapping& mapping() const { return map_; }  // backend and placement
  layout::Coherence coherence() const { return coherence_; }
  uint32_t lock_shards() const { return shards_.shards; }
  bool block_checksums() const { return checksums_; }
  uint32_t max_members() const { return max_members_; }
  uint32_t member_slot() const { return slot_; }
  uint64_t host_id() const { return host_id_; }
  std::array<uint8_t, 16> uuid() const;
  uint8_t* base() const { return map_.base(); }
  uint64_t created_ns() const;

  // ---- allocator (handles are gen:32 | index:32) ----
  void alloc(size_t n, bool evict, uint64_t* out);          // all or nothing; throws kFull
  void free(const uint64_t* handles, size_t n);             // blocks this member allocated
  uint8_t* writable_block(uint64_t handle);                 // a WRITING block owned by this member
  uint8_t* block_data(uint64_t index) const { return map_.base() + data_off_ + index * geo_.block_stride; }

  // ---- prefix index ----
  size_t match(const uint8_t* keys, size_t n);              // leading keys present (sealed)
  // publish: src holds n blocks at src_stride bytes apart; returns blocks newly stored
  size_t publish(const uint8_t* keys, size_t n, const uint8_t* src, uint64_t src_stride);
  // acquire: pins the longest present prefix, writes its handles, returns its length
  size_t acquire(const uint8_t* keys, size_t n, uint64_t* out);
  void release(const uint64_t* handles, size_t n);
  // pin_victims (victims.cpp): pins up to n sealed, unpinned blocks whose CLOCK reference bit is
  // clear, from the clock hand on (the next eviction candidates; at most 64 n + 1024 blocks are
  // looked at), for a demoter to copy out; writes
  // their handles and 16-byte keys, returns how many.  Released with release().
  size_t pin_victims(size_t n, uint64_t* handles, uint8_t* keys);
  const uint8_t* pinned_block(uint64_t handle);             // a block this member has pinned
  void copy_out(const uint64_t* handles, size_t n, uint8_t* dst, uint64_t dst_stride);
  // Batched gather / scatter through the copy engine: span j copies bytes[j] between
  // block handles[j] at offsets[j] and the process address addrs[j].  read_spans needs
  // blocks this member has pinned, write_spans blocks it is writing (WRITING, its own);
  // every offset + size is checked against the block.  With a group the copy is
  // queued and the call returns at once (the caller keeps the blocks pinned / the
  // buffers alive until group->wait()); without, it copies before returning.
  void read_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* addrs, const uint64_t* bytes,
                  size_t n, const std::shared_ptr<CopyGroup>& group);
  void write_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* addrs, const uint64_t* bytes,
                   size_t n, const std::shared_ptr<CopyGroup>& group);
  CopyEngine& copy_engine();  // started on first use; drained by close()
  // reserve / commit / abort: the incremental writer path
  size_t reserve(const uint8_t* keys, size_t n, int64_t* positions, uint64_t* handles);
  void commit(const uint64_t* handles, size_t n);
  void abort_writes(const uint64_t* handles, size_t n);

  // ---- layer-wise transfers (transfer.cpp) ----
  struct TransferRef {
    uint32_t channel = 0;
    uint32_t epoch = 0;
  };
  struct TransferInfo {
    uint32_t num_blocks = 0, num_layers = 0, ready = 0;
    uint64_t status = 0;
    uint64_t cached = 0;  // blocks already in the pool when the transfer opened
  };
  // Producer: claim a channel for `n` block keys; cached keys are pinned, the rest allocated.
  TransferRef transfer_open(const uint8_t req_key[16], const uint8_t* keys, size_t n);
  // Producer: copy layer `layer` (== layers ready so far) of every non-cached block from src
  // (block j's layer at src + j * src_stride) and wake the consumers.
  // src == nullptr, or a source that already is the layer slot: the layer was written in
  // place (transfer_slots) and is only marked ready.
  void transfer_put_layer(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride);
  // The same on the copy engine: returns at once; the copy and then the layer-ready mark run
  // on the engine's thread in submission order.  Errors reach group->wait().  The caller keeps
  // src alive and waits for the group before finish / abort.
  void transfer_put_layer_async(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride,
                                const std::shared_ptr<CopyGroup>& group);
  // Layers [first, first+count) were written in place: mark them ready with one update and one wake.
  void transfer_mark_layers(TransferRef t, uint32_t first, uint32_t count);
  // Addresses of layer `layer`'s slot in each of the transfer's blocks: writable ones for the
  // producer (nullptr for cached blocks), read-only ones for a consumer (validate after reading).
  std::vector<uint8_t*> transfer_slots(TransferRef t, uint32_t layer, bool writable);
  // Consumer: after reading slots in place, check none of the blocks was reused meanwhile.
  void transfer_validate(TransferRef t, uint32_t layer);
  void transfer_finish(TransferRef t);   // seal into the prefix index, mark done
  void transfer_abort(TransferRef t);    // producer: free, mark aborted; consumer: flag abort
  // Consumer: find an open or finished transfer by request key or by (first key, count).
  TransferRef transfer_attach(const uint8_t req_key[16], const uint8_t* first_key, uint32_t n, uint64_t timeout_ns);
  TransferInfo transfer_info(TransferRef t) const;
  // Consumer: wait until layer `layer` is ready (or the transfer is done); throws kTimeout / kAborted / kGone.
  void transfer_wait(TransferRef t, uint32_t layer, uint64_t timeout_ns);
  // Consumer: copy layer `layer` of every block to dst + j * dst_stride, validated against reuse.
  void transfer_copy_layer(TransferRef t, uint32_t layer, uint8_t* dst, uint64_t dst_stride);
  uint32_t transfer_max_blocks() const { return transfer_max_; }

  // ---- maintenance ----
  RecoveryReport recover();
  Stats stats() const;
  struct IndexCensus {
    uint64_t empty = 0, tombstones = 0, live = 0, clearing = 0, other = 0;
  };
  IndexCensus index_census() const;  // slot kinds of the prefix index (tests, benchmarks)
  std::vector<MemberInfo> members() const;
  // Throws kCorrupt naming the first violation; with `checksums` (a pool created with block
  // checksums) also recomputes every sealed block's CRC and names the blocks that fail.
  void check(bool strict, bool checksums = false) const;
  void add_counter(layout::Counter c, uint64_t v);
  void heartbeat() noexcept;

  // Test hook: abandon the handle without running close() (as a crash would).
  void abandon() noexcept;
  // Test hook (noncoherent pools): take the pool lock and keep it, as a process
  // killed inside an operation would.
  void debug_hold_lock();
  LockStats lock_stats() const;

 private:
  Pool() = default;

  // Noncoherent mode: every access to shared metadata runs inside one of these
  // (the public entry points take it); coherent mode: it does nothing.  It nests.
  class Exclusive {
   public:
    explicit Exclusive(const Pool* p) : p_(p), held_(p->enter_exclusive()) {}
    ~Exclusive() {
      if (held_) p_->leave_exclusive();
    }
    Exclusive(const Exclusive&) = delete;
    Exclusive& operator=(const Exclusive&) = delete;

   private:
    const Pool* p_;
    bool held_;
  };
  bool enter_exclusive() const;
  void leave_exclusive() const noexcept;
  // Noncoherent pools with lock shards: the lock of block shard s < S, or (s == S,
  // shards_.index_lock()) the index's lock.  Holds nest: inside an Exclusive it does
  // nothing; a block shard, then the index lock, may be held together; anything else
  // out of that order throws.  In a pool with one lock it is an Exclusive.  Index reads
  // (lookup) need no lock: they are validated, and a pin re-checks under the block's.
  uint32_t index_lock_id() const { return shards_.index_lock(); }
  class ShardHold {
   public:
    ShardHold(const Pool* p, uint32_t s) : p_(p), s_(s) {
      if (p->sharded()) {
        held_ = p->enter_shard(s);
        shard_ = true;
      } else {
        held_ = p->enter_exclusive();
      }
    }
    ~ShardHold() {
      if (held_) shard_ ? p_->leave_shard(s_) : p_->leave_exclusive();
    }
    ShardHold(const ShardHold&) = delete;
    ShardHold& operator=(const ShardHold&) = delete;

   private:
    const Pool* p_;
    uint32_t s_;
    bool held_ = false, shard_ = false;
  };
  bool enter_shard(uint32_t s) const;
  void leave_shard(uint32_t s) const noexcept;
  bool sharded() const { return noncoherent() && shards_.shards > 1; }
  // The lock that guards the metadata line at p if this thread holds it, else nullptr.
  HostLock* guarding_lock(const void* p) const noexcept;
  int32_t line_shard(const void* p) const noexcept;  // -1: the pool-wide lock's (or not metadata)
  layout::ShardLock& shard_words(uint32_t s) const {
    return reinterpret_cast<layout::ShardTable*>(map_.base() + ctl_off_ + sizeof(layout::Control))->shards[s];
  }
  Atomic64& hint_word(uint32_t s) const;   // FREE-block hint of data shard s (the pool's, unsharded)
  void write_back_shard_words(uint32_t s) const noexcept;  // data shard s's free hint and CLOCK hand
  Atomic64& clock_word(uint32_t s) const;  // CLOCK hand of data shard s
  uint32_t home_shard() const noexcept { return shards_.shards > 1 ? slot_ % shards_.shards : 0; }
  size_t alloc_in_shard(uint32_t s, size_t want, bool evict, uint64_t* out, size_t have);
  bool shard_pass(uint32_t s, int pass) const;  // whether allocation pass 0 / 1 visits shard s
  [[noreturn]] void raise_full(size_t n, bool evict, const std::string& where);
  // Sharded versions of the hot entry points: one hold per shard the call touches.
  void alloc_sharded(size_t n, bool evict, uint64_t* out);
  void free_sharded(const uint64_t* handles, size_t n);
  size_t match_sharded(const uint8_t* keys, size_t n);
  size_t reserve_sharded(const uint8_t* keys, size_t n, int64_t* positions, uint64_t* handles);
  void commit_sharded(const uint64_t* handles, size_t n);
  void abort_sharded(const uint64_t* handles, size_t n);
  size_t acquire_sharded(const uint8_t* keys, size_t n, uint64_t* out);
  void release_sharded(const uint64_t* handles, size_t n);
  size_t acquire_finish(const uint8_t* keys, size_t n, uint64_t* out, size_t got);
  // Positions 0..n-1 grouped by shard (ascending), each group in its original order.
  std::vector<std::pair<uint32_t, std::vector<size_t>>> group_by_shard(const std::vector<uint32_t>& shard_of) const;
  std::vector<uint32_t> handle_shards(const uint64_t* handles, size_t n) const;  // each handle's block shard
  // Checks of a call whose blocks all lie in one shard (the usual case) run under that shard's
  // lock; otherwise (or with no blocks) nothing is held (`hold` stays empty).
  void hold_if_one_shard(const std::vector<uint32_t>& shard_of, std::optional<ShardHold>& hold) const;
  void write_back_metadata() const noexcept;  // after taking over from a dead holder of this host
  bool noncoherent() const { return coherence_ == layout::Coherence::kNoncoherent; }
  // Before a block we wrote changes hands: write its bytes back, so that dirty
  // lines in this host's cache cannot land later over the next owner's bytes.
  void write_back_block(uint64_t i) const noexcept {
    if (noncoherent()) visibility::flush_range(block_data(i), geo_.block_bytes);
  }
  // Invalidate before reading what another host may have written (noncoherent only).
  // Under the lock this is also the fence: it throws kMemberLost when this
  // handle no longer holds the lock (stopped past its lease and taken over), so
  // that the access that follows -- a read, or the write it precedes -- never happens.
  void fresh(const void* p, size_t n) const {
    if (noncoherent()) refresh(p, n);
  }
  void refresh(const void* p, size_t n) const;
  [[noreturn]] void lost_lock() const;
  // open() and open_read_only(): map and validate, copy the bounds from the superblock.
  static std::unique_ptr<Pool> map_validated(const std::string& name, const PoolOptions& opt, const GeometryIn* expect);
  void attach_member();
  bool claim_slot(uint32_t slot, uint64_t start_time);
  RecoveryReport do_recover();
  void ensure_usable();          // open, not forked, still a member
  void ensure_open() const;      // open and not forked (read-only operations)
  [[noreturn]] static void raise_read_only();
  bool still_member() const;     // our slot is still ALIVE with our epoch and pid
  bool member_dead(uint32_t slot, uint64_t ctl) const;
  // What leaving takes back from the members in `mask` (dead ones in recovery, this one in
  // close): their open transfers are aborted, their blocks being written or evicted freed,
  // their pins dropped.
  void release_members(const std::vector<bool>& mask, RecoveryReport& rep);
  // Pins (recovery.md, "Pins").  change_pins adds `delta` to block i's pin count with
  // the tag (slot, seq), first recording that the change the old tag names landed: in
  // its member's journal (coherent), or in its pin record (noncoherent: the record is
  // under the block's lock, the journal is not).
  void change_pins(uint64_t i, int delta, uint32_t slot, uint32_t seq);
  void help_landed(uint64_t block, uint64_t pins_word);
  void seal(uint64_t handle);          // commit's step for one checked block of ours (under its lock)
  void free_written(uint64_t handle);  // free's step for one checked block of ours (under its lock)
  void check_free(const uint64_t* handles, size_t n) const;  // free's checks: ours, WRITING, no double free
  // release's checks (caller holds pin_mu_); false: no longer a member, pins forgotten locally.
  bool check_release(const uint64_t* handles, size_t n);
  void note_lock_wait(const HostLock& l) const noexcept;  // counts kCtrLockWaits after a lock() that waited
  uint32_t next_pin_seq(uint32_t slot);  // the slot's journal sequence number after the last one
  // Recovery of slot s's pins (s dead and claimed by us, or s == slot_ leaving):
  // finish its journal entry, then release every record it holds.
  void resolve_pin_journal(uint32_t s);
  void release_pins_of(const std::vector<bool>& mask, RecoveryReport& rep);
  void unpin_record(uint32_t s, uint64_t pos, uint64_t rec);
  void retire_counters(uint32_t slot);
  void leave_pool();                    // close(): give everything back, free the slot  // fold a member's counters into the retired totals
  uint64_t scan_claim_free(uint32_t s, size_t want, uint64_t* out, size_t have);
  uint64_t scan_evict(uint32_t s, size_t want, uint64_t* out, size_t have);
  bool try_claim(uint64_t index, uint64_t* handle_out);
  bool try_evict(uint64_t index, uint64_t* handle_out);
  void release_claims(const uint64_t* handles, size_t n);

  struct Found {
    uint64_t pos = 0, index = 0;
    uint32_t gen = 0;
    uint64_t kind = 0;
  };
  enum class Insert { kInserted, kPresent, kFull };
  bool lookup(uint64_t k0, uint64_t k1, bool sealed_only, Found* f) const;
  // How many of the keys, from the first, are SEALED in the index (match's answer).
  // With `found`, also where each of them is (what acquire pins).
  size_t sealed_prefix(const uint8_t* keys, size_t n, std::vector<Found>* found = nullptr) const;
  // The positions of the keys not in the index in any state (reserve's work list; a hint
  // where it is read without a lock: insert() decides).
  std::vector<size_t> missing_keys(const uint8_t* keys, size_t n) const;
  // A claimed block's descriptor takes its key (checksum cleared), written back.
  void set_key(uint64_t index, uint64_t k0, uint64_t k1);
  Insert insert(uint64_t k0, uint64_t k1, uint64_t index, uint32_t gen);
  void remove_entry(uint64_t index, uint32_t gen);
  // A sealed block whose bytes failed their checksum: flag it, take it out of the index and free it
  // unless some member pins it (eviction reclaims it once unpinned).  Returns true when freed now.
  bool withdraw(uint64_t index, uint32_t gen);
  bool withdrawn(uint64_t index, uint64_t state_word) const;
  // Turns tombstones back into empty slots where no lookup needs to pass them:
  // the one at `pos` and the run just before it (index.md, "Reclaiming tombstones").
  void reclaim_tombstones(uint64_t pos);
  bool try_reclaim(uint64_t pos);
  // After an insert at my_pos: false when a slot between the key's home and
  // my_pos became empty (a concurrent reclaim), so the entry may be unreachable.
  bool reachable(uint64_t home, uint64_t my_pos);
  bool pin(uint64_t index, uint32_t gen, uint64_t k0, uint64_t k1);
  void unpin(uint64_t index);
  void check_handle_owned(uint64_t handle, uint64_t expect_kind, const char* what, bool freeing = false) const;
  void flush(const void* p, size_t n) const noexcept;

  layout::Superblock* sb() const { return reinterpret_cast<layout::Superblock*>(map_.base()); }
  // The accessors below invalidate the line they return in noncoherent mode, so
  // every read of shared metadata sees the device's copy.  The control page's
  // hot words are refreshed when the lock is taken (enter_exclusive).
  layout::Control* ctl() const { return reinterpret_cast<layout::Control*>(map_.base() + ctl_off_); }
  layout::MemberSlot* member(uint32_t i) const {
    auto* m = reinterpret_cast<layout::MemberSlot*>(map_.base() + members_off_) + i;
    fresh(m, 64);
    return m;
  }
  // This member's own slot, not refreshed: its counters are written only by this member, and
  // the lock code must not refresh (it would renew the lock it is taking or leaving).
  layout::MemberSlot* own_slot() const noexcept {
    return reinterpret_cast<layout::MemberSlot*>(map_.base() + members_off_) + slot_;
  }
  Atomic64& state(uint64_t i) const {
    auto* w = reinterpret_cast<Atomic64*>(map_.base() + states_off_) + i;
    fresh(w, 8);
    return *w;
  }
  layout::BlockDesc& desc(uint64_t i) const {
    auto* d = reinterpret_cast<layout::BlockDesc*>(map_.base() + desc_off_) + i;
    fresh(d, sizeof(layout::BlockDesc));
    return *d;
  }
  // Pin records per block shard (npins_ and the shard count are powers of two, npins_ >= 1024).
  uint64_t pins_per_shard() const noexcept { return npins_ / shards_.shards; }
  Atomic64& pin_record(uint64_t pos) const {
    auto* r = reinterpret_cast<Atomic64*>(map_.base() + pins_off_) + pos;
    fresh(r, 8);
    return *r;
  }
  Atomic64& entry(uint64_t pos) const {
    auto* e = reinterpret_cast<Atomic64*>(map_.base() + index_off_) + pos;
    fresh(e, 8);
    return *e;
  }
  layout::Channel& channel(uint32_t c) const {
    auto* ch = reinterpret_cast<layout::Channel*>(map_.base() + transfer_off_ + uint64_t(c) * (sizeof(layout::Channel) + 8ull * transfer_max_));
    fresh(ch, sizeof(layout::Channel));
    return *ch;
  }
  Atomic64* channel_handles(uint32_t c) const { return reinterpret_cast<Atomic64*>(&channel(c) + 1); }
  std::vector<CopySpan> put_layer_spans(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride,
                                        bool check_order);
  void mark_layer_put(TransferRef t, uint32_t layer, const CopySpan* spans, size_t n);
  // The channel's block handles, count and indices checked against the pool (invalidated first).
  std::vector<uint64_t> channel_handle_list(TransferRef t, layout::Channel& ch) const;
  // After reading a transfer's blocks without a lock: raise kGone / kAborted if any was reallocated.
  void check_not_reused(TransferRef t, layout::Channel& ch, const uint64_t* handles, uint32_t n,
                        const char* when) const;
  void check_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* bytes, size_t n) const;
  layout::Channel& owned_channel(TransferRef t, uint64_t status) const;
  layout::Channel& attached_channel(TransferRef t) const;
  void abort_channels_of(const std::vector<bool>& mask);
  void wake(Atomic32& word) const noexcept;

  mutable CallGate calls_;
  std::mutex close_mu_;
  Mapping map_;
  // Everything below is copied from the validated superblock at attach and never
  // re-read from shared memory, so a co-tenant scribbling on the superblock later
  // cannot move our bounds.
  layout::Geometry geo_{};
  uint64_t nblocks_ = 0, nslots_ = 0;
  uint64_t ctl_off_ = 0, members_off_ = 0, states_off_ = 0, desc_off_ = 0, index_off_ = 0, data_off_ = 0;
  uint64_t transfer_off_ = 0;
  uint64_t pins_off_ = 0, npins_ = 0;  // pin record region and its records (a power of two)
  uint32_t transfer_max_ = 0;
  layout::Coherence coherence_ = layout::Coherence::kCoherent;
  bool checksums_ = false;
  uint32_t max_members_ = 0;
  bool read_only_ = false;  // open_read_only(): PROT_READ, no member slot

  uint32_t slot_ = 0, epoch_ = 0;
  uint32_t pid_ = 0;
  uint64_t host_id_ = 0, lease_ns_ = 0;
  uint64_t fork_gen_ = 0;
  std::atomic<uint64_t> cursor_{0};  // allocation scan position (process-local, a hint)
  std::atomic<uint64_t> last_heartbeat_{0};

  // Noncoherent mode: the pool lock (one HostLock per handle) and the mutex that
  // serializes this handle's threads around it; depth counts nested Exclusives.
  mutable std::recursive_mutex lock_mu_;
  mutable uint32_t lock_depth_ = 0;
  mutable HostLock lock_;
  ShardMap shards_;
  std::unique_ptr<HostLock[]> shard_locks_;  // sharded pools: one per block shard, then the index's
  mutable int32_t held_shard_ = -1;          // the data shard held alone (-1: none)
  mutable uint32_t shard_depth_ = 0, index_depth_ = 0;
  mutable uint64_t shard_acquisitions_ = 0;
  mutable std::atomic<uint64_t> unguarded_writes_{0};
  // Set when this handle found it lost the lock inside an operation: it is no
  // longer a usable member (ensure_usable raises kMemberLost); close() still leaves.
  mutable std::atomic<bool> fenced_{false};

  unsigned copy_threads_ = 1;
  CopyKernel copy_kernel_ = CopyKernel::kAuto;
  std::mutex engine_mu_;
  std::unique_ptr<CopyEngine> engine_;

  mutable std::mutex pin_mu_;
  std::vector<uint32_t> pin_count_;  // this member's pins per block
  std::vector<uint32_t> pin_pos_;    // where this member's pin record of each pinned block is
  uint32_t pin_seq_ = 0;             // this member's last journal sequence number
};

// Liveness helpers (exposed for tests).
enum class ProcState { kAlive, kGone, kUnknown };  // kGone includes zombies
ProcState process_state(uint32_t pid, uint64_t* start_time);
uint64_t process_start_time(uint32_t pid);  // 0 when the process does not exist (or is a zombie)
uint64_t local_host_id();
bool proc_shows_own_pids();  // false in a PID namespace that kept another namespace's /proc
uint64_t realtime_ns();

}  // namespace pykvshm
