// The prefix index, one thread at a time: publish / match / acquire / release,
// insert-if-absent, eviction taking keys out of the index, stale handles after
// a block is reused, and the full-pool path.  Every scenario ends with a strict
// check() of the whole pool.
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

// Keys are numbered; a key's block content is a function of the key alone, so
// any reader can tell whether a block holds what its key promises.
std::vector<uint8_t> keys_for(const std::vector<uint64_t>& ids) {
  std::vector<uint8_t> k(16 * ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    uint64_t k0 = ids[i], k1 = word::mix64(ids[i] + 77) | 1;
    std::memcpy(&k[16 * i], &k0, 8);
    std::memcpy(&k[16 * i + 8], &k1, 8);
  }
  return k;
}
std::vector<uint64_t> range(uint64_t first, uint64_t n) {
  std::vector<uint64_t> v(n);
  for (uint64_t i = 0; i < n; ++i) v[i] = first + i;
  return v;
}
void fill_block(uint64_t id, uint64_t salt, uint8_t* out) {
  for (uint64_t w = 0; w < kBlockBytes / 8; ++w) {
    uint64_t x = word::mix64(id * 0x9e3779b97f4a7c15ull + w + salt);
    std::memcpy(out + 8 * w, &x, 8);
  }
}
std::vector<uint8_t> content_for(const std::vector<uint64_t>& ids, uint64_t salt = 0) {
  std::vector<uint8_t> src(ids.size() * kBlockBytes);
  for (size_t i = 0; i < ids.size(); ++i) fill_block(ids[i], salt, &src[i * kBlockBytes]);
  return src;
}
bool holds(const uint8_t* block, uint64_t id, uint64_t salt = 0) {
  uint8_t want[kBlockBytes];
  fill_block(id, salt, want);
  return std::memcmp(block, want, kBlockBytes) == 0;
}

class IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->test_suite_name() + "-" + info->name();
    for (char& c : name_)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  }
  void TearDown() override {
    if (!pools_.empty() && !pools_.front()->closed()) {
      EXPECT_NO_THROW(pools_.front()->check(true)) << "after the scenario";
    }
    pools_.clear();
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }
  Pool& create(uint64_t blocks, bool checksums = false) {
    PoolOptions opt;
    opt.block_checksums = checksums;
    pools_.push_back(Pool::create(name_, kSmall, (2ull << 20) + blocks * kBlockBytes, opt));
    EXPECT_EQ(pools_.back()->num_blocks(), blocks);
    return *pools_.back();
  }
  Pool& open_member() {
    pools_.push_back(Pool::open(name_, PoolOptions{}));
    return *pools_.back();
  }
  static size_t publish(Pool& p, const std::vector<uint64_t>& ids, uint64_t salt = 0) {
    auto k = keys_for(ids);
    auto src = content_for(ids, salt);
    return p.publish(k.data(), ids.size(), src.data(), kBlockBytes);
  }
  static size_t match(Pool& p, const std::vector<uint64_t>& ids) {
    auto k = keys_for(ids);
    return p.match(k.data(), ids.size());
  }
  static std::vector<uint64_t> acquire(Pool& p, const std::vector<uint64_t>& ids) {
    auto k = keys_for(ids);
    std::vector<uint64_t> h(ids.size());
    h.resize(p.acquire(k.data(), ids.size(), h.data()));
    return h;
  }

  std::string name_;
  std::vector<std::unique_ptr<Pool>> pools_;
};

TEST_F(IndexTest, PublishMatchAcquireRelease) {
  Pool& p = create(64);
  const auto ids = range(1000, 10);
  EXPECT_EQ(match(p, ids), 0u);
  EXPECT_EQ(publish(p, ids), 10u);
  EXPECT_EQ(match(p, ids), 10u);
  EXPECT_EQ(match(p, {1000, 1001, 1002, 5, 1003}), 3u) << "match is the longest present prefix";
  EXPECT_EQ(match(p, {5, 1000}), 0u);

  auto h = acquire(p, ids);
  ASSERT_EQ(h.size(), 10u);
  for (size_t i = 0; i < h.size(); ++i) EXPECT_TRUE(holds(p.pinned_block(h[i]), ids[i])) << "key " << ids[i];
  std::vector<uint8_t> out(10 * kBlockBytes);
  p.copy_out(h.data(), h.size(), out.data(), kBlockBytes);
  EXPECT_EQ(out, content_for(ids));
  Stats st = p.stats();
  EXPECT_EQ(st.sealed, 10u);
  EXPECT_EQ(st.pinned, 10u);
  EXPECT_EQ(st.counters[kCtrPublished], 10u);
  EXPECT_EQ(st.counters[kCtrHits], 10u);

  p.release(h.data(), h.size());
  EXPECT_EQ(p.stats().pinned, 0u);
  EXPECT_CODE(p.pinned_block(h[0]), ErrorCode::kInvalidHandle);
  EXPECT_CODE(p.release(h.data(), 1), ErrorCode::kInvalidHandle);  // released twice
  EXPECT_EQ(match(p, ids), 10u) << "release must not drop the key";

  // acquire stops at the first missing key and counts the rest as misses.
  auto part = acquire(p, {1000, 1001, 7, 1002});
  EXPECT_EQ(part.size(), 2u);
  EXPECT_EQ(p.stats().counters[kCtrMisses], 2u);
  p.release(part.data(), part.size());
}

TEST_F(IndexTest, PinsAreCountedPerMember) {
  Pool& a = create(16);
  Pool& b = open_member();
  ASSERT_EQ(publish(a, {1}), 1u);
  auto h1 = acquire(a, {1});
  auto h2 = acquire(a, {1});
  auto hb = acquire(b, {1});
  ASSERT_EQ(h1.size(), 1u);
  ASSERT_EQ(h2, h1);
  ASSERT_EQ(hb, h1);
  a.release(h1.data(), 1);
  EXPECT_TRUE(holds(a.pinned_block(h2[0]), 1)) << "a's second pin went with its first";
  a.release(h2.data(), 1);
  EXPECT_CODE(a.pinned_block(h2[0]), ErrorCode::kInvalidHandle);
  EXPECT_EQ(a.stats().pinned, 1u) << "b's pin must survive a's releases";
  EXPECT_CODE(a.release(hb.data(), 1), ErrorCode::kInvalidHandle);  // a cannot drop b's pin
  b.release(hb.data(), 1);
  EXPECT_EQ(a.stats().pinned, 0u);
}

TEST_F(IndexTest, InsertIfAbsent) {
  Pool& p = create(16);
  EXPECT_EQ(publish(p, {42}, /*salt=*/1), 1u);
  EXPECT_EQ(publish(p, {42}, /*salt=*/2), 0u) << "a present key is not stored again";
  EXPECT_EQ(publish(p, {42, 43}, 2), 1u);
  // One batch naming a key twice stores it once.
  EXPECT_EQ(publish(p, {44, 44, 45}, 1), 2u);
  Stats st = p.stats();
  EXPECT_EQ(st.sealed, 4u);
  EXPECT_EQ(st.writing, 0u) << "the losing duplicate's block was not given back";
  EXPECT_EQ(st.counters[kCtrDuplicates], 3u);
  auto h = acquire(p, {42, 44});
  ASSERT_EQ(h.size(), 2u);
  EXPECT_TRUE(holds(p.pinned_block(h[0]), 42, 1)) << "the first publisher's bytes must stay";
  EXPECT_TRUE(holds(p.pinned_block(h[1]), 44, 1));
  p.release(h.data(), h.size());

  // Another member sees the same keys and does not duplicate them either.
  Pool& b = open_member();
  EXPECT_EQ(publish(b, {42, 43, 44, 45, 46}), 1u);
  EXPECT_EQ(b.stats().sealed, 5u);
}

TEST_F(IndexTest, EvictionRemovesKeysFromTheIndex) {
  Pool& p = create(16);
  const auto old_ids = range(0, 16), new_ids = range(100, 8);
  ASSERT_EQ(publish(p, old_ids), 16u);
  ASSERT_EQ(publish(p, new_ids), 8u);  // a full pool: 8 old keys must go
  EXPECT_EQ(match(p, new_ids), 8u);
  size_t still = 0;
  for (uint64_t id : old_ids) {
    size_t m = match(p, {id});
    still += m;
    auto h = acquire(p, {id});
    EXPECT_EQ(h.size(), m) << "match and acquire disagree on key " << id;
    if (!h.empty()) {
      EXPECT_TRUE(holds(p.pinned_block(h[0]), id)) << "a surviving key names another key's bytes";
      p.release(h.data(), 1);
    }
  }
  EXPECT_EQ(still, 8u);
  Stats st = p.stats();
  EXPECT_EQ(st.sealed, 16u);
  EXPECT_EQ(st.counters[kCtrEvictions], 8u);
  EXPECT_NO_THROW(p.check(true));
  // An evicted key can be published again.
  std::vector<uint64_t> gone;
  for (uint64_t id : old_ids)
    if (!match(p, {id})) gone.push_back(id);
  ASSERT_FALSE(gone.empty());
  EXPECT_EQ(publish(p, {gone[0]}), 1u);
  EXPECT_EQ(match(p, {gone[0]}), 1u);
}

// A handle names one generation of a block: once the block is evicted and
// reused for another key, the old handle must not reach the new content, and
// using it must not disturb the new holder.
TEST_F(IndexTest, StaleHandleAfterEvictionAndReuse) {
  Pool& p = create(8);
  ASSERT_EQ(publish(p, range(0, 8)), 8u);
  auto old = acquire(p, {0});
  ASSERT_EQ(old.size(), 1u);
  const uint64_t h_old = old[0];
  p.release(&h_old, 1);
  ASSERT_EQ(publish(p, range(100, 8)), 8u);  // every old key evicted
  EXPECT_EQ(match(p, {0}), 0u);
  auto fresh = acquire(p, range(100, 8));
  ASSERT_EQ(fresh.size(), 8u);
  uint64_t h_new = 0, id_new = 0;
  for (size_t i = 0; i < fresh.size(); ++i)
    if (word::handle_index(fresh[i]) == word::handle_index(h_old)) h_new = fresh[i], id_new = 100 + i;
  ASSERT_NE(h_new, 0u) << "the old block was not reused";
  ASSERT_NE(word::handle_gen(h_new), word::handle_gen(h_old));

  EXPECT_CODE(p.pinned_block(h_old), ErrorCode::kStaleHandle);
  std::vector<uint8_t> out(kBlockBytes);
  EXPECT_CODE(p.copy_out(&h_old, 1, out.data(), kBlockBytes), ErrorCode::kStaleHandle);
  EXPECT_CODE(p.writable_block(h_old), ErrorCode::kStaleHandle);
  EXPECT_CODE(p.free(&h_old, 1), ErrorCode::kStaleHandle);
  // Releasing the old handle again is a misuse; it must not drop the pin that
  // the new handle (same block, newer generation) holds.
  EXPECT_CODE(p.release(&h_old, 1), ErrorCode::kStaleHandle);
  const bool pin_kept = p.stats().pinned == 8u;
  EXPECT_TRUE(pin_kept) << "release(stale handle) dropped the pin that the block's new key holds";
  try {
    EXPECT_TRUE(holds(p.pinned_block(h_new), id_new));
  } catch (const Error& e) {
    ADD_FAILURE() << "the new handle lost its pin: " << e.what();
  }
  if (!pin_kept) {
    // The consequence: the block behind a handle still held is evictable.
    ASSERT_EQ(publish(p, {999}), 1u);
    EXPECT_TRUE(holds(p.block_data(word::handle_index(h_new)), id_new))
        << "the block behind a held handle was evicted and overwritten";
  }
  for (uint64_t h : fresh) {
    try {
      p.release(&h, 1);
    } catch (const Error&) {
    }
  }
}

TEST_F(IndexTest, FullPoolWithEverythingPinned) {
  Pool& p = create(8);
  ASSERT_EQ(publish(p, range(0, 8)), 8u);
  auto pins = acquire(p, range(0, 8));
  ASSERT_EQ(pins.size(), 8u);
  try {
    publish(p, {50});
    ADD_FAILURE() << "published into a pool whose every block is pinned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFull) << e.what();
    EXPECT_NE(std::string(e.what()).find("8 pinned"), std::string::npos) << e.what();
  }
  EXPECT_EQ(match(p, {50}), 0u);
  EXPECT_EQ(match(p, range(0, 8)), 8u);
  Stats st = p.stats();
  EXPECT_EQ(st.writing, 0u);
  EXPECT_EQ(st.sealed, 8u);
  EXPECT_NO_THROW(p.check(true));
  p.release(pins.data(), 4);
  EXPECT_EQ(publish(p, {50}), 1u);
  p.release(pins.data() + 4, 4);
}

TEST_F(IndexTest, ReserveCommitAbort) {
  Pool& p = create(16);
  Pool& other = open_member();
  ASSERT_EQ(publish(p, {1}), 1u);
  auto k = keys_for({1, 2, 3, 4});
  int64_t pos[4];
  uint64_t h[4];
  ASSERT_EQ(p.reserve(k.data(), 4, pos, h), 3u);  // key 1 is present already
  EXPECT_EQ(pos[0], 1);
  EXPECT_EQ(pos[2], 3);
  EXPECT_EQ(match(p, {2}), 0u) << "a reserved block is not matchable before commit";
  EXPECT_EQ(p.reserve(k.data() + 16, 1, pos, h + 3), 0u) << "a reserved key is not reserved twice";
  EXPECT_EQ(publish(other, {2}), 0u) << "another member must not store a key being written";
  EXPECT_NO_THROW(p.check(true));
  fill_block(2, 0, p.writable_block(h[0]));
  fill_block(3, 0, p.writable_block(h[1]));
  p.commit(h, 2);
  p.abort_writes(h + 2, 1);  // key 4 abandoned
  EXPECT_EQ(match(p, {1, 2, 3}), 3u);
  EXPECT_EQ(match(p, {4}), 0u);
  EXPECT_CODE(p.commit(h + 2, 1), ErrorCode::kStaleHandle);  // aborted: its handle is dead
  EXPECT_EQ(p.stats().writing, 0u);
  EXPECT_NO_THROW(p.check(true));
  // A member that closes mid-write takes its reservations out of the index.
  auto k5 = keys_for({5});
  ASSERT_EQ(other.reserve(k5.data(), 1, pos, h), 1u);
  other.close();
  EXPECT_EQ(p.stats().writing, 0u);
  EXPECT_EQ(publish(p, {5}), 1u);
}

TEST_F(IndexTest, ChecksumMismatchIsDetected) {
  Pool& p = create(8, /*checksums=*/true);
  ASSERT_TRUE(p.block_checksums());
  ASSERT_EQ(publish(p, {7, 8}), 2u);
  auto h = acquire(p, {7, 8});
  ASSERT_EQ(h.size(), 2u);
  p.release(h.data(), 2);
  p.block_data(word::handle_index(h[1]))[100] ^= 0x40;  // the memory went bad
  std::vector<uint64_t> out(2);
  auto k = keys_for({7, 8});
  EXPECT_CODE(p.acquire(k.data(), 2, out.data()), ErrorCode::kChecksum);
  Stats st = p.stats();
  EXPECT_EQ(st.pinned, 0u) << "a failed acquire must not keep pins";
  EXPECT_EQ(st.counters[kCtrChecksumErrors], 1u);
  EXPECT_EQ(p.acquire(k.data(), 1, out.data()), 1u);  // the good block is still served
  p.release(out.data(), 1);
}

}  // namespace
}  // namespace pykvshm
