// The block allocator, one thread at a time: all-or-nothing alloc and free,
// every kind of misuse rejected with its own ErrorCode and without side effects,
// the free-count hint treated as a hint, and eviction limited to sealed,
// unpinned blocks.  Two Pool objects on one pool are two members.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"
#include "pykvshm/state.h"

#include "test_support.h"

namespace pykvshm {
namespace {

using namespace layout;
using namespace ::pykvshm::testing;

std::vector<uint8_t> key_bytes(uint64_t first, size_t n) {
  std::vector<uint8_t> k(16 * n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t k0 = first + i, k1 = word::mix64(first + i) | 1;
    std::memcpy(&k[16 * i], &k0, 8);
    std::memcpy(&k[16 * i + 8], &k1, 8);
  }
  return k;
}

class AllocatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->test_suite_name() + "-" + info->name();
    for (char& c : name_)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  }
  void TearDown() override {
    pools_.clear();
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }

  // A pool of exactly `blocks` 512-byte blocks (a multiple of 8: the file is
  // page-sized, and the data region starts at 2 MiB).
  Pool& create(uint64_t blocks) {
    pools_.push_back(Pool::create(name_, kSmall, (2ull << 20) + blocks * kBlockBytes, PoolOptions{}));
    EXPECT_EQ(pools_.back()->num_blocks(), blocks);
    return *pools_.back();
  }
  Pool& open_member() {
    pools_.push_back(Pool::open(name_, PoolOptions{}));
    return *pools_.back();
  }

  static Control* control(Pool& p) {
    auto sb = reinterpret_cast<const Superblock*>(p.base());
    return reinterpret_cast<Control*>(p.base() + sb->regions[kRegionControl].offset);
  }

  static void publish(Pool& p, uint64_t first_key, size_t n) {
    auto keys = key_bytes(first_key, n);
    std::vector<uint8_t> src(n * kBlockBytes, uint8_t(first_key));
    ASSERT_EQ(p.publish(keys.data(), n, src.data(), kBlockBytes), n);
  }

  std::string name_;
  std::vector<std::unique_ptr<Pool>> pools_;
};

TEST_F(AllocatorTest, AllocAndFreeAreAllOrNothing) {
  Pool& p = create(32);
  std::vector<uint64_t> held(30);
  p.alloc(30, false, held.data());
  std::vector<uint64_t> more(5, ~0ull);
  EXPECT_CODE(p.alloc(5, false, more.data()), ErrorCode::kFull);
  Stats st = p.stats();
  EXPECT_EQ(st.free, 2u) << "a failed alloc kept some of the blocks it had claimed";
  EXPECT_EQ(st.writing, 30u);
  EXPECT_CODE(p.alloc(33, true, more.data()), ErrorCode::kFull);  // more than the pool has

  // A free with one bad handle frees nothing.
  std::vector<uint64_t> batch = {held[0], held[1], word::handle(0, 1000)};
  EXPECT_CODE(p.free(batch.data(), batch.size()), ErrorCode::kInvalidHandle);
  EXPECT_EQ(p.stats().writing, 30u);

  // The two blocks the failed alloc let go are still obtainable.
  EXPECT_NO_THROW(p.alloc(2, false, more.data())) << "a failed alloc lost the free blocks it saw (free_hint)";
  const bool got_two = p.stats().free == 0;
  p.free(held.data(), held.size());
  if (got_two) p.free(more.data(), 2);
  st = p.stats();
  EXPECT_EQ(st.free, 32u);
  EXPECT_EQ(st.counters[kCtrAllocs], got_two ? 32u : 30u);
  p.alloc(0, false, nullptr);  // nothing asked, nothing done
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, HandlesAreDistinctAndWritable) {
  Pool& p = create(64);
  std::vector<uint64_t> h(64);
  p.alloc(64, false, h.data());
  std::vector<bool> seen(64, false);
  for (uint64_t x : h) {
    uint64_t i = word::handle_index(x);
    ASSERT_LT(i, 64u);
    EXPECT_FALSE(seen[i]) << "block " << i << " handed out twice";
    seen[i] = true;
    EXPECT_EQ(p.writable_block(x), p.block_data(i));
    std::memset(p.writable_block(x), int(i), kBlockBytes);  // the whole block is ours to write
  }
  for (uint64_t x : h) EXPECT_EQ(p.block_data(word::handle_index(x))[kBlockBytes - 1], uint8_t(word::handle_index(x)));
  p.free(h.data(), h.size());
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, FullWithNothingEvictable) {
  Pool& p = create(16);
  std::vector<uint64_t> h(16);
  p.alloc(16, true, h.data());
  uint64_t one = 0;
  try {
    p.alloc(1, true, &one);
    ADD_FAILURE() << "allocated from a pool whose every block is being written";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFull) << e.what();
    EXPECT_NE(std::string(e.what()).find("pool is full"), std::string::npos) << e.what();
  }
  p.free(h.data(), h.size());

  // Sealed but pinned blocks are not evictable either.
  publish(p, 100, 16);
  auto keys = key_bytes(100, 16);
  std::vector<uint64_t> pins(16);
  ASSERT_EQ(p.acquire(keys.data(), 16, pins.data()), 16u);
  EXPECT_CODE(p.alloc(1, true, &one), ErrorCode::kFull);
  EXPECT_EQ(p.match(keys.data(), 16), 16u) << "a failed alloc evicted a pinned block";
  p.release(pins.data(), pins.size());
  p.alloc(1, true, &one);  // now one can go
  EXPECT_EQ(p.stats().sealed, 15u);
  p.free(&one, 1);
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, StaleHandleAfterReuse) {
  Pool& p = create(8);
  std::vector<uint64_t> h(8);
  p.alloc(8, false, h.data());
  const uint64_t old = h[3];
  p.free(&old, 1);
  uint64_t fresh = 0;
  p.alloc(1, false, &fresh);  // the only free block: the same index, a new generation
  ASSERT_EQ(word::handle_index(fresh), word::handle_index(old));
  ASSERT_NE(word::handle_gen(fresh), word::handle_gen(old));
  EXPECT_CODE(p.free(&old, 1), ErrorCode::kStaleHandle);
  EXPECT_CODE(p.writable_block(old), ErrorCode::kStaleHandle);
  EXPECT_EQ(p.stats().writing, 8u) << "a stale free released the block's new holder";
  h[3] = fresh;
  p.free(h.data(), h.size());
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, DoubleFree) {
  Pool& p = create(8);
  uint64_t h[2];
  p.alloc(2, false, h);
  p.free(&h[0], 1);
  EXPECT_CODE(p.free(&h[0], 1), ErrorCode::kDoubleFree);
  EXPECT_CODE(p.writable_block(h[0]), ErrorCode::kStaleHandle);  // freed: only free() calls it a double free
  // The same handle twice in one call is rejected before anything is freed.
  uint64_t twice[2] = {h[1], h[1]};
  EXPECT_CODE(p.free(twice, 2), ErrorCode::kDoubleFree);
  EXPECT_EQ(p.stats().writing, 1u);
  p.free(&h[1], 1);
  EXPECT_EQ(p.stats().free, 8u);
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, ForeignOwner) {
  Pool& a = create(16);
  Pool& b = open_member();
  ASSERT_NE(a.member_slot(), b.member_slot()) << "two Pool objects must be two members";
  uint64_t hb[2];
  b.alloc(2, false, hb);
  EXPECT_CODE(a.free(&hb[0], 1), ErrorCode::kInvalidHandle);
  EXPECT_CODE(a.writable_block(hb[0]), ErrorCode::kInvalidHandle);
  EXPECT_CODE(a.commit(&hb[0], 1), ErrorCode::kInvalidHandle);
  EXPECT_EQ(a.stats().writing, 2u);
  uint64_t ha = 0;
  a.alloc(1, false, &ha);
  uint64_t mixed[2] = {hb[1], ha};
  EXPECT_CODE(b.free(mixed, 2), ErrorCode::kInvalidHandle);  // one foreign handle: nothing freed
  EXPECT_EQ(a.stats().writing, 3u);
  b.free(hb, 2);
  a.free(&ha, 1);
  EXPECT_EQ(a.stats().free, 16u);
  EXPECT_NO_THROW(a.check(true));
}

TEST_F(AllocatorTest, OutOfRangeHandle) {
  Pool& p = create(8);
  for (uint64_t bad : std::vector<uint64_t>{word::handle(0, 8), word::handle(1, 9), word::handle(0, 0xffffffffu), ~0ull}) {
    SCOPED_TRACE(bad);
    EXPECT_CODE(p.free(&bad, 1), ErrorCode::kInvalidHandle);
    EXPECT_CODE(p.writable_block(bad), ErrorCode::kInvalidHandle);
    EXPECT_CODE(p.release(&bad, 1), ErrorCode::kInvalidHandle);
    EXPECT_CODE(p.pinned_block(bad), ErrorCode::kInvalidHandle);
  }
  EXPECT_EQ(p.stats().free, 8u);
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, ClosedHandleIsRejected) {
  Pool& p = create(8);
  uint64_t h = 0;
  p.alloc(1, false, &h);
  Pool& other = open_member();
  p.close();
  EXPECT_TRUE(p.closed());
  EXPECT_CODE(p.alloc(1, false, &h), ErrorCode::kClosed);
  EXPECT_CODE(p.free(&h, 1), ErrorCode::kClosed);
  // close() gave back the block it was writing.
  EXPECT_EQ(other.stats().free, 8u);
  EXPECT_NO_THROW(other.check(true));
}

// The shared free count is a hint that a crash (between a block's state change
// and the hint update) or a race can leave wrong in either direction.  A wrong
// hint may cost a scan, never a block: a pool with free blocks must hand them
// out, eviction or not.
TEST_F(AllocatorTest, FreeHintDriftDoesNotLoseBlocks) {
  Pool& p = create(32);
  Atomic64& hint = control(p)->free_hint.value;
  std::vector<uint64_t> h(32);

  // Too low: a process died inside free() after its state CASes, before the
  // hint update.  Every block is free, the hint says none is.
  hint.store(0, std::memory_order_relaxed);
  EXPECT_NO_THROW(p.alloc(4, false, h.data())) << "free blocks lost to a hint of 0";
  if (p.stats().writing == 4) p.free(h.data(), 4);

  // Below zero (a fetch_sub that raced a reset): the word wraps around.
  hint.store(~0ull - 6, std::memory_order_relaxed);
  EXPECT_NO_THROW(p.alloc(32, false, h.data())) << "free blocks lost to a negative hint";
  if (p.stats().writing == 32) p.free(h.data(), 32);

  // Too high: a scan finds nothing, and the allocator says so instead of spinning.
  p.alloc(32, true, h.data());
  hint.store(1ull << 40, std::memory_order_relaxed);
  uint64_t one = 0;
  EXPECT_CODE(p.alloc(1, false, &one), ErrorCode::kFull);
  p.free(h.data(), 32);

  // Whatever the hint went through, every block can be allocated at once.
  EXPECT_NO_THROW(p.alloc(32, false, h.data())) << "free blocks lost after a failed alloc reset the hint";
  if (p.stats().writing == 32) p.free(h.data(), 32);
  EXPECT_NO_THROW(p.check(true));
}

TEST_F(AllocatorTest, EvictionTakesOnlySealedUnpinnedBlocks) {
  Pool& a = create(16);
  Pool& b = open_member();
  publish(a, 0, 8);  // keys 0..7 sealed
  auto keys = key_bytes(0, 8);
  uint64_t pa[3];
  ASSERT_EQ(a.acquire(keys.data(), 3, pa), 3u);  // a pins keys 0, 1, 2
  uint64_t pb = 0;
  ASSERT_EQ(b.acquire(keys.data() + 2 * 16, 1, &pb), 1u);  // b pins key 2 too
  a.release(&pa[2], 1);                                    // key 2: pinned by b only
  std::vector<uint64_t> writing_b(4);
  b.alloc(4, false, writing_b.data());  // 4 blocks being written by b; 4 free remain

  // Without eviction, sealed blocks are never taken.
  std::vector<uint64_t> got(9);
  EXPECT_CODE(a.alloc(9, false, got.data()), ErrorCode::kFull);
  EXPECT_EQ(a.stats().sealed, 8u);

  // With it: 4 free + 5 sealed unpinned (keys 3..7) = exactly 9.
  a.alloc(9, true, got.data());
  for (uint64_t k = 0; k < 8; ++k)
    EXPECT_EQ(a.match(keys.data() + 16 * k, 1), k < 3 ? 1u : 0u) << "key " << k;
  for (uint64_t h : writing_b) EXPECT_NO_THROW(b.writable_block(h)) << "eviction took a block being written";
  for (uint64_t h : got) {
    uint64_t i = word::handle_index(h);
    EXPECT_NE(i, word::handle_index(pa[0]));
    EXPECT_NE(i, word::handle_index(pa[1]));
    EXPECT_NE(i, word::handle_index(pb));
  }
  Stats st = a.stats();
  EXPECT_EQ(st.sealed, 3u);
  EXPECT_EQ(st.pinned, 3u);
  EXPECT_EQ(st.writing, 13u);
  EXPECT_EQ(st.counters[kCtrEvictions], 5u);

  // Only pinned sealed blocks and blocks being written are left.
  uint64_t one = 0;
  EXPECT_CODE(a.alloc(1, true, &one), ErrorCode::kFull);
  EXPECT_EQ(a.match(keys.data(), 3), 3u);
  EXPECT_NO_THROW(a.check(true));

  a.release(pa, 2);
  b.release(&pb, 1);
  a.free(got.data(), got.size());
  b.free(writing_b.data(), writing_b.size());
  EXPECT_NO_THROW(a.check(true));
}

TEST_F(AllocatorTest, FailedEvictingAllocLeavesNothingHeld) {
  Pool& a = create(16);
  publish(a, 0, 10);
  std::vector<uint64_t> w(4);
  a.alloc(4, false, w.data());  // 10 sealed, 4 writing, 2 free
  std::vector<uint64_t> got(13);
  EXPECT_CODE(a.alloc(13, true, got.data()), ErrorCode::kFull);  // 12 obtainable
  Stats st = a.stats();
  EXPECT_EQ(st.writing, 4u) << "a failed alloc kept blocks";
  EXPECT_EQ(st.free + st.sealed, 12u);
  EXPECT_EQ(st.evicting, 0u);
  EXPECT_NO_THROW(a.check(true));
  a.free(w.data(), w.size());
  got.resize(16);
  a.alloc(16, true, got.data());  // and every block is still obtainable
  EXPECT_NO_THROW(a.check(true));
}

}  // namespace
}  // namespace pykvshm
