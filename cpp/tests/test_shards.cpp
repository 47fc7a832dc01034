// The lock-shard map (shards.h): which shard guards which block; the index lock.
#include <gtest/gtest.h>

#include "pykvshm/layout.h"
#include "pykvshm/shards.h"
#include "pykvshm/state.h"

using namespace pykvshm;

// One shard: the identity of a single-lock pool (layout version 2's probing).
TEST(ShardMap, OneShardIsTheWholeIndex) {
  const ShardMap m = ShardMap::make(1, 1000, 2048);
  for (uint64_t h : {0ull, 5ull, 2047ull, 0xdeadbeefcafef00dull}) {
    EXPECT_EQ(m.home(h), h & 2047);
    for (uint64_t d = 0; d < 70; ++d) EXPECT_EQ(m.step(m.home(h), d), (h + d) & 2047);
  }
  EXPECT_EQ(m.block_shard(999), 0u);
  EXPECT_EQ(m.block_begin(0), 0u);
  EXPECT_EQ(m.block_end(0), 1000u);
}

// Every block belongs to exactly one shard; ranges are contiguous, cover the pool, and
// start on a state-array cache line (8 blocks) so that no line holds two shards' words.
TEST(ShardMap, BlockRangesPartitionThePoolOnLineBoundaries) {
  for (uint64_t n : {1024ull, 1031ull, 4097ull, 55296ull}) {
    for (uint32_t s = 2; s <= max_lock_shards(n); s *= 2) {
      const ShardMap m = ShardMap::make(s, n, 4 * n);
      uint64_t next = 0;
      for (uint32_t k = 0; k < s; ++k) {
        EXPECT_EQ(m.block_begin(k), next) << n << " blocks, " << s << " shards";
        EXPECT_EQ(m.block_begin(k) % 8, 0u);
        EXPECT_GT(m.block_end(k), m.block_begin(k)) << "shard " << k << " is empty";
        for (uint64_t i = m.block_begin(k); i < m.block_end(k); ++i) ASSERT_EQ(m.block_shard(i), k);
        next = m.block_end(k);
      }
      EXPECT_EQ(next, n);
    }
  }
}

// With block shards the index keeps one range under its own lock: probing is the same
// as in a one-lock pool, and the index lock's id follows the block shards'.
TEST(ShardMap, IndexIsOneRangeUnderItsOwnLock) {
  const ShardMap one = ShardMap::make(1, 8192, 16384);
  const ShardMap eight = ShardMap::make(8, 8192, 16384);
  EXPECT_EQ(eight.index_lock(), 8u);
  EXPECT_EQ(one.index_lock(), 1u);
  for (uint64_t k = 0; k < 2000; ++k) {
    const uint64_t h = word::key_hash(k, ~k);
    ASSERT_EQ(eight.home(h), h & 16383);
    for (uint64_t d = 0; d < layout::kIndexProbeLimit; ++d) {
      const uint64_t p = eight.step(eight.home(h), d);
      ASSERT_EQ(p, one.step(one.home(h), d));
      ASSERT_EQ(p, (h + d) & 16383);
      ASSERT_EQ(eight.dist(eight.home(h), p), d);
      if (d) {
        ASSERT_EQ(eight.back(p), eight.step(eight.home(h), d - 1));
      }
    }
  }
}

TEST(ShardMap, MaxShardsNeedsRoomPerShard) {
  EXPECT_EQ(max_lock_shards(63), 1u);
  EXPECT_EQ(max_lock_shards(128), 2u);
  EXPECT_EQ(max_lock_shards(300), 4u);
  // At most half the shard table: the index lock takes an entry after the block shards.
  EXPECT_EQ(max_lock_shards(1 << 20), layout::kMaxLockShards / 2);
}
