// The noncoherent pool lock (host_lock.cpp) on its own: mutual exclusion among
// threads of several emulated hosts, a dead host passed over after its lease,
// the host table filling up.  Built with TSan by tests/test_cpp_core.py: the
// plain counter below is a data race unless the lock orders the critical sections.
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "pykvshm/host_lock.h"
#include "test_support.h"

namespace pykvshm {
namespace {

using namespace layout;
using Clock = std::chrono::steady_clock;

struct ControlPage {
  ControlPage() : p(static_cast<Control*>(std::aligned_alloc(kPageBytes, sizeof(Control)))) {
    std::memset(static_cast<void*>(p), 0, sizeof(Control));
  }
  ~ControlPage() { std::free(p); }
  Control* p;
};

constexpr uint64_t kLease = 10'000'000'000ull;

TEST(HostLock, MutualExclusionAmongHostsAndTheirThreads) {
  ControlPage page;
  constexpr int kThreads = 6;
  constexpr int kRounds = 300;
  const uint64_t hosts[kThreads] = {11, 11, 22, 22, 33, 44};  // two hosts with two threads each
  std::vector<HostLock> locks(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    locks[size_t(t)].init(page.p, hosts[t], kLease, 1000);
    locks[size_t(t)].join();
  }
  EXPECT_EQ(locks[0].line(), locks[1].line());
  EXPECT_NE(locks[0].line(), locks[2].line());
  EXPECT_NE(locks[4].line(), locks[5].line());
  uint64_t plain = 0;           // protected by the lock only
  std::atomic<int> inside{0};   // how many are inside at once
  std::atomic<int> overlaps{0};
  std::barrier start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      HostLock& l = locks[size_t(t)];
      start.arrive_and_wait();
      for (int r = 0; r < kRounds; ++r) {
        EXPECT_FALSE(l.lock());  // nobody died: never a takeover
        if (inside.fetch_add(1, std::memory_order_relaxed) != 0) overlaps.fetch_add(1, std::memory_order_relaxed);
        ++plain;
        inside.fetch_sub(1, std::memory_order_relaxed);
        l.unlock();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(plain, uint64_t(kThreads) * kRounds);
  for (auto& l : locks) EXPECT_EQ(l.acquisitions(), uint64_t(kRounds));
}

TEST(HostLock, AHostSilentPastTheLeaseIsPassedOver) {
  ControlPage page;
  constexpr uint64_t kShort = 200'000'000ull;  // 200 ms
  HostLock frozen, other;
  frozen.init(page.p, 1, kShort, 1000);
  other.init(page.p, 2, kShort, 1000);
  frozen.join();
  other.join();
  frozen.lock();  // and never again unlocks or beats, as a frozen or dead host
  const auto t0 = Clock::now();
  other.lock();
  const auto waited = Clock::now() - t0;
  EXPECT_GE(waited, std::chrono::milliseconds(100));
  EXPECT_LT(waited, std::chrono::seconds(5));
  EXPECT_GE(other.hosts_skipped(), 1u);
  other.unlock();
}

TEST(HostLock, TheHostTableHoldsSixteenLiveHosts) {
  ControlPage page;
  std::vector<HostLock> locks(kLockHosts + 1);
  for (uint32_t h = 0; h < kLockHosts; ++h) {
    locks[h].init(page.p, 100 + h, kLease, 1000);
    locks[h].join();
    EXPECT_EQ(locks[h].line(), h);
  }
  locks[kLockHosts].init(page.p, 999, kLease, 1000);
  EXPECT_CODE(locks[kLockHosts].join(), ErrorCode::kMembersFull);
  // A second process of a known host finds its line without claiming.
  HostLock again;
  again.init(page.p, 105, kLease, 1001);
  again.join();
  EXPECT_EQ(again.line(), 5u);
}

TEST(HostLock, ReleasedLockLeavesNoTicket) {
  ControlPage page;
  HostLock l;
  l.init(page.p, 7, kLease, 1000);
  l.join();
  l.lock();
  EXPECT_NE(page.p->hosts[l.line()].ticket.load(std::memory_order_relaxed), 0u);
  EXPECT_NE(page.p->hosts[l.line()].local.load(std::memory_order_relaxed), 0u);
  l.unlock();
  EXPECT_EQ(page.p->hosts[l.line()].ticket.load(std::memory_order_relaxed), 0u);
  EXPECT_EQ(page.p->hosts[l.line()].local.load(std::memory_order_relaxed), 0u);
}

}  // namespace
}  // namespace pykvshm
