// Allocator throughput: alloc + free of blocks on one pool, one JSON line per case.
//
//   pykvshm_alloc_bench [--seconds S] [--blocks N]
//
// Cases: 1 thread with batches of 1 and 64 blocks, and 2 threads (each its own
// Pool object, i.e. its own member) with the same batches.  A "block op" is one
// block allocated and freed again; blocks_per_s counts them over all threads.
// The pool stays mostly free, so this measures the claim / release path, not
// the full-pool or eviction path.
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "pykvshm/errors.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"

namespace {

using Clock = std::chrono::steady_clock;
using pykvshm::Pool;

struct Result {
  uint64_t blocks = 0, calls = 0;
};

// alloc(batch) / free(batch) until `stop`; checks the clock only through `stop`.
Result run_one(Pool& p, size_t batch, const std::atomic<bool>& stop) {
  std::vector<uint64_t> h(batch);
  Result r;
  while (!stop.load(std::memory_order_relaxed)) {
    for (int k = 0; k < 64; ++k) {
      p.alloc(batch, false, h.data());
      p.free(h.data(), batch);
    }
    r.blocks += 64 * batch;
    r.calls += 64 * 2;
  }
  return r;
}

void bench_case(const std::string& name, uint64_t pool_blocks, int threads, size_t batch, double seconds) {
  std::vector<std::unique_ptr<Pool>> members;
  for (int t = 0; t < threads; ++t) members.push_back(Pool::open(name, pykvshm::PoolOptions{}));
  // Warm-up: touch the whole state array once from each member.
  for (auto& m : members) {
    std::vector<uint64_t> all(m->num_blocks() / size_t(threads));
    m->alloc(all.size(), false, all.data());
    m->free(all.data(), all.size());
  }
  std::atomic<bool> stop{false};
  std::barrier start(threads + 1);
  std::vector<Result> res(static_cast<size_t>(threads));
  std::vector<std::thread> th;
  for (int t = 0; t < threads; ++t)
    th.emplace_back([&, t] {
      start.arrive_and_wait();
      res[size_t(t)] = run_one(*members[size_t(t)], batch, stop);
    });
  start.arrive_and_wait();
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop.store(true, std::memory_order_relaxed);
  for (auto& x : th) x.join();
  const double el = std::chrono::duration<double>(Clock::now() - t0).count();
  Result total;
  for (auto& r : res) total.blocks += r.blocks, total.calls += r.calls;
  const double bps = double(total.blocks) / el;
  std::printf(
      "{\"bench\": \"alloc_free\", \"threads\": %d, \"members\": %d, \"batch\": %zu, \"seconds\": %.3f, "
      "\"pool_blocks\": %llu, \"blocks\": %llu, \"blocks_per_s\": %.0f, \"ns_per_block\": %.1f, \"calls_per_s\": %.0f}\n",
      threads, threads, batch, el, (unsigned long long)pool_blocks, (unsigned long long)total.blocks, bps,
      1e9 * double(threads) / bps, double(total.calls) / el);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  uint64_t blocks = 4096;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--blocks" && i + 1 < argc) {
      blocks = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--blocks N]\n", argv[0]);
      return 2;
    }
  }
  const std::string name = "pykvshm-alloc-bench-" + std::to_string(getpid());
  // 512-byte blocks: the allocator does not touch block data, so size is irrelevant.
  const pykvshm::GeometryIn g{2, 2, 8, 4, 1, 2};
  pykvshm::PoolOptions opt;
  opt.map.prefault = true;
  int rc = 0;
  try {
    auto owner = Pool::create(name, g, (2ull << 20) + blocks * 512, opt);
    blocks = owner->num_blocks();
    for (int threads : {1, 2})
      for (size_t batch : {size_t(1), size_t(64)}) bench_case(name, blocks, threads, batch, seconds);
    owner->check(true);
  } catch (const pykvshm::Error& e) {
    std::fprintf(stderr, "alloc_bench: %s\n", e.what());
    rc = 1;
  }
  try {
    pykvshm::Mapping::destroy(name);
  } catch (const pykvshm::Error&) {
  }
  return rc;
}
