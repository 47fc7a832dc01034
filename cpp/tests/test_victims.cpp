// pin_victims: the demoter's view of the next evictions (victims.cpp, docs/design/tiering.md).
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "test_support.h"

using namespace pykvshm;
using namespace pykvshm::testing;

namespace {

// Block content implied by its key: the 16 key bytes repeated.
void key_of(uint64_t id, uint8_t out[16]) {
  const uint64_t k0 = id * 0x9E3779B97F4A7C15ull + 1, k1 = ~id;
  std::memcpy(out, &k0, 8);
  std::memcpy(out + 8, &k1, 8);
}

bool holds_key(const uint8_t* block, const uint8_t* key) {
  for (uint64_t off = 0; off < kBlockBytes; off += 16)
    if (std::memcmp(block + off, key, 16) != 0) return false;
  return true;
}

class VictimsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->name();
    for (char& c : name_)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') c = '_';
  }
  void TearDown() override {
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }
  static size_t publish(Pool& p, uint64_t first, size_t n) {
    std::vector<uint8_t> keys(16 * n), src(kBlockBytes * n);
    for (size_t j = 0; j < n; ++j) {
      key_of(first + j, &keys[16 * j]);
      for (uint64_t off = 0; off < kBlockBytes; off += 16) std::memcpy(&src[j * kBlockBytes + off], &keys[16 * j], 16);
    }
    return p.publish(keys.data(), n, src.data(), kBlockBytes);
  }
  std::string name_;
};

TEST_F(VictimsTest, PinsOnlySealedUnpinnedUntouchedBlocks) {
  auto p = Pool::create(name_, kSmall, (2ull << 20) + 32 * kBlockBytes, PoolOptions{});
  ASSERT_EQ(publish(*p, 0, 10), 10u);
  uint8_t k[16];
  key_of(0, k);
  uint64_t held;
  ASSERT_EQ(p->acquire(k, 1, &held), 1u);  // pinned by a reader and touched
  std::vector<uint64_t> h(32);
  std::vector<uint8_t> keys(16 * 32);
  const size_t n = p->pin_victims(32, h.data(), keys.data());
  EXPECT_EQ(n, 9u);
  for (size_t j = 0; j < n; ++j) {
    EXPECT_TRUE(holds_key(p->pinned_block(h[j]), &keys[16 * j]));
    EXPECT_NE(std::memcmp(&keys[16 * j], k, 16), 0);
  }
  EXPECT_EQ(p->stats().pinned, 10u);
  // Pinned, they cannot be evicted: 22 free blocks, and nothing else to take.
  std::vector<uint64_t> a(23);
  EXPECT_CODE(p->alloc(23, true, a.data()), ErrorCode::kFull);
  p->release(h.data(), n);
  p->release(&held, 1);
  EXPECT_EQ(p->pin_victims(0, h.data(), keys.data()), 0u);
  p->check(true);
}

TEST_F(VictimsTest, VictimsKeepTheirBytesWhilePublishersEvict) {
  constexpr uint64_t kBlocks = 64;
  auto p = Pool::create(name_, kSmall, (2ull << 20) + kBlocks * kBlockBytes, PoolOptions{});
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> victims{0}, wrong{0}, lost{0}, published{0};
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      uint64_t next = t << 40;
      while (!stop.load(std::memory_order_relaxed)) {
        try {
          published.fetch_add(publish(*p, next, 8), std::memory_order_relaxed);
        } catch (const Error& e) {
          if (e.code() != ErrorCode::kFull) throw;
        }
        next += 8;
      }
    });
  threads.emplace_back([&] {
    std::vector<uint64_t> h(8);
    std::vector<uint8_t> keys(16 * 8);
    while (!stop.load(std::memory_order_relaxed)) {
      const size_t n = p->pin_victims(8, h.data(), keys.data());
      victims.fetch_add(n, std::memory_order_relaxed);
      for (size_t j = 0; j < n; ++j) {
        if (!holds_key(p->pinned_block(h[j]), &keys[16 * j])) wrong.fetch_add(1, std::memory_order_relaxed);
        // Still in the index.  A lookup may miss it for a moment: an evictor that read its pin
        // count as 0 just before the pin CASes it to EVICTING, then sees the pin and puts it
        // back (index.md, "Evict vs pin").  A victim taken out of the index is never found again.
        bool found = false;
        for (int tries = 0; tries < 10000 && !found; ++tries) {
          found = p->match(&keys[16 * j], 1) == 1;
          if (!found) std::this_thread::yield();
        }
        if (!found) lost.fetch_add(1, std::memory_order_relaxed);
      }
      std::this_thread::yield();
      // Still the same bytes after the publishers had a chance to evict around them.
      for (size_t j = 0; j < n; ++j)
        if (!holds_key(p->pinned_block(h[j]), &keys[16 * j])) wrong.fetch_add(1, std::memory_order_relaxed);
      p->release(h.data(), n);
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  stop.store(true);
  for (auto& th : threads) th.join();
  EXPECT_GT(published.load(), 2 * kBlocks) << "the publishers never evicted";
  EXPECT_GT(victims.load(), 0u);
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_EQ(lost.load(), 0u);
  EXPECT_GT(p->stats().counters[layout::kCtrEvictions], 0u);
  p->check(true);
}

}  // namespace
