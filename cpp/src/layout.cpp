// Sizing the on-media layout and validating a superblock before anything is trusted.
#include <algorithm>
#include <cstring>
#include <string>

#include "pykvshm/shards.h"
#include "pykvshm/crc32c.h"
#include "pykvshm/pool.h"

namespace pykvshm {
namespace {

using namespace layout;

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

uint64_t next_pow2(uint64_t x) {
  uint64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

uint64_t index_slots_for(uint64_t n) { return std::max<uint64_t>(1024, next_pow2(2 * n)); }

// Lays out n blocks; returns the bytes needed up to the end of the data region.
uint64_t layout_for(const Geometry& g, uint64_t n, uint32_t max_members, LayoutPlan* p) {
  p->num_blocks = n;
  p->max_members = max_members;
  p->index_slots = index_slots_for(n);
  uint64_t off = kPageBytes;  // superblock page
  p->regions[kRegionControl] = {off, sizeof(Control) + sizeof(ShardTable)};
  off += p->regions[kRegionControl].size;
  p->regions[kRegionMembers] = {off, uint64_t(max_members) * sizeof(MemberSlot)};
  off += p->regions[kRegionMembers].size;
  p->regions[kRegionStates] = {off, align_up(n * 8, 64)};
  off += p->regions[kRegionStates].size;
  p->regions[kRegionDescriptors] = {off, n * sizeof(BlockDesc)};
  off += p->regions[kRegionDescriptors].size;
  p->regions[kRegionIndex] = {off, p->index_slots * 8};
  off += p->regions[kRegionIndex].size;
  // Blocks one transfer may cover: the whole pool when blocks are big, fewer when
  // they are so small that the channel table would exceed 1/8 of the data (never
  // fewer than 64, never more than kTransferMaxBlocksCap).  A multiple of 8
  // handles keeps every channel on a 64-byte boundary.
  uint64_t by_size = n * g.block_stride / (64ull * kTransferChannels);
  uint64_t tmax = std::clamp<uint64_t>(std::min(n, by_size), std::min<uint64_t>(n, 64), kTransferMaxBlocksCap);
  p->transfer_max_blocks = uint32_t(align_up(tmax, 8));
  p->regions[kRegionTransfer] = {off, uint64_t(kTransferChannels) * (sizeof(Channel) + 8ull * p->transfer_max_blocks)};
  off += p->regions[kRegionTransfer].size;
  p->regions[kRegionPins] = {off, pin_records_for(n, max_members) * 8};
  off += p->regions[kRegionPins].size;
  off = align_up(off, kDataAlign);
  p->regions[kRegionData] = {off, n * g.block_stride};
  return off + n * g.block_stride;
}

std::string mib(uint64_t b) { return std::to_string(b >> 20) + " MiB"; }

}  // namespace

uint32_t dtype_size_for_code(uint32_t code) {
  // Stable dtype codes (pykvshm/spec.py): 1 float16, 2 bfloat16, 3 float32, 4 float8_e4m3fn,
  // 5 float8_e5m2, 6 int8, 7 uint8, 8 float64.
  static constexpr uint32_t kSizes[] = {0, 2, 2, 4, 1, 1, 1, 1, 8};
  return code < sizeof(kSizes) / sizeof(kSizes[0]) ? kSizes[code] : 0;
}

Geometry make_geometry(const GeometryIn& in) {
  if (!in.num_layers || !in.num_kv_heads || !in.head_dim || !in.block_tokens)
    raise(ErrorCode::kGeometry, "every KV geometry dimension must be positive");
  uint32_t size = dtype_size_for_code(in.dtype_code);
  if (size == 0) raise(ErrorCode::kGeometry, "unknown dtype code " + std::to_string(in.dtype_code));
  if (in.dtype_size != size)
    raise(ErrorCode::kGeometry, "dtype code " + std::to_string(in.dtype_code) + " has " + std::to_string(size) +
                                    "-byte elements, not " + std::to_string(in.dtype_size));
  Geometry g{};
  g.num_layers = in.num_layers;
  g.num_kv_heads = in.num_kv_heads;
  g.head_dim = in.head_dim;
  g.block_tokens = in.block_tokens;
  g.dtype_code = in.dtype_code;
  g.dtype_size = in.dtype_size;
  __uint128_t bytes = __uint128_t(in.num_layers) * 2 * in.block_tokens * in.num_kv_heads * in.head_dim * in.dtype_size;
  if (bytes > (__uint128_t(1) << 40)) raise(ErrorCode::kGeometry, "one KV block would exceed 1 TiB");
  g.block_bytes = uint64_t(bytes);
  g.block_stride = align_up(g.block_bytes, kBlockAlign);
  return g;
}

LayoutPlan plan_layout(const Geometry& g, uint64_t capacity, uint64_t size_align, uint32_t max_members) {
  LayoutPlan p{};
  if (max_members < kMinMembers || max_members > kMaxMembersLimit)
    raise(ErrorCode::kPool, "max_members must be between " + std::to_string(kMinMembers) + " and " +
                                std::to_string(kMaxMembersLimit) + ", not " + std::to_string(max_members));
  // Above this, rounding the size up could wrap around and a huge request would read as a tiny one.
  constexpr uint64_t kMaxCapacity = 1ull << 62;
  if (capacity > kMaxCapacity)
    raise(ErrorCode::kPool, "capacity " + std::to_string(capacity) + " bytes is larger than a pool can be (at most 2^62 bytes)");
  uint64_t file = align_up(capacity, size_align);
  uint64_t lo = 0, hi = std::min<uint64_t>(file / g.block_stride + 1, kMaxBlocks + 1);
  // Largest n with layout_for(n) <= file.
  while (lo + 1 < hi) {
    uint64_t mid = lo + (hi - lo) / 2;
    LayoutPlan t{};
    if (layout_for(g, mid, max_members, &t) <= file) lo = mid;
    else hi = mid;
  }
  if (lo == 0) {
    LayoutPlan t{};
    uint64_t need = layout_for(g, 1, max_members, &t);
    raise(ErrorCode::kFull, "capacity " + std::to_string(capacity) + " bytes is too small for one " +
                                std::to_string(g.block_bytes) + "-byte KV block; need at least " + std::to_string(need) +
                                " bytes (" + mib(need + (1 << 20) - 1) + ")");
  }
  layout_for(g, lo, max_members, &p);
  p.total_bytes = file;
  return p;
}

uint64_t superblock_checksum(const Superblock* sb) {
  auto bytes = reinterpret_cast<const uint8_t*>(sb);
  uint32_t c = crc32c(bytes, 8);
  c = crc32c(bytes + 12, offsetof(Superblock, checksum) - 12, c);
  return c;
}

void validate_superblock(const uint8_t* bytes, size_t n, uint64_t file_size, const std::string& name) {
  const std::string who = "pool '" + name + "'";
  if (n < sizeof(Superblock) || file_size < kPageBytes)
    raise(ErrorCode::kCorrupt, who + " is truncated: " + std::to_string(file_size) +
                                   " bytes, too short to hold a pykvshm superblock");
  // Work on an aligned copy: the caller's bytes may come from anywhere.
  alignas(64) uint8_t copy[sizeof(Superblock)];
  std::memcpy(copy, bytes, sizeof copy);
  auto sb = reinterpret_cast<const Superblock*>(copy);
  if (std::memcmp(sb->magic, kMagic, sizeof kMagic) != 0)
    raise(ErrorCode::kCorrupt, who + " is not a pykvshm pool (bad magic); refusing to touch it");
  uint32_t version;
  std::memcpy(&version, copy + offsetof(Superblock, layout_version), 4);
  if (version == 0)
    raise(ErrorCode::kInitializing, who + " is still being initialised by its creator (layout version 0); retry shortly");
  if (version != kLayoutVersion)
    raise(ErrorCode::kLayoutMismatch, who + " has layout version " + std::to_string(version) +
                                          ", but this pykvshm reads layout version " + std::to_string(kLayoutVersion) +
                                          "; use the pykvshm release that created it, or destroy and recreate the pool");
  if (sb->header_bytes != sizeof(Superblock))
    raise(ErrorCode::kCorrupt, who + " has a superblock of " + std::to_string(sb->header_bytes) + " bytes, expected " +
                                   std::to_string(sizeof(Superblock)));
  if (superblock_checksum(sb) != sb->checksum)
    raise(ErrorCode::kCorrupt, who + " has a corrupt superblock (checksum mismatch)");
  if (sb->total_bytes != file_size)
    raise(ErrorCode::kCorrupt, who + " is truncated or resized: its superblock says " + std::to_string(sb->total_bytes) +
                                   " bytes, the backing store has " + std::to_string(file_size));
  const Geometry& g = sb->geometry;
  GeometryIn gi{g.num_layers, g.num_kv_heads, g.head_dim, g.block_tokens, g.dtype_code, g.dtype_size};
  Geometry expect{};
  try {
    expect = make_geometry(gi);
  } catch (const Error&) {
    raise(ErrorCode::kCorrupt, who + " has an invalid KV geometry in its superblock");
  }
  if (expect.block_bytes != g.block_bytes || expect.block_stride != g.block_stride)
    raise(ErrorCode::kCorrupt, who + " has inconsistent block sizes in its superblock");
  if (sb->num_blocks == 0 || sb->num_blocks > kMaxBlocks)
    raise(ErrorCode::kCorrupt, who + " has an invalid block count " + std::to_string(sb->num_blocks));
  if (sb->max_members < kMinMembers || sb->max_members > kMaxMembersLimit)
    raise(ErrorCode::kCorrupt, who + " has an invalid member table size " + std::to_string(sb->max_members));
  if (sb->index_probe_limit != kIndexProbeLimit)
    raise(ErrorCode::kCorrupt, who + " has an invalid index configuration");
  if (sb->coherence > 1) raise(ErrorCode::kCorrupt, who + " has an unknown coherence mode " + std::to_string(sb->coherence));
  if (sb->flags & ~kFlagBlockChecksums) raise(ErrorCode::kCorrupt, who + " has unknown feature flags");
  // Regions: recompute the layout this geometry and block count imply and demand
  // an exact match, which covers bounds, alignment, ordering and overlap at once.
  LayoutPlan p{};
  uint64_t end = layout_for(g, sb->num_blocks, sb->max_members, &p);
  if (sb->transfer_max_blocks != p.transfer_max_blocks)
    raise(ErrorCode::kCorrupt, who + " has an invalid transfer channel size");
  if (sb->index_slots != p.index_slots)
    raise(ErrorCode::kCorrupt, who + " has an index of " + std::to_string(sb->index_slots) + " slots, expected " +
                                   std::to_string(p.index_slots));
  for (uint32_t r = 0; r < kRegionCount; ++r) {
    if (sb->regions[r].offset != p.regions[r].offset || sb->regions[r].size != p.regions[r].size)
      raise(ErrorCode::kCorrupt, who + " has region " + std::to_string(r) + " at [" + std::to_string(sb->regions[r].offset) +
                                     ", +" + std::to_string(sb->regions[r].size) + "), expected [" +
                                     std::to_string(p.regions[r].offset) + ", +" + std::to_string(p.regions[r].size) + ")");
  }
  if (end > file_size)
    raise(ErrorCode::kCorrupt, who + " needs " + std::to_string(end) + " bytes but the backing store has " +
                                   std::to_string(file_size));
  for (uint8_t b : sb->reserved)
    if (b != 0 || sb->reserved32 != 0) raise(ErrorCode::kCorrupt, who + " has non-zero reserved superblock bytes");
  const uint32_t s = sb->lock_shards;
  const uint32_t most = sb->coherence == uint32_t(Coherence::kNoncoherent) ? max_lock_shards(sb->num_blocks) : 1;
  if (s == 0 || (s & (s - 1)) != 0 || s > most)
    raise(ErrorCode::kCorrupt, who + " has " + std::to_string(s) + " lock shards; this pool allows a power of two up to " +
                                   std::to_string(most));
}

uint32_t max_lock_shards(uint64_t nblocks) noexcept {
  // The index has one lock of its own, whatever its size.
  uint32_t s = 1;
  while (s < kMaxLockShards / 2 && uint64_t(s) * 2 * 64 <= nblocks) s *= 2;
  return s;
}

}  // namespace pykvshm
