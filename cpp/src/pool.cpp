// Creating, attaching to and detaching from a pool; the member table.
#include "pykvshm/pool.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <thread>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>

#include "pykvshm/crc32c.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

using namespace layout;

namespace {

std::atomic<uint64_t> g_fork_gen{0};

// Noncoherent pools: the metadata lines this thread has invalidated during its
// current hold of a pool's lock.  While the lock is held no other host writes
// metadata, so each line needs invalidating once per hold, not once per read
// (an allocation scan reads 8 state words per line).  Tagged with the hold's
// number, so a new hold needs no clearing.
struct HeldLines {
  static constexpr size_t kSlots = 4096;  // power of two
  static constexpr uint32_t kProbe = 8;
  const Pool* pool = nullptr;
  uint32_t hold = 0;
  uintptr_t line[kSlots] = {};
  uint32_t tag[kSlots] = {};
  // True when `a` was not yet invalidated in this hold (and is now remembered,
  // unless its neighbourhood is full).
  bool first_time(uintptr_t a) noexcept {
    size_t h = size_t(word::mix64(a)) & (kSlots - 1);
    for (uint32_t d = 0; d < kProbe; ++d, h = (h + 1) & (kSlots - 1)) {
      if (tag[h] != hold) {
        tag[h] = hold;
        line[h] = a;
        return true;
      }
      if (line[h] == a) return false;
    }
    return true;
  }
};
thread_local HeldLines t_held;

// One light timer thread per process keeps the heartbeats of its open pools
// fresh while the process is idle (members of other hosts judge liveness by the
// heartbeat alone).  It sleeps between beats; no busy thread per pool.
class HeartbeatTimer {
 public:
  void add(Pool* p) {
    std::lock_guard<std::mutex> lk(mu_);
    pools_.push_back(p);
    if (!started_) {
      started_ = true;
      std::thread([this] { run(); }).detach();
    }
  }
  void remove(Pool* p) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = pools_.begin(); it != pools_.end(); ++it)
      if (*it == p) {
        pools_.erase(it);
        break;
      }
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait_for(lk, std::chrono::milliseconds(250));
      for (Pool* p : pools_) p->heartbeat();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Pool*> pools_;
  bool started_ = false;
};

// Leaked on purpose: the timer thread may outlive static destruction.
std::atomic<HeartbeatTimer*> g_timer{new HeartbeatTimer()};

void on_fork_child() {
  g_fork_gen.fetch_add(1, std::memory_order_relaxed);
  t_held.pool = nullptr;  // the child holds no pool lock
  // The child has no timer thread and the parent's mutex may be held: start afresh.
  g_timer.store(new HeartbeatTimer(), std::memory_order_relaxed);
}
const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, on_fork_child);
  return true;
}();

uint64_t fnv1a(const std::string& s, uint64_t h = 0xcbf29ce484222325ull) {
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

// A pool file whose superblock is not written yet: all zero so far (or empty), or
// the magic without a layout version.  Device DAX is left to validate_superblock.
bool unwritten(const std::vector<uint8_t>& head) {
  if (std::all_of(head.begin(), head.end(), [](uint8_t c) { return c == 0; })) return true;
  uint32_t version = 1;
  if (head.size() >= offsetof(Superblock, layout_version) + 4)
    std::memcpy(&version, head.data() + offsetof(Superblock, layout_version), 4);
  return head.size() >= sizeof kMagic && std::memcmp(head.data(), kMagic, sizeof kMagic) == 0 && version == 0;
}

}  // namespace

uint64_t realtime_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000ull + uint64_t(ts.tv_nsec);
}

ProcState process_state(uint32_t pid, uint64_t* start_time) {
  // Plain read(2): the process may exit while we read, and /proc then answers
  // ESRCH, which must mean "gone", never an exception.
  *start_time = 0;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT || errno == ESRCH ? ProcState::kGone : ProcState::kUnknown;
  char buf[1024];
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  int e = errno;
  ::close(fd);
  if (n <= 0) return n == 0 || e == ESRCH ? ProcState::kGone : ProcState::kUnknown;
  buf[n] = 0;
  const char* rp = std::strrchr(buf, ')');
  if (!rp) return ProcState::kUnknown;
  // Fields after the command name start at field 3 (state); starttime is field 22.
  // A zombie ('Z') or dead ('X') process can no longer touch the pool.
  const char* p = rp + 1;
  for (int field = 3; field <= 22; ++field) {
    while (*p == ' ') ++p;
    if (!*p) return ProcState::kUnknown;
    if (field == 3 && (*p == 'Z' || *p == 'X')) return ProcState::kGone;
    if (field == 22) {
      *start_time = std::strtoull(p, nullptr, 10);
      return ProcState::kAlive;
    }
    while (*p && *p != ' ') ++p;
  }
  return ProcState::kUnknown;
}

uint64_t process_start_time(uint32_t pid) {
  uint64_t st = 0;
  process_state(pid, &st);
  return st;
}

bool proc_shows_own_pids() {
  // /proc names processes by the pids of the namespace it was mounted for.  In a
  // PID namespace that kept its parent's /proc (unshare --pid without
  // --mount-proc), /proc/self is our pid *there*, not getpid().
  char buf[32];
  ssize_t n = ::readlink("/proc/self", buf, sizeof buf - 1);
  if (n <= 0) return false;
  buf[n] = 0;
  return std::strtoull(buf, nullptr, 10) == uint64_t(getpid());
}

uint64_t local_host_id() {
  // One host = one kernel boot and one PID namespace: a pid means something only
  // to processes that share both.
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string boot;
  std::getline(in, boot);
  struct stat st {};
  uint64_t ns = stat("/proc/self/ns/pid", &st) == 0 ? uint64_t(st.st_ino) : 0;
  uint64_t h = fnv1a(boot);
  h = fnv1a(std::to_string(ns), h);
  // When /proc cannot check our pids (it belongs to another PID namespace), no
  // process may judge us by pid: each such process is a "host" of its own, and
  // its liveness is its heartbeat (recovery.md).
  if (!proc_shows_own_pids()) {
    char self[32] = {};
    ssize_t n = ::readlink("/proc/self", self, sizeof self - 1);
    h = fnv1a("foreign-proc:" + std::to_string(getpid()) + ":" + std::string(self, n > 0 ? size_t(n) : 0), h);
  }
  return h ? h : 1;
}

std::unique_ptr<Pool> Pool::create(const std::string& name, const GeometryIn& gin, uint64_t capacity,
                                   const PoolOptions& opt) {
  Geometry g = make_geometry(gin);
  Backend b = Mapping::backend_for(name);
  uint64_t align = opt.map.huge_pages ? kDataAlign : kPageBytes;
  // Plan against the requested capacity first so an impossible request fails
  // before anything is created.
  if (b != Backend::kDevDax) plan_layout(g, capacity, align, opt.max_members);
  Mapping m = Mapping::create(name, capacity, opt.map);
  uint8_t* base = m.base();
  try {
    if (b == Backend::kDevDax) {
      auto sb = reinterpret_cast<const Superblock*>(base);
      if (std::memcmp(sb->magic, kMagic, sizeof kMagic) == 0)
        raise(ErrorCode::kExists, "device " + m.path() + " already holds a pykvshm pool; destroy it first");
    }
    LayoutPlan p{};
    try {
      p = plan_layout(g, m.size(), kPageBytes, opt.max_members);
    } catch (const Error& e) {
      if (b != Backend::kDevDax) throw;
      raise(e.code(), "device DAX " + m.path() + " (" + std::to_string(m.size()) + " bytes) is too small for this pool: " + e.what());
    }
    // Zero the metadata (a fresh tmpfs file is zero already; a device is not).
    std::memset(base, 0, p.regions[kRegionData].offset);
    auto sb = reinterpret_cast<Superblock*>(base);
    std::memcpy(sb->magic, kMagic, sizeof kMagic);
    sb->header_bytes = sizeof(Superblock);
    std::random_device rd;
    for (int i = 0; i < 16; i += 4) {
      uint32_t r = rd();
      std::memcpy(sb->uuid + i, &r, 4);
    }
    sb->uuid[6] = uint8_t((sb->uuid[6] & 0x0f) | 0x40);  // RFC 4122 version 4
    sb->uuid[8] = uint8_t((sb->uuid[8] & 0x3f) | 0x80);
    sb->total_bytes = m.size();
    sb->created_ns = realtime_ns();
    sb->creator_pid = uint32_t(getpid());
    sb->coherence = uint32_t(opt.coherence);
    sb->flags = opt.block_checksums ? kFlagBlockChecksums : 0;
    sb->max_members = p.max_members;
    sb->geometry = g;
    sb->num_blocks = p.num_blocks;
    sb->index_slots = p.index_slots;
    sb->index_probe_limit = kIndexProbeLimit;
    sb->transfer_max_blocks = p.transfer_max_blocks;
    std::memcpy(sb->regions, p.regions, sizeof p.regions);
    {
      const uint32_t most = opt.coherence == Coherence::kNoncoherent ? max_lock_shards(p.num_blocks) : 1;
      uint32_t shards = opt.lock_shards == 0 ? std::min(most, 8u) : opt.lock_shards;
      if ((shards & (shards - 1)) != 0 || shards > most)
        raise(ErrorCode::kPool, "lock_shards must be a power of two up to " + std::to_string(most) +
                                             " for this pool (" + std::to_string(p.num_blocks) + " blocks" +
                                             (opt.coherence == Coherence::kNoncoherent ? "" : ", coherent") + "), got " +
                                             std::to_string(shards));
      sb->lock_shards = shards;
    }
    sb->checksum = superblock_checksum(sb);
    auto control = reinterpret_cast<Control*>(base + p.regions[kRegionControl].offset);
    control->free_hint.value.store(p.num_blocks, std::memory_order_relaxed);
    if (sb->lock_shards > 1) {
      const ShardMap sm = ShardMap::make(sb->lock_shards, p.num_blocks, p.index_slots);
      auto* table = reinterpret_cast<ShardTable*>(base + p.regions[kRegionControl].offset + sizeof(Control));
      for (uint32_t s = 0; s < sm.shards; ++s)
        table->shards[s].free_hint.value.store(sm.block_end(s) - sm.block_begin(s), std::memory_order_relaxed);
    }
    if (opt.coherence == Coherence::kNoncoherent) visibility::flush_range(base, p.regions[kRegionData].offset);
    // SYNC POINT: superblock-publish.  Everything above happens-before any
    // process that reads a non-zero layout_version with acquire.
    sb->layout_version.store(kLayoutVersion, std::memory_order_release);
    if (opt.coherence == Coherence::kNoncoherent) visibility::flush_range(&sb->layout_version, 4);
  } catch (...) {
    std::string path = m.path();
    m.unmap();
    if (b != Backend::kDevDax) ::unlink(path.c_str());
    throw;
  }
  std::string path = m.path();
  m.unmap();
  try {
    PoolOptions mine = opt;
    mine.map.allow_group_write = true;  // the mode it was just asked to create (still refused: another owner)
    return open(name, mine);
  } catch (...) {
    // E.g. a mode that does not let the creator itself open the file again: a pool
    // nobody created successfully must not stay behind under the name.
    if (b != Backend::kDevDax) ::unlink(path.c_str());
    throw;
  }
}

std::unique_ptr<Pool> Pool::open(const std::string& name, const PoolOptions& opt, const GeometryIn* expect) {
  std::unique_ptr<Pool> p = map_validated(name, opt, expect);
  if (p->noncoherent()) {
    p->lock_.init(p->ctl(), p->host_id_, p->lease_ns_, p->pid_);
    if (p->sharded()) {
      p->shard_locks_.reset(new HostLock[p->shards_.shards + 1]);  // block shards, then the index lock
      for (uint32_t s = 0; s <= p->shards_.shards; ++s) {
        p->shard_locks_[s].init_shard(&p->lock_, p->shard_words(s).lines);
        // Waiting for lock s, this handle may hold the pool-wide lock and locks 0..s-1 (an
        // Exclusive), or one block shard (before the index lock): keep their holds renewed,
        // or it would fence itself.
        Pool* self = p.get();
        p->shard_locks_[s].set_keep_alive([self, s] {
          if (self->lock_depth_ > 0) {
            self->lock_.renew();
            for (uint32_t j = 0; j < s; ++j) self->shard_locks_[j].renew();
          } else if (self->held_shard_ >= 0 && uint32_t(self->held_shard_) < s) {
            self->shard_locks_[uint32_t(self->held_shard_)].renew();
          }
        });
      }
    }
    p->lock_.join();
  }
  p->attach_member();
  g_timer.load(std::memory_order_relaxed)->add(p.get());
  p->cursor_.store((p->nblocks_ / p->max_members_) * p->slot_, std::memory_order_relaxed);
  return p;
}

std::unique_ptr<Pool> Pool::open_read_only(const std::string& name, const PoolOptions& opt, const GeometryIn* expect) {
  PoolOptions ro = opt;
  ro.map.read_only = true;
  std::unique_ptr<Pool> p = map_validated(name, ro, expect);
  p->read_only_ = true;
  // The lock is never joined or taken; its host lines are only read, to judge the
  // liveness of other hosts' members (members(), check()).
  if (p->noncoherent()) p->lock_.init(p->ctl(), p->host_id_, p->lease_ns_, p->pid_);
  return p;
}

std::unique_ptr<Pool> Pool::map_validated(const std::string& name, const PoolOptions& opt, const GeometryIn* expect) {
  std::unique_ptr<Pool> p(new Pool());
  p->map_ = Mapping::open(name, opt.map);
  // Validate from a private copy before mapping anything writable.
  auto head = p->map_.read_prefix(sizeof(Superblock));
  if (p->map_.backend() != Backend::kDevDax && unwritten(head)) {
    // A creator holds its flock from creating the file to publishing the layout version.
    // Look twice: the file exists a moment before its creator locks it.
    bool creating = p->map_.creator_at_work();
    if (!creating) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      head = p->map_.read_prefix(sizeof(Superblock));
      creating = unwritten(head) && p->map_.creator_at_work();
    }
    if (creating)
      raise(ErrorCode::kInitializing, "pool '" + name + "' is still being created by another process; retry shortly "
                                      "(Pool.open_or_create waits for it)");
    if (unwritten(head)) {
      const uint64_t size = p->map_.file_size();
      const std::string what = size == 0 ? "is empty (truncated, or never written)"
                                         : head.empty() || head[0] == 0 ? "holds only zeros where the superblock belongs"
                                                                        : "has the pool magic but no layout version";
      raise(ErrorCode::kCorrupt, "pool '" + name + "' (" + p->map_.path() + ") " + what +
                                     ", and no process is creating it (a creator that died before finishing leaves "
                                     "this); remove it with `pykvshm destroy --force " + name + "` and create it again");
    }
  }
  validate_superblock(head.data(), head.size(), p->map_.file_size(), name);
  if (expect) {
    const Geometry& g = reinterpret_cast<const Superblock*>(head.data())->geometry;
    auto desc = [](uint32_t l, uint32_t h, uint32_t d, uint32_t t, uint32_t c) {
      static const char* kNames[] = {"?", "float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "float64"};
      return std::to_string(l) + " layers, " + std::to_string(h) + " kv heads, head_dim " + std::to_string(d) + ", " +
             std::to_string(t) + "-token blocks, " + (c < 9 ? kNames[c] : "dtype ?");
    };
    if (g.num_layers != expect->num_layers || g.num_kv_heads != expect->num_kv_heads || g.head_dim != expect->head_dim ||
        g.block_tokens != expect->block_tokens || g.dtype_code != expect->dtype_code)
      raise(ErrorCode::kGeometry, "pool '" + name + "' holds " + desc(g.num_layers, g.num_kv_heads, g.head_dim, g.block_tokens, g.dtype_code) +
                                      ", but the caller expects " +
                                      desc(expect->num_layers, expect->num_kv_heads, expect->head_dim, expect->block_tokens, expect->dtype_code));
  }
  p->map_.map(opt.map);
  // The superblock must not have changed between the read and the map.
  if (std::memcmp(head.data(), p->map_.base(), 8) != 0 ||
      std::memcmp(head.data() + 12, p->map_.base() + 12, sizeof(Superblock) - 12) != 0)
    raise(ErrorCode::kCorrupt, "pool '" + name + "' changed while it was being opened");
  auto sb = reinterpret_cast<const Superblock*>(head.data());
  p->geo_ = sb->geometry;
  p->nblocks_ = sb->num_blocks;
  p->nslots_ = sb->index_slots;
  p->ctl_off_ = sb->regions[kRegionControl].offset;
  p->members_off_ = sb->regions[kRegionMembers].offset;
  p->states_off_ = sb->regions[kRegionStates].offset;
  p->desc_off_ = sb->regions[kRegionDescriptors].offset;
  p->index_off_ = sb->regions[kRegionIndex].offset;
  p->data_off_ = sb->regions[kRegionData].offset;
  p->transfer_off_ = sb->regions[kRegionTransfer].offset;
  p->transfer_max_ = sb->transfer_max_blocks;
  p->pins_off_ = sb->regions[kRegionPins].offset;
  p->npins_ = sb->regions[kRegionPins].size / 8;
  p->shards_ = ShardMap::make(sb->lock_shards, sb->num_blocks, sb->index_slots);
  p->coherence_ = Coherence(sb->coherence);
  p->checksums_ = (sb->flags & kFlagBlockChecksums) != 0;
  p->max_members_ = sb->max_members;
  p->host_id_ = opt.host_id ? opt.host_id : local_host_id();
  p->lease_ns_ = opt.lease_ns;
  p->copy_threads_ = std::clamp(opt.copy_threads, 1u, 64u);
  p->copy_kernel_ = opt.copy_kernel;
  p->pid_ = uint32_t(getpid());
  p->fork_gen_ = g_fork_gen.load(std::memory_order_relaxed);
  p->pin_count_.assign(p->nblocks_, 0);
  p->pin_pos_.assign(p->nblocks_, 0);
  return p;
}

Pool::~Pool() {
  try {
    close();
  } catch (...) {
  }
}

std::array<uint8_t, 16> Pool::uuid() const {
  std::array<uint8_t, 16> u{};
  if (map_.base()) std::memcpy(u.data(), sb()->uuid, 16);
  return u;
}

uint64_t Pool::created_ns() const { return map_.base() ? sb()->created_ns : 0; }

void Pool::ensure_usable() {
  if (!map_.base()) raise(ErrorCode::kClosed, "the pool handle is closed");
  if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_)
    raise(ErrorCode::kForked, "this pool handle was opened before fork(); open the pool again in the child process");
  if (read_only_) raise_read_only();
  if (fenced_.load(std::memory_order_relaxed)) lost_lock();
  if (!still_member())
    raise(ErrorCode::kMemberLost, "this pool handle was declared dead by another member (heartbeat lease expired) and "
                                  "its blocks and pins were reclaimed; open the pool again");
}

void Pool::ensure_open() const {
  if (!map_.base()) raise(ErrorCode::kClosed, "the pool handle is closed");
  if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_)
    raise(ErrorCode::kForked, "this pool handle was opened before fork(); open the pool again in the child process");
}

void Pool::raise_read_only() {
  raise(ErrorCode::kReadOnly, "this pool handle is read-only (a monitor): it can read stats, members and check the "
                              "pool, but not change it; open the pool without read_only to use it");
}

bool Pool::still_member() const {
  return member(slot_)->ctl.load(std::memory_order_acquire) == word::member(kMemberAlive, epoch_, pid_);
}

bool Pool::enter_exclusive() const {
  // A read-only handle never takes the lock (it could not write its line): its
  // reads run outside it, each one invalidating first (refresh()).
  if (read_only_ || !noncoherent() || !map_.base() || g_fork_gen.load(std::memory_order_relaxed) != fork_gen_) return false;
  lock_mu_.lock();
  if (held_shard_ >= 0 || index_depth_ > 0) {
    // A thread holding a lock shard may not take the pool-wide lock (it comes first
    // in the lock order): a bug in pykvshm, reported rather than deadlocked.
    lock_mu_.unlock();
    raise(ErrorCode::kCorrupt, "internal error: the pool-wide noncoherent lock was asked for while holding a lock shard");
  }
  if (lock_depth_++ == 0) {
    uint32_t taken = 0;
    bool pool_wide = false;
    try {
      lock_.forget_silent();
      if (lock_.lock()) write_back_metadata();
      note_lock_wait(lock_);
      pool_wide = true;
      // Then every data shard, in ascending order (the lock order).
      for (; sharded() && taken <= shards_.shards; ++taken) {
        if (shard_locks_[taken].lock()) write_back_metadata();
        note_lock_wait(shard_locks_[taken]);
      }
    } catch (...) {
      while (taken > 0) shard_locks_[--taken].unlock();
      if (pool_wide) lock_.unlock();
      --lock_depth_;
      lock_mu_.unlock();
      throw;
    }
    t_held.pool = this;
    if (++t_held.hold == 0) {  // the tags wrapped: forget them all
      std::fill(std::begin(t_held.tag), std::end(t_held.tag), 0u);
      t_held.hold = 1;
    }
    // The control page's hot words may have been written by another host.
    Control* c = ctl();
    visibility::invalidate_range(&c->free_hint, 64);
    visibility::invalidate_range(&c->clock_hand, 64);
    visibility::invalidate_range(&c->channel_event, 64);
    visibility::invalidate_range(c->retired, sizeof c->retired);
  }
  return true;
}

void Pool::note_lock_wait(const HostLock& l) const noexcept {
  // Counted in our own slot (its line is ours; written back as we leave the lock); not
  // before the slot is ours (attach) nor in a read-only handle (it takes no lock).
  if (!l.waited() || read_only_ || epoch_ == 0 || !map_.base()) return;
  own_slot()->counters[kCtrLockWaits].fetch_add(1, std::memory_order_relaxed);
}

void Pool::leave_exclusive() const noexcept {
  if (--lock_depth_ == 0 && map_.base()) {
    bool lost = !lock_.renew();
    for (uint32_t s = 0; sharded() && s <= shards_.shards; ++s) lost = !shard_locks_[s].renew() || lost;
    if (lost) {
      // A holder that lost the lock writes nothing back: what it wrote before it
      // noticed is older than what the new holder writes.
      fenced_.store(true, std::memory_order_relaxed);
    } else {
      // Write back what this operation may have changed on the control page and in
      // our own counters (the other lines are written back where they are written).
      Control* c = ctl();
      visibility::flush_range(&c->free_hint, 64);
      visibility::flush_range(&c->clock_hand, 64);
      visibility::flush_range(&c->channel_event, 64);
      visibility::flush_range(c->retired, sizeof c->retired);
      visibility::flush_range(own_slot()->counters, sizeof own_slot()->counters);
      for (uint32_t s = 0; sharded() && s < shards_.shards; ++s) write_back_shard_words(s);
    }
    t_held.pool = nullptr;
    for (uint32_t s = sharded() ? shards_.shards + 1 : 0; s > 0; --s) shard_locks_[s - 1].unlock();
    lock_.unlock();  // each only if its `local` is still ours (then the line is ours to clear)
  }
  lock_mu_.unlock();
}

void Pool::write_back_shard_words(uint32_t s) const noexcept {
  visibility::flush_range(&shard_words(s).free_hint, 64);
  visibility::flush_range(&shard_words(s).clock_hand, 64);
}

bool Pool::enter_shard(uint32_t s) const {
  if (read_only_ || !noncoherent() || !map_.base() || g_fork_gen.load(std::memory_order_relaxed) != fork_gen_) return false;
  lock_mu_.lock();
  if (lock_depth_ > 0) {  // inside an Exclusive: every lock is held already
    lock_mu_.unlock();
    return false;
  }
  const bool index = s == shards_.index_lock();
  if (index ? index_depth_ > 0 : held_shard_ == int32_t(s)) {
    ++(index ? index_depth_ : shard_depth_);
    return true;
  }
  // Lock order: one block shard, then the index lock; never a block shard after the
  // index lock, nor a second block shard.
  if (!index && (held_shard_ >= 0 || index_depth_ > 0)) {
    lock_mu_.unlock();
    raise(ErrorCode::kCorrupt, "internal error: lock shard " + std::to_string(s) + " was asked for out of order");
  }
  const bool first = held_shard_ < 0 && index_depth_ == 0;
  try {
    if (first) lock_.forget_silent();
    if (shard_locks_[s].lock()) write_back_metadata();
    note_lock_wait(shard_locks_[s]);
  } catch (...) {
    lock_mu_.unlock();
    throw;
  }
  (index ? index_depth_ : shard_depth_) = 1;
  if (!index) held_shard_ = int32_t(s);
  ++shard_acquisitions_;
  t_held.pool = this;
  if (++t_held.hold == 0) {
    std::fill(std::begin(t_held.tag), std::end(t_held.tag), 0u);
    t_held.hold = 1;
  }
  return true;
}

void Pool::leave_shard(uint32_t s) const noexcept {
  const bool index = s == shards_.index_lock();
  if (--(index ? index_depth_ : shard_depth_) == 0) {
    HostLock& l = shard_locks_[s];
    if (map_.base() && !l.renew()) {
      // As in leave_exclusive: a holder that lost the lock writes nothing back.
      fenced_.store(true, std::memory_order_relaxed);
    } else if (map_.base()) {
      if (!index) write_back_shard_words(s);
      visibility::flush_range(own_slot()->counters, sizeof own_slot()->counters);
    }
    if (!index) held_shard_ = -1;
    if (held_shard_ < 0 && index_depth_ == 0) t_held.pool = nullptr;
    if (map_.base()) l.unlock();
  }
  lock_mu_.unlock();
}

int32_t Pool::line_shard(const void* p) const noexcept {
  if (!sharded()) return -1;
  const uint64_t o = uint64_t(reinterpret_cast<const uint8_t*>(p) - map_.base());
  if (o >= states_off_ && o < desc_off_) return int32_t(shards_.block_shard((o - states_off_) / 8));
  if (o >= desc_off_ && o < index_off_) return int32_t(shards_.block_shard((o - desc_off_) / sizeof(BlockDesc)));
  if (o >= index_off_ && o < index_off_ + nslots_ * 8) return int32_t(shards_.index_lock());
  // Pin records: block shard s's blocks keep theirs in the s-th equal part of the region.
  if (o >= pins_off_ && o < pins_off_ + npins_ * 8) return int32_t((o - pins_off_) / 8 / pins_per_shard());
  const uint64_t t = ctl_off_ + sizeof(Control);
  if (o >= t && o < t + uint64_t(shards_.shards) * sizeof(ShardLock)) return int32_t((o - t) / sizeof(ShardLock));
  return -1;
}

HostLock* Pool::guarding_lock(const void* p) const noexcept {
  if (t_held.pool != this) return nullptr;
  const int32_t s = line_shard(p);
  if (lock_depth_ > 0) return s < 0 ? &lock_ : &shard_locks_[uint32_t(s)];
  if (s >= 0 && (s == held_shard_ || (uint32_t(s) == shards_.index_lock() && index_depth_ > 0)))
    return &shard_locks_[uint32_t(s)];
  // This member's own slot (its pin journal): written only by this member, and by a recoverer
  // only once the member is judged dead, so the lock this thread holds fences the writes.
  const auto* slot = reinterpret_cast<const uint8_t*>(own_slot());  // no refresh here
  const auto* q = reinterpret_cast<const uint8_t*>(p);
  if (s < 0 && q >= slot && q < slot + sizeof(MemberSlot)) {
    if (held_shard_ >= 0) return &shard_locks_[uint32_t(held_shard_)];
    if (index_depth_ > 0) return &shard_locks_[shards_.index_lock()];
  }
  return nullptr;
}

Atomic64& Pool::hint_word(uint32_t s) const {
  if (!sharded()) return ctl()->free_hint.value;  // invalidated on entry, written back on exit
  Atomic64& w = shard_words(s).free_hint.value;
  fresh(&w, 8);
  return w;
}

Atomic64& Pool::clock_word(uint32_t s) const {
  if (!sharded()) return ctl()->clock_hand.value;
  Atomic64& w = shard_words(s).clock_hand.value;
  fresh(&w, 8);
  return w;
}

void Pool::refresh(const void* p, size_t n) const {
  if (t_held.pool != this) {  // outside the lock: every read invalidates
    visibility::invalidate_range(p, n);
    return;
  }
  // The fence: before every access under the lock, check it is still ours.
  HostLock* guard = guarding_lock(p);
  if (!guard) {  // a line this thread's holds do not guard: read it as outside the lock
    visibility::invalidate_range(p, n);
    return;
  }
  if (!guard->renew()) lost_lock();
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    if (t_held.first_time(a)) visibility::invalidate_range(reinterpret_cast<const void*>(a), 64);
}

void Pool::lost_lock() const {
  fenced_.store(true, std::memory_order_relaxed);
  raise(ErrorCode::kMemberLost,
        "this pool handle lost the noncoherent pool lock: its process was stopped or stalled for longer than the "
        "lock lease (" + std::to_string(lock_.lease_ns() / 1'000'000) +
            " ms) inside an operation, so the lock may have passed to another process; the operation stopped before "
            "its next write. Close this handle and open the pool again");
}

void Pool::write_back_metadata() const noexcept {
  // A process of this host died holding the lock: its stores may still sit
  // dirty in this host's cache.  Write every metadata line back now, before any
  // other host reads them, so they cannot land later over newer writes.
  visibility::flush_range(map_.base() + ctl_off_, data_off_ - ctl_off_);
}

void Pool::debug_hold_lock() {
  if (!noncoherent()) raise(ErrorCode::kInvalidHandle, "debug_hold_lock: the pool is coherent and has no lock");
  ensure_open();
  if (read_only_) raise_read_only();
  (void)enter_exclusive();  // never left
}

LockStats Pool::lock_stats() const {
  LockStats st;
  if (!noncoherent()) return st;
  std::lock_guard<std::recursive_mutex> lk(lock_mu_);
  st.acquisitions = lock_.acquisitions();
  st.takeovers = lock_.takeovers();
  st.hosts_skipped = lock_.hosts_skipped();
  st.host_line = lock_.line();
  st.lock_shards = shards_.shards;
  for (uint32_t s = 0; sharded() && s <= shards_.shards; ++s) {
    st.shard_takeovers += shard_locks_[s].takeovers();
    st.hosts_skipped += shard_locks_[s].hosts_skipped();
  }
  st.shard_acquisitions = shard_acquisitions_;
  st.unguarded_writes = unguarded_writes_.load(std::memory_order_relaxed);
  return st;
}

void Pool::heartbeat() noexcept {
  if (!map_.base() || read_only_) return;
  uint64_t now = realtime_ns();
  uint64_t last = last_heartbeat_.load(std::memory_order_relaxed);
  if (noncoherent()) {
    if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_) return;
    lock_.beat();  // the host's liveness, on its own line: no lock needed
    if (now - last < 100'000'000ull && now >= last) return;
    // The member's heartbeat shares a line with its control word, which a
    // recoverer may write: under the lock.  If another thread of this handle is
    // inside an operation, it beats there.
    std::unique_lock<std::recursive_mutex> lk(lock_mu_, std::try_to_lock);
    if (!lk.owns_lock()) return;
    try {
      Exclusive ex(this);
      if (!still_member()) return;
      last_heartbeat_.store(now, std::memory_order_relaxed);
      member(slot_)->heartbeat_ns.store(now, std::memory_order_release);
      flush(member(slot_), 64);
    } catch (...) {
    }
    return;
  }
  if (!still_member()) return;  // never beat for a slot that is no longer ours
  if (now - last < 100'000'000ull && now >= last) return;
  last_heartbeat_.store(now, std::memory_order_relaxed);
  member(slot_)->heartbeat_ns.store(now, std::memory_order_release);
}

// Counters live on lines only their member writes (a recoverer only after the
// member is dead); in noncoherent mode they are written back when the lock is left.
void Pool::add_counter(Counter c, uint64_t v) {
  if (v && map_.base() && !read_only_) member(slot_)->counters[c].fetch_add(v, std::memory_order_relaxed);
}

void Pool::flush(const void* p, size_t n) const noexcept {
  if (coherence_ != Coherence::kNoncoherent) return;
  // Every metadata write must happen under the lock that guards its line (rule 1 of
  // coherence.md); counted so that tests catch a path that breaks it.
  if (!guarding_lock(p)) unguarded_writes_.fetch_add(1, std::memory_order_relaxed);
  visibility::flush_range(p, n);
}

bool Pool::claim_slot(uint32_t i, uint64_t start_time) {
  MemberSlot* m = member(i);
  uint64_t c = m->ctl.load(std::memory_order_acquire);
  if (word::member_status(c) != kMemberFree) return false;
  uint32_t epoch = word::member_epoch(c) + 1;
  uint32_t now_s = uint32_t(realtime_ns() / 1'000'000'000ull);
  uint64_t claiming = word::member(kMemberClaiming, epoch, now_s);
  if (!m->ctl.cas(c, claiming, std::memory_order_acq_rel)) return false;
  // The slot is ours; describe ourselves, then become ALIVE.
  m->start_time.store(start_time, std::memory_order_relaxed);
  m->host_id.store(host_id_, std::memory_order_relaxed);
  uint64_t now = realtime_ns();
  m->heartbeat_ns.store(now, std::memory_order_relaxed);
  m->attach_ns.store(now, std::memory_order_relaxed);
  for (auto& ctr : m->counters) ctr.store(0, std::memory_order_relaxed);
  flush(m, sizeof(MemberSlot));
  // SYNC POINT: member-alive.  Identity fields happen-before ALIVE.
  uint64_t expect = claiming;
  if (!m->ctl.cas(expect, word::member(kMemberAlive, epoch, pid_), std::memory_order_release)) return false;
  flush(&m->ctl, 8);
  slot_ = i;
  epoch_ = epoch;
  // The slot's journal sequence goes on from its last occupant's (never reused, so a
  // stale tag in a descriptor never names one of our operations).
  pin_seq_ = word::journal_seq(m->pin_op.load(std::memory_order_acquire));
  last_heartbeat_.store(now, std::memory_order_relaxed);
  return true;
}

void Pool::attach_member() {
  // Recovery needs an identity (a live member slot) so that exactly one process
  // recovers each dead member; so attach first, then recover.  The last slot is
  // kept for a process that finds every other slot taken: it attaches there,
  // recovers the dead, leaves, and tries again.
  Exclusive ex(this);
  uint64_t start = process_start_time(pid_);
  const uint32_t spare = max_members_ - 1;
  for (int attempt = 0; attempt < 3; ++attempt) {
    for (uint32_t i = 0; i < spare; ++i) {
      if (claim_slot(i, start)) {
        do_recover();
        return;
      }
    }
    if (!claim_slot(spare, start)) break;
    RecoveryReport r = do_recover();
    uint64_t c = word::member(kMemberAlive, epoch_, pid_);
    member(spare)->ctl.cas(c, word::member(kMemberFree, epoch_, 0), std::memory_order_release);
    flush(&member(spare)->ctl, 8);
    slot_ = 0;
    epoch_ = 0;
    if (r.members_recovered == 0) break;
  }
  raise(ErrorCode::kMembersFull, "all " + std::to_string(spare) +
                                     " member slots of the pool are held by live processes; close some pool handles");
}

bool Pool::member_dead(uint32_t s, uint64_t c) const {
  if (!read_only_ && s == slot_ && map_.base() && word::member_epoch(c) == epoch_ && word::member_status(c) == kMemberAlive) return false;
  const MemberSlot* m = member(s);
  uint64_t now = realtime_ns();
  switch (word::member_status(c)) {
    case kMemberAlive: {
      uint64_t host = m->host_id.load(std::memory_order_acquire);
      if (host == host_id_) {
        uint32_t pid = word::member_payload(c);
        if (pid == 0) return true;
        if (::kill(pid_t(pid), 0) != 0 && errno == ESRCH) return true;
        uint64_t now_st = 0;
        ProcState ps = process_state(pid, &now_st);
        if (ps == ProcState::kGone) return true;     // exited meanwhile, or a zombie
        if (ps == ProcState::kUnknown) return false;  // /proc hides it (hidepid): the pid exists, trust that
        uint64_t st = m->start_time.load(std::memory_order_relaxed);
        if (st != 0 && now_st != st) return true;     // pid reused by another process
        return false;
      }
      uint64_t hb = m->heartbeat_ns.load(std::memory_order_acquire);
      if (!(now > hb && now - hb > lease_ns_)) return false;
      // Noncoherent pools: a member of a host that still beats its lock line is
      // left to that host's own processes (they check its pid, and only they can
      // write back what it left dirty in their cache).  Its own beat may be late
      // because it waited long for the lock.
      return !(noncoherent() && lock_.host_beating(host));
    }
    case kMemberRecovering: {
      uint32_t r = word::recoverer_slot(word::member_payload(c));
      if (r >= max_members_) return true;
      uint64_t rc = member(r)->ctl.load(std::memory_order_acquire);
      if (word::member_status(rc) != kMemberAlive) return true;
      if ((word::member_epoch(rc) & 0xffffu) != word::recoverer_epoch(word::member_payload(c))) return true;
      if (r == slot_) return false;
      return member_dead(r, rc);
    }
    case kMemberClaiming: {
      uint64_t now_s = now / 1'000'000'000ull;
      uint32_t t = word::member_payload(c);
      uint64_t limit_s = std::max<uint64_t>(10, lease_ns_ / 1'000'000'000ull);
      return uint32_t(now_s) - t > limit_s && uint32_t(now_s) - t < (1u << 31);
    }
    default:
      return false;
  }
}

RecoveryReport Pool::recover() {
  Exclusive ex(this);
  ensure_usable();
  return do_recover();
}

RecoveryReport Pool::do_recover() {
  RecoveryReport rep;
  std::vector<uint32_t> mine;
  const uint32_t me = word::recoverer(slot_, epoch_);
  for (uint32_t s = 0; s < max_members_; ++s) {
    MemberSlot* m = member(s);
    uint64_t c = m->ctl.load(std::memory_order_acquire);
    uint64_t st = word::member_status(c);
    if (st == kMemberFree) continue;
    if (s == slot_ && word::member_epoch(c) == epoch_) continue;
    if (!member_dead(s, c)) continue;
    if (st == kMemberClaiming) {
      // A process that died while attaching holds nothing yet.
      if (m->ctl.cas(c, word::member(kMemberFree, word::member_epoch(c), 0), std::memory_order_acq_rel)) {
        flush(&m->ctl, 8);
        ++rep.members_recovered;
      }
      continue;
    }
    // SYNC POINT: recovery-claim.  Exactly one live process moves the slot to
    // RECOVERING(by me); a dead recoverer's claim is taken over the same way.
    uint64_t claimed = word::member(kMemberRecovering, word::member_epoch(c), me);
    if (m->ctl.cas(c, claimed, std::memory_order_acq_rel)) {
      flush(&m->ctl, 8);
      mine.push_back(s);
    }
  }
  if (mine.empty()) return rep;
  std::vector<bool> mask(max_members_, false);
  for (uint32_t s : mine) mask[s] = true;
  release_members(mask, rep);
  for (uint32_t s : mine) {
    MemberSlot* m = member(s);
    retire_counters(s);
    uint64_t c = m->ctl.load(std::memory_order_acquire);
    if (word::member_status(c) == kMemberRecovering && word::member_payload(c) == me) {
      // SYNC POINT: recovery-done.  Reclaimed blocks happen-before the slot is reusable.
      if (m->ctl.cas(c, word::member(kMemberFree, word::member_epoch(c), 0), std::memory_order_release)) {
        flush(&m->ctl, 8);
        ++rep.members_recovered;
        ctl()->retired[kCtrRecovered].fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
  return rep;
}

void Pool::release_members(const std::vector<bool>& mask, RecoveryReport& rep) {
  abort_channels_of(mask);  // first: consumers waiting on a gone producer get an error, not a hang
  // One pass over the blocks for every member in `mask`.  Each step is
  // idempotent, so a recoverer that dies here leaves work the next one redoes.
  for (uint64_t i = 0; i < nblocks_; ++i) {
    Atomic64& sw = state(i);
    for (int tries = 0; tries < 64; ++tries) {
      uint64_t s = sw.load(std::memory_order_acquire);
      uint64_t k = word::kind(s);
      if (k != kWriting && k != kEvicting) break;
      uint64_t o = word::owner(s);
      if (o >= max_members_ || !mask[o]) break;
      remove_entry(i, word::gen(s));
      write_back_block(i);  // a dead writer of this host may have left them dirty in our cache
      if (sw.cas(s, word::state(word::gen(s), kFree, 0), std::memory_order_acq_rel)) {
        flush(&sw, 8);
        hint_word(shards_.block_shard(i)).fetch_add(1, std::memory_order_relaxed);
        ++rep.blocks_freed;
        break;
      }
    }
  }
  release_pins_of(mask, rep);
}

void Pool::retire_counters(uint32_t s) {
  MemberSlot* m = member(s);
  fresh(m->counters, sizeof m->counters);
  for (uint32_t c = 0; c < kCounterCount; ++c) {
    uint64_t v = m->counters[c].exchange(0, std::memory_order_relaxed);
    if (v) ctl()->retired[c].fetch_add(v, std::memory_order_relaxed);
  }
  flush(m->counters, sizeof m->counters);
}

void Pool::close() {
  calls_.shut(true);
  calls_.wait_idle();
  std::lock_guard<std::mutex> lk(close_mu_);
  if (!map_.base()) return;
  {
    // Queued copies write into (and read from) the mapping: let them finish first.
    std::unique_ptr<CopyEngine> engine;
    {
      std::lock_guard<std::mutex> elk(engine_mu_);
      engine = std::move(engine_);
    }
    if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_)
      (void)engine.release();  // a forked child: the engine's threads exist in the parent only
    else
      engine.reset();
  }
  g_timer.load(std::memory_order_relaxed)->remove(this);
  if (!read_only_ && g_fork_gen.load(std::memory_order_relaxed) == fork_gen_) {
    try {
      Exclusive ex(this);
      leave_pool();
    } catch (...) {
      // Only the noncoherent lock can fail here (this host lost its lock line):
      // leave without touching shared memory; recovery reclaims the slot.
    }
  }
  // A forked child touches nothing shared: the parent still owns the member slot.
  map_.unmap();
}

void Pool::leave_pool() {
  // A handle declared dead: its slot was recovered and may be someone else's now.
  if (!still_member()) return;
  // Leaving is what recovery does for a dead member, done by the member itself.
  std::vector<bool> mine(max_members_, false);
  mine[slot_] = true;
  RecoveryReport ignored;
  release_members(mine, ignored);
  {
    std::lock_guard<std::mutex> lk(pin_mu_);
    std::fill(pin_count_.begin(), pin_count_.end(), 0u);
  }
  retire_counters(slot_);
  MemberSlot* m = member(slot_);
  uint64_t c = word::member(kMemberAlive, epoch_, pid_);
  m->ctl.cas(c, word::member(kMemberFree, epoch_, 0), std::memory_order_release);
  flush(&m->ctl, 8);
}

void Pool::abandon() noexcept {
  // Drop the mapping and forget the slot, as if the process had died here
  // (queued copies are finished first: they write into the mapping).
  calls_.shut(true);
  calls_.wait_idle();
  std::lock_guard<std::mutex> lk(close_mu_);
  g_timer.load(std::memory_order_relaxed)->remove(this);
  {
    std::lock_guard<std::mutex> elk(engine_mu_);
    if (g_fork_gen.load(std::memory_order_relaxed) != fork_gen_)
      (void)engine_.release();  // a forked child: the engine's threads exist in the parent only
    else
      engine_.reset();
  }
  map_.unmap();
}

std::vector<MemberInfo> Pool::members() const {
  std::vector<MemberInfo> out;
  Exclusive ex(this);
  ensure_open();
  for (uint32_t s = 0; s < max_members_; ++s) {
    const MemberSlot* m = member(s);
    uint64_t c = m->ctl.load(std::memory_order_acquire);
    if (word::member_status(c) == kMemberFree) continue;
    MemberInfo mi{};
    mi.slot = s;
    mi.status = word::member_status(c);
    mi.epoch = word::member_epoch(c);
    mi.pid = mi.status == kMemberAlive ? word::member_payload(c) : 0;
    mi.host_id = m->host_id.load(std::memory_order_relaxed);
    mi.start_time = m->start_time.load(std::memory_order_relaxed);
    mi.heartbeat_ns = m->heartbeat_ns.load(std::memory_order_relaxed);
    mi.attach_ns = m->attach_ns.load(std::memory_order_relaxed);
    mi.self = !read_only_ && s == slot_ && mi.epoch == epoch_;
    mi.alive = !member_dead(s, c);
    out.push_back(mi);
  }
  return out;
}

Stats Pool::stats() const {
  Exclusive ex(this);
  ensure_open();
  Stats st;
  st.total = nblocks_;
  for (uint64_t i = 0; i < nblocks_; ++i) {
    uint64_t s = state(i).load(std::memory_order_relaxed);
    switch (word::kind(s)) {
      case kFree: ++st.free; break;
      case kWriting: ++st.writing; break;
      case kSealed: ++st.sealed; break;
      case kEvicting: ++st.evicting; break;
      default: break;
    }
    if (word::pins_count(desc(i).pins.load(std::memory_order_relaxed))) ++st.pinned;
  }
  for (uint32_t c = 0; c < kCounterCount; ++c) st.counters[c] = ctl()->retired[c].load(std::memory_order_relaxed);
  for (uint32_t s = 0; s < max_members_; ++s) {
    const MemberSlot* m = member(s);
    uint64_t c = m->ctl.load(std::memory_order_acquire);
    if (word::member_status(c) == kMemberFree) continue;
    if (word::member_status(c) == kMemberAlive) ++st.members;
    fresh(m->counters, sizeof m->counters);
    for (uint32_t k = 0; k < kCounterCount; ++k) st.counters[k] += m->counters[k].load(std::memory_order_relaxed);
  }
  return st;
}

}  // namespace pykvshm
