// On-media layout of a pykvshm pool, layout version 4.
//
// Everything here is addressed by byte offset from the start of the mapping or by
// block index; nothing stores a pointer.  docs/design/layout.md draws the picture;
// tests/test_layout.py and cpp/tests/test_layout.cpp pin every size and offset, so
// a change here without a version bump fails CI with "bump the layout version".
//
//   0        Superblock            (4 KiB page, read-mostly, checksummed)
//   4 KiB    Control               (4 KiB: hot shared counters, one per 128-byte pair of lines),
//            then the ShardTable   (noncoherent lock shards: kMaxLockShards x 2304 B)
//   then     Member table          (max_members x 256 B, sized at creation)
//   ...      Block states          (num_blocks x 8 B, dense so allocation scans are cheap)
//   ...      Block descriptors     (num_blocks x 64 B: pin count, key, checksum)
//   ...      Prefix index          (index_slots x 8 B, open addressing)
//   ...      Transfer channels     (kTransferChannels x (128 B + transfer_max_blocks x 8 B))
//   ...      Pin records           (pin_records_for(num_blocks, max_members) x 8 B: who pins what)
//   ...      Data                  (2 MiB aligned; num_blocks x block_stride)
#pragma once

#include <cstddef>
#include <cstdint>

#include "pykvshm/atomic.h"

namespace pykvshm::layout {

inline constexpr char kMagic[8] = {'P', 'Y', 'K', 'V', 'S', 'H', 'M', '\0'};
// 2: HostLine hold_ns / hold_lease_ns (holder lease).  3: member table sized at creation
// (max_members), pin count + pin records + pin journal instead of pin masks.  4: lock shards
// (Superblock::lock_shards, the shard lock table after the control page, pin records per shard).
inline constexpr uint32_t kLayoutVersion = 4;
inline constexpr uint64_t kPageBytes = 4096;
inline constexpr uint64_t kDataAlign = 2ull << 20;  // 2 MiB: huge pages, device DAX, DMA
inline constexpr uint64_t kBlockAlign = 64;         // every block starts on a cache line
inline constexpr uint32_t kDefaultMaxMembers = 4096;  // member slots (attached pool handles + 1 spare) unless asked otherwise
inline constexpr uint32_t kMinMembers = 2;            // one member and the spare
inline constexpr uint32_t kMaxMembersLimit = 65535;   // slots (and pin counts) are 16-bit in pin, recoverer and channel words
inline constexpr uint32_t kIndexProbeLimit = 64;    // bounded probing, never an unbounded loop
inline constexpr uint64_t kMaxBlocks = (1ull << 28) - 1;  // index entries hold a 28-bit index
inline constexpr uint32_t kTransferChannels = 128;  // layer-wise transfers open (or recently finished) at once
inline constexpr uint32_t kTransferMaxBlocksCap = 4096;  // blocks of one transfer (fewer in small pools)

enum class Coherence : uint32_t { kCoherent = 0, kNoncoherent = 1 };
inline constexpr uint32_t kFlagBlockChecksums = 1u << 0;

enum Region : uint32_t {
  kRegionControl = 0,
  kRegionMembers = 1,
  kRegionStates = 2,
  kRegionDescriptors = 3,
  kRegionIndex = 4,
  kRegionTransfer = 5,  // layer-wise transfer channels
  kRegionData = 6,
  kRegionPins = 7,      // pin records (placed before the data; the enum value only names the slot)
  kRegionCount = 8,
};

struct RegionDesc {
  uint64_t offset;
  uint64_t size;
};
static_assert(sizeof(RegionDesc) == 16);

struct Geometry {
  uint32_t num_layers;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t block_tokens;
  uint32_t dtype_code;  // see DType in the Python layer: a stable small integer
  uint32_t dtype_size;
  uint64_t block_bytes;   // layers * 2 * block_tokens * kv_heads * head_dim * dtype_size
  uint64_t block_stride;  // block_bytes rounded up to kBlockAlign
};
static_assert(sizeof(Geometry) == 40);

// The superblock: written once by the creator, then read-only.  `layout_version`
// is stored last with release order; 0 means "still initialising".
struct Superblock {
  char magic[8];                 // 0
  Atomic32 layout_version;       // 8   written last; excluded from the checksum
  uint32_t header_bytes;         // 12  sizeof(Superblock)
  uint8_t uuid[16];              // 16
  uint64_t total_bytes;          // 32  the whole mapping
  uint64_t created_ns;           // 40  CLOCK_REALTIME at creation
  uint32_t creator_pid;          // 48
  uint32_t coherence;            // 52  Coherence
  uint32_t flags;                // 56  kFlag*
  uint32_t max_members;          // 60  member slots, chosen at creation (kMinMembers .. kMaxMembersLimit)
  Geometry geometry;             // 64
  uint64_t num_blocks;           // 104
  uint64_t index_slots;          // 112 power of two
  uint32_t index_probe_limit;    // 120
  uint32_t transfer_max_blocks;  // 124 handles per transfer channel
  RegionDesc regions[kRegionCount];  // 128 .. 256
  uint32_t lock_shards;          // 256 noncoherent lock shards (power of two, 1 = one pool-wide lock); 1 if coherent
  uint32_t reserved32;           // 260 zero
  uint8_t reserved[240];         // 264 .. 504, zero
  uint64_t checksum;             // 504 crc32c of bytes [0,8) and [12,504)
};
static_assert(sizeof(Superblock) == 512);
static_assert(offsetof(Superblock, layout_version) == 8);
static_assert(offsetof(Superblock, uuid) == 16);
static_assert(offsetof(Superblock, total_bytes) == 32);
static_assert(offsetof(Superblock, coherence) == 52);
static_assert(offsetof(Superblock, geometry) == 64);
static_assert(offsetof(Superblock, num_blocks) == 104);
static_assert(offsetof(Superblock, index_slots) == 112);
static_assert(offsetof(Superblock, regions) == 128);
static_assert(offsetof(Superblock, lock_shards) == 256);
static_assert(offsetof(Superblock, checksum) == 504);

// Hot shared words, each alone on a 128-byte (two cache line) stride.
struct alignas(128) PaddedWord {
  Atomic64 value;
  uint8_t pad[120];
};
static_assert(sizeof(PaddedWord) == 128);

// Counters folded in from members that detached or were recovered.
enum Counter : uint32_t {
  kCtrHits = 0,        // keys found by acquire
  kCtrMisses,          // keys asked for by acquire and not found
  kCtrEvictions,       // sealed blocks evicted to make room
  kCtrBytesIn,         // bytes published into the pool
  kCtrBytesOut,        // bytes copied out of the pool by copy_to
  kCtrPublished,       // blocks newly sealed
  kCtrDuplicates,      // blocks skipped by publish because the key was present
  kCtrRecovered,       // member slots recovered after their process died
  kCtrIndexFull,       // keys not stored because their index neighbourhood was full
  kCtrChecksumErrors,  // blocks whose bytes did not match their checksum on acquire
  kCtrAllocs,          // blocks allocated (free or evicted)
  kCtrPinsRefused,     // pins refused because no pin record was free near the member's hash (a miss)
  kCtrLockWaits,       // noncoherent lock acquisitions (pool-wide or one shard) that found the lock held
  kCtrTierDemoted,     // blocks the cluster tier stored in its store (pykvshm.tier, via add_tier_counts)
  kCtrTierPromoted,    // blocks the cluster tier promoted from its store into the pool
  kCtrTierIntegrity,   // blocks the cluster tier fetched and refused (key, geometry or checksum mismatch)
  kCounterCount = 16,
};

// The lock of noncoherent pools (docs/design/coherence.md): a bakery among hosts,
// one line pair per host.  A host's line is written only by that host's
// processes, which are cache-coherent with each other; other hosts only read it
// (after invalidating).  Zero (a fresh or a coherent pool) is "no host".
inline constexpr uint32_t kLockHosts = 16;

struct alignas(128) HostLine {
  Atomic64 host_id;       // 0   owning host, 0 = free
  Atomic64 ticket;        // 8   bakery number, 0 = not competing
  Atomic64 local;         // 16  the host's own lock: pid:32 | token:32 of the holder, 0 = free
  Atomic64 heartbeat_ns;  // 24  CLOCK_REALTIME, beaten by every member of the host
  Atomic32 choosing;      // 32  bakery "choosing a number"
  Atomic32 reserved32;    // 36
  Atomic64 hold_ns;       // 40  CLOCK_REALTIME at which the `local` holder last proved it runs
  Atomic64 hold_lease_ns; // 48  the holder's lease: others take over or pass over after this silence
  uint64_t reserved;      // 56  zero
  uint8_t pad[64];        // 64 .. 128
};
static_assert(sizeof(HostLine) == 128);
static_assert(offsetof(HostLine, local) == 16 && offsetof(HostLine, choosing) == 32);
static_assert(offsetof(HostLine, hold_ns) == 40 && offsetof(HostLine, hold_lease_ns) == 48);

// Claiming a free HostLine (once per host): Fischer's timed mutual exclusion.
struct alignas(128) JoinLine {
  Atomic64 owner;     // 0   random token of the claimant, 0 = free
  Atomic64 since_ns;  // 8   CLOCK_REALTIME of the claim
  Atomic64 host_id;   // 16  claimant's host
  Atomic64 pid;       // 24  claimant's pid (same-host claimants check it for liveness)
  Atomic64 lines_used;  // 32  host lines ever claimed (lines are taken lowest first): the bakery scans these
  uint8_t pad[88];
};
static_assert(sizeof(JoinLine) == 128);

struct Control {
  PaddedWord free_hint;    // approximate number of FREE blocks (a hint, never trusted)
  PaddedWord clock_hand;   // CLOCK eviction hand, monotonically increasing
  PaddedWord attach_seq;   // reserved (member epochs live in each slot)
  struct alignas(128) Event {
    Atomic32 seq;          // bumped whenever a transfer channel opens (a futex word)
    Atomic32 waiters;      // processes sleeping on seq
    uint8_t pad[120];
  } channel_event;
  PaddedWord reserved_words[4];
  Atomic64 retired[kCounterCount];  // counters of members that detached or were recovered
  JoinLine join;                    // noncoherent pools only
  HostLine hosts[kLockHosts];       // noncoherent pools only
  uint8_t pad[kPageBytes - 8 * 128 - kCounterCount * 8 - sizeof(JoinLine) - kLockHosts * sizeof(HostLine)];
};
static_assert(sizeof(Control) == kPageBytes);
static_assert(offsetof(Control, retired) == 1024);
static_assert(offsetof(Control, join) == 1152);
static_assert(offsetof(Control, hosts) == 1280);

// Lock shards of a noncoherent pool (docs/design/coherence.md, "Lock shards").  With
// Superblock::lock_shards = S > 1 (S <= kMaxLockShards / 2), block range s is guarded by
// entry s's own bakery (its `lines`, one per host line of Control::hosts, which keep the
// host identity and heartbeat), and the prefix index by entry S's; members, channels and
// the control page stay under the pool-wide lock of Control::hosts.  Entry s < S also
// keeps the free hint and the CLOCK hand of its block range.  S = 1: none of this is used.
inline constexpr uint32_t kMaxLockShards = 16;

struct alignas(128) ShardLock {
  PaddedWord free_hint;          // 0    FREE blocks of the shard's range (a hint)
  PaddedWord clock_hand;         // 128  CLOCK hand over the shard's range
  HostLine lines[kLockHosts];    // 256  the shard's bakery: line j belongs to the host of Control::hosts[j]
};
static_assert(sizeof(ShardLock) == 256 + kLockHosts * 128);
static_assert(offsetof(ShardLock, lines) == 256);

struct ShardTable {
  ShardLock shards[kMaxLockShards];
};
static_assert(sizeof(ShardTable) == kMaxLockShards * 2304);

// Member slot: one per attached pool handle.
//   ctl = status:2 | epoch:30 | payload:32
//   payload = pid for kMemberAlive; (recoverer slot:16 | recoverer epoch:16) for
//   kMemberRecovering; seconds of CLOCK_REALTIME (low 32 bits) for kMemberClaiming.
enum MemberStatus : uint64_t { kMemberFree = 0, kMemberAlive = 1, kMemberRecovering = 2, kMemberClaiming = 3 };

struct alignas(64) MemberSlot {
  Atomic64 ctl;            // 0
  Atomic64 start_time;     // 8   /proc/<pid>/stat starttime (clock ticks), 0 = unknown
  Atomic64 host_id;        // 16  boot id + pid namespace; members of another host use the lease
  Atomic64 heartbeat_ns;   // 24  CLOCK_REALTIME of the last API call (at most every 100 ms)
  Atomic64 attach_ns;      // 32
  Atomic64 pin_op;         // 40  pin journal: the slot's pin/unpin in flight (word::journal); kept across epochs
  uint8_t pad0[16];        // 48
  Atomic64 counters[kCounterCount];  // 64   written by the member only, summed by stats()
  uint8_t pad1[64];        // 192
};
static_assert(sizeof(MemberSlot) == 256);
static_assert(offsetof(MemberSlot, counters) == 64);
static_assert(offsetof(MemberSlot, pin_op) == 40);

// Block state word: gen:32 | kind:3 | ref:1 | owner:28
enum BlockKind : uint64_t { kFree = 0, kWriting = 1, kSealed = 2, kEvicting = 3 };

struct alignas(64) BlockDesc {
  Atomic64 pins;          // 0   count:16 | tag slot:16 | tag seq:32 (word::pins): members pinning it, last changer
  uint64_t reserved0;     // 8   zero
  Atomic64 key[2];        // 16  16-byte key, written before the index entry is inserted
  Atomic32 crc;           // 32  crc32c of the block's bytes (when kFlagBlockChecksums)
  Atomic32 desc_flags;    // 36  0, or kDescWithdrawn | (gen & kDescGenMask): that generation failed its checksum
  uint8_t pad[24];        // 40
};
inline constexpr uint32_t kDescWithdrawn = 1u << 31;
inline constexpr uint32_t kDescGenMask = kDescWithdrawn - 1;
static_assert(sizeof(BlockDesc) == 64);
static_assert(offsetof(BlockDesc, key) == 16);
static_assert(offsetof(BlockDesc, pins) == 0);
static_assert(offsetof(BlockDesc, crc) == 32);

// Transfer channel: one layer-wise handoff of a request's blocks, producer to consumers.
//   ctl = status:3 | epoch:29 | owner slot:16 | 0:16
enum ChannelStatus : uint64_t { kChanFree = 0, kChanFilling = 1, kChanOpen = 2, kChanDone = 3, kChanAborted = 4 };
inline constexpr uint32_t kReadyDone = 1u << 30;     // in Channel::ready
inline constexpr uint32_t kReadyAborted = 1u << 31;  // in Channel::ready
inline constexpr uint32_t kReadyCount = (1u << 30) - 1;
inline constexpr uint64_t kHandleCached = 1ull << 31;  // in a channel handle: a block already sealed, pinned by the producer

struct alignas(64) Channel {
  Atomic64 ctl;            // 0
  Atomic32 ready;          // 8   futex word: layers ready | kReadyDone | kReadyAborted
  Atomic32 waiters;        // 12  consumers sleeping on `ready`
  Atomic64 req_key[2];     // 16  fold of the request id
  Atomic64 first_key[2];   // 32  key of the first block
  Atomic32 num_blocks;     // 48
  Atomic32 num_layers;     // 52
  Atomic64 open_ns;        // 56
  Atomic64 done_ns;        // 64
  uint8_t pad[56];         // 72 .. 128, then transfer_max_blocks handles (gen:32 | cached:1 | index:31)
};
static_assert(sizeof(Channel) == 128);
static_assert(offsetof(Channel, ready) == 8);
static_assert(offsetof(Channel, req_key) == 16);
static_assert(offsetof(Channel, num_blocks) == 48);

// Index entry: 0 = empty, 1 = tombstone, 2 = tombstone being cleared (index.md,
// "Reclaiming tombstones"; read as a tombstone), otherwise
//   1:1 | fingerprint:15 | gen:20 | block index:28
inline constexpr uint64_t kEntryEmpty = 0;
inline constexpr uint64_t kEntryTomb = 1;
inline constexpr uint64_t kEntryClearing = 2;

}  // namespace pykvshm::layout

namespace pykvshm::layout {

// Pin records: one 64-bit word per (member, pinned block), 0 = free.  recovery.md,
// "Pins".  Sized from the pool's blocks and members; a member takes any free record
// near a hash of (slot, block) and remembers where, so no lookup ever probes.
inline constexpr uint32_t kPinProbeLimit = 64;
inline constexpr uint64_t kMaxPinRecords = 1ull << 29;  // a journal names a record in 29 bits
constexpr uint64_t pin_records_for(uint64_t num_blocks, uint32_t max_members) {
  uint64_t want = 8 * num_blocks > 2ull * max_members ? 8 * num_blocks : 2ull * max_members;
  if (want < 1024) want = 1024;
  if (want > kMaxPinRecords) want = kMaxPinRecords;
  uint64_t p = 1;
  while (p < want) p <<= 1;
  return p;
}

}  // namespace pykvshm::layout
