// Which lock guards which block (noncoherent pools with Superblock::lock_shards = S > 1;
// docs/design/coherence.md, "Lock shards").
//
// Blocks are split into S contiguous ranges of whole state-array cache lines (8 blocks),
// each guarded by its own lock (ids 0..S-1); the prefix index has one lock of its own
// (id S, index_lock()).  Index probing is unchanged from one-lock pools (home = hash mod
// slots, wrapping over the whole table); the slot helpers below are that arithmetic, in one
// place for index.cpp and check.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pykvshm {

struct ShardMap {
  uint32_t shards = 1;
  uint64_t nblocks = 0, blocks_per = 0;  // blocks_per: a multiple of 8 when shards > 1
  uint64_t smask = 0;                     // index slots - 1 (a power of two)

  // shards: a power of two with shards * 64 <= nblocks (or 1).
  static ShardMap make(uint32_t shards, uint64_t nblocks, uint64_t nslots) noexcept {
    ShardMap m;
    m.shards = shards ? shards : 1;
    m.nblocks = nblocks;
    if (m.shards == 1) {
      m.blocks_per = nblocks;
    } else {
      const uint64_t per = (nblocks + m.shards - 1) / m.shards;
      m.blocks_per = (per + 7) & ~uint64_t(7);
    }
    m.smask = nslots - 1;  // one index range, under the index lock
    return m;
  }
  uint32_t block_shard(uint64_t i) const noexcept {
    return shards == 1 ? 0 : uint32_t(std::min<uint64_t>(i / blocks_per, shards - 1));
  }
  uint64_t block_begin(uint32_t s) const noexcept { return std::min(nblocks, uint64_t(s) * blocks_per); }
  uint64_t block_end(uint32_t s) const noexcept {
    return s + 1 >= shards ? nblocks : std::min(nblocks, uint64_t(s + 1) * blocks_per);
  }
  uint32_t index_lock() const noexcept { return shards; }  // the id of the index's lock
  uint64_t home(uint64_t h) const noexcept { return h & smask; }
  // The slot d places after p, and the one before p, wrapping over the table.
  uint64_t step(uint64_t p, uint64_t d) const noexcept { return (p + d) & smask; }
  uint64_t back(uint64_t p) const noexcept { return (p - 1) & smask; }
  // Probe distance from `from` to `to`.
  uint64_t dist(uint64_t from, uint64_t to) const noexcept { return (to - from) & smask; }
};

// The most block lock shards a pool of `nblocks` blocks may have: a power of two, at most
// kMaxLockShards / 2 (the shard table also holds the index lock), each with >= 64 blocks.
uint32_t max_lock_shards(uint64_t nblocks) noexcept;

}  // namespace pykvshm
