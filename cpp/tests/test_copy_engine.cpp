// The copy engine: kernels are bit-exact at every alignment and size, jobs run in order with
// their completions, a failed job fails its group and skips the group's later jobs, batches split
// over several threads land exactly, and destruction drains the queue.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "pykvshm/copy_engine.h"

namespace pykvshm {
namespace {

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = uint8_t(rng());
  return v;
}

TEST(CopyKernels, StreamIsBitExactAtEveryAlignmentAndSize) {
  const auto src = random_bytes(1 << 16, 1);
  for (size_t so : {0u, 1u, 7u, 16u, 33u}) {
    for (size_t dof : {0u, 3u, 15u, 64u}) {
      for (size_t n : {0u, 1u, 63u, 255u, 256u, 257u, 4095u, 4096u, 65000u - 64u}) {
        std::vector<uint8_t> dst(n + 128, 0xAB);
        stream_copy(dst.data() + dof, src.data() + so, n);
        ASSERT_EQ(0, std::memcmp(dst.data() + dof, src.data() + so, n)) << so << " " << dof << " " << n;
        for (size_t i = 0; i < dof; ++i) ASSERT_EQ(dst[i], 0xAB);  // nothing written before the span
        for (size_t i = dof + n; i < dst.size(); ++i) ASSERT_EQ(dst[i], 0xAB);  // nor after it
      }
    }
  }
}

TEST(CopyKernels, AutoPicksStreamForLargeBatches) {
  EXPECT_EQ(resolve_kernel(CopyKernel::kAuto, 4096), CopyKernel::kMemcpy);
  EXPECT_EQ(resolve_kernel(CopyKernel::kAuto, kStreamThreshold), CopyKernel::kStream);
  EXPECT_EQ(resolve_kernel(CopyKernel::kMemcpy, kStreamThreshold * 4), CopyKernel::kMemcpy);
}

TEST(CopyEngine, JobsRunInOrderWithTheirCompletions) {
  CopyEngine eng(1);
  auto g = std::make_shared<CopyGroup>();
  const auto src = random_bytes(1 << 20, 2);
  std::vector<uint8_t> dst(1 << 20, 0);
  std::vector<size_t> order;
  for (size_t j = 0; j < 16; ++j) {
    const size_t chunk = (1 << 20) / 16;
    eng.submit(g, {{dst.data() + j * chunk, src.data() + j * chunk, chunk}}, [&order, &dst, &src, j, chunk] {
      // The job's bytes are in place when its completion runs.
      if (std::memcmp(dst.data() + j * chunk, src.data() + j * chunk, chunk) != 0) throw std::runtime_error("early");
      order.push_back(j);
    });
  }
  g->wait();
  EXPECT_EQ(dst, src);
  std::vector<size_t> want(16);
  std::iota(want.begin(), want.end(), size_t{0});
  EXPECT_EQ(order, want);
  EXPECT_EQ(eng.jobs_done(), 16u);
}

TEST(CopyEngine, AFailedJobFailsItsGroupAndSkipsItsLaterJobs) {
  CopyEngine eng(1);
  auto bad = std::make_shared<CopyGroup>();
  auto good = std::make_shared<CopyGroup>();
  std::atomic<int> ran{0};
  eng.submit(bad, {}, [] { throw std::runtime_error("layer 3: a consumer aborted"); });
  eng.submit(bad, {}, [&] { ++ran; });   // skipped: its group already failed
  eng.submit(good, {}, [&] { ran += 10; });  // another group is not affected
  EXPECT_THROW(
      {
        try {
          bad->wait();
        } catch (const std::runtime_error& e) {
          EXPECT_STREQ(e.what(), "layer 3: a consumer aborted");
          throw;
        }
      },
      std::runtime_error);
  good->wait();
  EXPECT_EQ(ran.load(), 10);
  EXPECT_TRUE(bad->idle());
  bad->wait();  // the error was reported once
}

TEST(CopyEngine, SeveralThreadsSplitABatchExactly) {
  for (unsigned threads : {2u, 3u, 4u}) {
    CopyEngine eng(threads, CopyKernel::kStream);
    const size_t n = (8u << 20) + 12345;
    const auto src = random_bytes(n, threads);
    std::vector<uint8_t> dst(n, 0);
    // Uneven spans, so part boundaries fall inside spans.
    std::vector<CopySpan> spans;
    size_t off = 0, len = 1000;
    while (off < n) {
      size_t take = std::min(len, n - off);
      spans.push_back({dst.data() + off, src.data() + off, take});
      off += take;
      len = len * 3 % 700001 + 1;
    }
    eng.run(spans.data(), spans.size());
    ASSERT_EQ(dst, src) << threads << " threads, synchronous";
    std::fill(dst.begin(), dst.end(), 0);
    auto g = std::make_shared<CopyGroup>();
    eng.submit(g, spans);
    g->wait();
    ASSERT_EQ(dst, src) << threads << " threads, queued";
  }
}

TEST(CopyEngine, DestructionDrainsTheQueue) {
  const auto src = random_bytes(4 << 20, 3);
  std::vector<uint8_t> dst(4 << 20, 0);
  auto g = std::make_shared<CopyGroup>();
  {
    CopyEngine eng(2);
    for (size_t j = 0; j < 64; ++j) eng.submit(g, {{dst.data() + j * 65536, src.data() + j * 65536, 65536}});
  }
  EXPECT_TRUE(g->idle());
  EXPECT_EQ(dst, src);
}

}  // namespace
}  // namespace pykvshm
