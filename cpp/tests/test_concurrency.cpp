// Stress tests: threads (and processes) start together behind a barrier, hammer
// one pool for a fixed time, and then every invariant is checked exactly.
//
//  (a) alloc/free from several members at once.  A process-local ownership table
//      (one atomic per block: CAS 0 -> owner on alloc, owner -> 0 before free)
//      proves no block is ever held twice; each holder writes a pattern over the
//      whole block and checks it is intact before freeing.
//  (b) publishers of overlapping key sets against readers that acquire and
//      check every byte against what the key implies, in a pool much smaller
//      than the working set, so eviction runs all the time.
//  (c) (a) again with fork()ed processes, each its own member.
//
// ThreadSanitizer keys its shadow memory by virtual address.  Two Pool objects
// in one process are two mappings of the same pages at different addresses,
// so TSan cannot see the happens-before edges that run through the other
// mapping: a test where threads of different members touch the same block
// would show it false races.  The tests therefore either give each thread its
// own member and keep every mapping to one thread (a), or share one Pool object
// among all threads (a, b); (b) with one member per thread runs outside TSan.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"
#include "pykvshm/state.h"

#include "test_support.h"

#if defined(__SANITIZE_THREAD__)
#define PYKVSHM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PYKVSHM_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define PYKVSHM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PYKVSHM_ASAN 1
#endif
#endif

namespace pykvshm {
namespace {

using namespace layout;
using namespace ::pykvshm::testing;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kWords = kBlockBytes / 8;

// How long each stress test runs.  Sanitized builds run the same code several
// times slower, so they get less wall time; PYKVSHM_STRESS_SECONDS overrides
// (a soak: PYKVSHM_STRESS_SECONDS=60).
std::chrono::milliseconds stress_time() {
  if (const char* s = std::getenv("PYKVSHM_STRESS_SECONDS")) {
    double v = std::atof(s);
    if (v > 0) return std::chrono::milliseconds(int64_t(v * 1000));
  }
#if defined(PYKVSHM_TSAN)
  return std::chrono::milliseconds(600);
#elif defined(PYKVSHM_ASAN)
  return std::chrono::milliseconds(1200);
#else
  return std::chrono::milliseconds(2000);
#endif
}

std::string test_pool_name() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string n = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->test_suite_name() + "-" + info->name();
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  return n;
}

Control* control(Pool& p) {
  auto sb = reinterpret_cast<const Superblock*>(p.base());
  return reinterpret_cast<Control*>(p.base() + sb->regions[kRegionControl].offset);
}

// The pattern a holder writes into a block: a function of (holder, block, stamp).
uint64_t pattern_word(uint64_t holder, uint64_t index, uint64_t stamp, uint64_t w) {
  return word::mix64((holder << 56) ^ (index << 24) ^ (stamp << 8) ^ w);
}
void write_pattern(uint8_t* b, uint64_t holder, uint64_t index, uint64_t stamp) {
  for (uint64_t w = 0; w < kWords; ++w) {
    uint64_t x = pattern_word(holder, index, stamp, w);
    std::memcpy(b + 8 * w, &x, 8);
  }
}
bool pattern_intact(const uint8_t* b, uint64_t holder, uint64_t index, uint64_t stamp) {
  for (uint64_t w = 0; w < kWords; ++w) {
    uint64_t x;
    std::memcpy(&x, b + 8 * w, 8);
    if (x != pattern_word(holder, index, stamp, w)) return false;
  }
  return true;
}

// Block content implied by a key id (for (b)).
void key_of(uint64_t id, uint8_t* out) {
  uint64_t k0 = id ^ 0x5a5a000000000000ull, k1 = word::mix64(id) | 1;
  std::memcpy(out, &k0, 8);
  std::memcpy(out + 8, &k1, 8);
}
void content_of(uint64_t id, uint8_t* out) {
  for (uint64_t w = 0; w < kWords; ++w) {
    uint64_t x = word::mix64(id * 0x9e3779b97f4a7c15ull + w);
    std::memcpy(out + 8 * w, &x, 8);
  }
}
bool content_matches(const uint8_t* b, uint64_t id) {
  uint8_t want[kBlockBytes];
  content_of(id, want);
  return std::memcmp(b, want, kBlockBytes) == 0;
}

// Failures from worker threads or processes: counted, the first few described.
struct Failures {
  std::atomic<uint64_t> count{0};
  std::mutex mu;
  std::vector<std::string> first;
  void add(const std::string& what) {
    if (count.fetch_add(1, std::memory_order_relaxed) < 8) {
      std::lock_guard<std::mutex> lk(mu);
      first.push_back(what);
    }
  }
  std::string summary() {
    std::lock_guard<std::mutex> lk(mu);
    std::string s;
    for (auto& f : first) s += "\n  " + f;
    return s;
  }
};

// ---------------------------------------------------------------------------
// (a) alloc / free

struct HammerConfig {
  uint64_t holder;              // tag written into the ownership table and the pattern
  size_t max_batch = 16;
  size_t max_batches_held = 8;  // holders x batches x batch size > pool: alloc meets a full pool
};

struct HammerResult {
  uint64_t allocated = 0, freed = 0, full = 0, ops = 0;
};

// Alloc / write / verify / free on `p` until `stop`.  `owner` has one word per
// block; it lives in process memory (threads) or a shared anonymous mapping
// (processes).  Returns with every block it allocated freed again.
template <typename Report>
HammerResult hammer(Pool& p, std::atomic<uint32_t>* owner, const HammerConfig& cfg, const std::atomic<bool>& stop,
                    Report&& fail) {
  HammerResult r;
  std::mt19937_64 rng(cfg.holder * 7919 + 1);
  struct Batch {
    std::vector<uint64_t> h;
    uint64_t stamp;
  };
  std::deque<Batch> held;
  uint64_t stamp = 0;
  auto release_batch = [&](Batch& b) {
    for (uint64_t h : b.h) {
      uint64_t i = word::handle_index(h);
      if (!pattern_intact(p.block_data(i), cfg.holder, i, b.stamp))
        fail("block " + std::to_string(i) + " held by " + std::to_string(cfg.holder) + " was overwritten while held");
      uint32_t expect = uint32_t(cfg.holder);
      // SYNC POINT: test-owner-release.  Pairs with the acq_rel CAS in the
      // alloc path; the table is cleared before the block goes back.
      if (!owner[i].compare_exchange_strong(expect, 0, std::memory_order_release, std::memory_order_relaxed))
        fail("ownership table of block " + std::to_string(i) + " says " + std::to_string(expect) + ", not " +
             std::to_string(cfg.holder));
    }
    p.free(b.h.data(), b.h.size());
    r.freed += b.h.size();
  };
  while (!stop.load(std::memory_order_relaxed)) {
    ++r.ops;
    const bool do_alloc = held.empty() || (held.size() < cfg.max_batches_held && (rng() & 1));
    if (!do_alloc) {
      // Free a random held batch, not always the oldest.
      size_t j = size_t(rng() % held.size());
      std::swap(held[j], held.front());
      release_batch(held.front());
      held.pop_front();
      continue;
    }
    Batch b;
    b.h.resize(1 + size_t(rng() % cfg.max_batch));
    b.stamp = ++stamp;
    try {
      p.alloc(b.h.size(), false, b.h.data());
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kFull) throw;
      ++r.full;
      if (!held.empty()) {
        release_batch(held.front());
        held.pop_front();
      }
      continue;
    }
    r.allocated += b.h.size();
    for (uint64_t h : b.h) {
      uint64_t i = word::handle_index(h);
      uint32_t expect = 0;
      if (!owner[i].compare_exchange_strong(expect, uint32_t(cfg.holder), std::memory_order_acq_rel,
                                            std::memory_order_acquire))
        fail("block " + std::to_string(i) + " given to " + std::to_string(cfg.holder) + " while " + std::to_string(expect) +
             " holds it");
      write_pattern(p.writable_block(h), cfg.holder, i, b.stamp);
    }
    held.push_back(std::move(b));
  }
  while (!held.empty()) {
    release_batch(held.front());
    held.pop_front();
  }
  return r;
}

// After a stress run: a quiescent pool where every block is free, the
// invariants hold, and every block can be allocated at once.
void expect_all_free_and_usable(Pool& p, const std::string& name) {
  EXPECT_NO_THROW(p.check(true));
  Stats st = p.stats();
  EXPECT_EQ(st.free, st.total) << "blocks leaked: " << st.writing << " writing, " << st.evicting << " evicting";
  EXPECT_EQ(st.pinned, 0u);
  auto fresh = Pool::open(name, PoolOptions{});
  std::vector<uint64_t> all(fresh->num_blocks());
  const uint64_t hint = control(p)->free_hint.value.load(std::memory_order_relaxed);
  try {
    fresh->alloc(all.size(), false, all.data());
    fresh->free(all.data(), all.size());
  } catch (const Error& e) {
    ADD_FAILURE() << "with every block free, alloc(" << all.size() << ", evict=false) failed (free_hint was "
                  << int64_t(hint) << "): " << e.what();
  }
  fresh->close();
  EXPECT_NO_THROW(p.check(true));
}

class PoolFixture : public ::testing::Test {
 protected:
  void SetUp() override { name_ = test_pool_name(); }
  void TearDown() override {
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }
  std::string name_;
};

// Parameter bits: 1 = all threads share one pool handle (else one handle per
// thread); 2 = a noncoherent pool, whose per-thread handles alternate between
// this host and an emulated second one (two lines in the pool lock's bakery).
class AllocHammer : public PoolFixture, public ::testing::WithParamInterface<int> {
 public:
  static std::string param_name(const ::testing::TestParamInfo<int>& i) {
    return std::string(i.param & 1 ? "OneShared" : "OnePerThread") + (i.param & 2 ? "Noncoherent" : "");
  }

 protected:
  bool shared() const { return GetParam() & 1; }
  PoolOptions create_options() const {
    PoolOptions o;
    if (GetParam() & 2) o.coherence = layout::Coherence::kNoncoherent;
    return o;
  }
  PoolOptions member_options(int t) const {
    PoolOptions o;
    if ((GetParam() & 2) && t % 2) o.host_id = 0x5151;
    return o;
  }
};

TEST_P(AllocHammer, NoBlockHeldTwice) {
  const bool shared_member = shared();
  constexpr int kThreads = 4;
  constexpr uint64_t kBlocks = 128;
  auto main_pool = Pool::create(name_, kSmall, (2ull << 20) + kBlocks * kBlockBytes, create_options());
  ASSERT_EQ(main_pool->num_blocks(), kBlocks);
  std::vector<std::unique_ptr<Pool>> members;
  if (!shared_member)
    for (int t = 0; t < kThreads; ++t) members.push_back(Pool::open(name_, member_options(t)));

  std::vector<std::atomic<uint32_t>> owner(kBlocks);
  for (auto& o : owner) o.store(0, std::memory_order_relaxed);
  std::atomic<bool> stop{false};
  std::barrier start(kThreads + 1);
  Failures failures;
  std::vector<HammerResult> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Pool& p = shared_member ? *main_pool : *members[size_t(t)];
      HammerConfig cfg{uint64_t(t + 1)};
      start.arrive_and_wait();
      try {
        results[size_t(t)] = hammer(p, owner.data(), cfg, stop, [&](const std::string& w) { failures.add(w); });
      } catch (const std::exception& e) {
        failures.add("thread " + std::to_string(t) + ": " + e.what());
      }
    });
  }
  start.arrive_and_wait();
  const auto deadline = Clock::now() + stress_time();
  uint64_t checks = 0;
  while (Clock::now() < deadline) {
    // The structural invariants hold at every instant, not only at rest.
    if (shared_member || checks % 4 == 0) {
      try {
        main_pool->check(false);
      } catch (const Error& e) {
        failures.add(std::string("check(false) during the run: ") + e.what());
      }
    }
    ++checks;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  stop.store(true, std::memory_order_relaxed);
  for (auto& th : threads) th.join();

  EXPECT_EQ(failures.count.load(), 0u) << failures.summary();
  uint64_t allocated = 0, freed = 0, full = 0, ops = 0;
  for (auto& r : results) allocated += r.allocated, freed += r.freed, full += r.full, ops += r.ops;
  EXPECT_EQ(allocated, freed);
  EXPECT_GT(allocated, 0u);
  for (int t = 0; t < kThreads; ++t) EXPECT_GT(results[size_t(t)].allocated, 0u) << "thread " << t << " never allocated";
  uint64_t still_owned = 0;
  for (uint64_t i = 0; i < kBlocks; ++i) still_owned += owner[i].load() != 0;
  EXPECT_EQ(still_owned, 0u) << "blocks the ownership table still assigns to a thread";
  EXPECT_EQ(main_pool->stats().counters[kCtrAllocs], allocated) << "the pool's alloc counter disagrees with the threads";
  members.clear();  // detach the members: their counters retire into the pool
  EXPECT_EQ(main_pool->stats().counters[kCtrAllocs], allocated);
  expect_all_free_and_usable(*main_pool, name_);
  std::printf("[   info   ] %s: %llu ops, %llu blocks allocated, %llu full\n", shared_member ? "shared" : "per-thread",
              (unsigned long long)ops, (unsigned long long)allocated, (unsigned long long)full);
}

INSTANTIATE_TEST_SUITE_P(Members, AllocHammer, ::testing::Values(0, 1, 2, 3), AllocHammer::param_name);

// ---------------------------------------------------------------------------
// (b) publish / acquire with eviction

class IndexHammer : public AllocHammer {};

TEST_P(IndexHammer, ReadersSeeTheBytesTheirKeysImply) {
  const bool shared_member = shared();
#if defined(PYKVSHM_TSAN)
  if (!shared_member) GTEST_SKIP() << "several mappings in one process hide happens-before edges from TSan";
#endif
  constexpr int kPublishers = 2, kReaders = 2;
  constexpr uint64_t kBlocks = 64, kKeys = 384, kMaxRun = 12;  // working set 6x the pool
  auto main_pool = Pool::create(name_, kSmall, (2ull << 20) + kBlocks * kBlockBytes, create_options());
  ASSERT_EQ(main_pool->num_blocks(), kBlocks);
  std::vector<std::unique_ptr<Pool>> members;
  if (!shared_member)
    for (int t = 0; t < kPublishers + kReaders; ++t) members.push_back(Pool::open(name_, member_options(t)));

  std::atomic<bool> stop{false};
  std::barrier start(kPublishers + kReaders + 1);
  Failures failures;
  std::atomic<uint64_t> published{0}, full{0}, hits{0}, verified_bytes{0}, acquires{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kPublishers + kReaders; ++t) {
    threads.emplace_back([&, t] {
      Pool& p = shared_member ? *main_pool : *members[size_t(t)];
      const bool publisher = t < kPublishers;
      std::mt19937_64 rng(uint64_t(t) * 104729 + 3);
      std::vector<uint8_t> keys(16 * kMaxRun), src(kBlockBytes * kMaxRun), out(kBlockBytes * kMaxRun);
      std::vector<uint64_t> h(kMaxRun);
      start.arrive_and_wait();
      try {
        while (!stop.load(std::memory_order_relaxed)) {
          // Runs of consecutive ids from a small key space: publishers overlap
          // each other and readers ask for what was (or is being) published.
          const uint64_t first = rng() % (kKeys - kMaxRun), n = 1 + rng() % kMaxRun;
          for (uint64_t j = 0; j < n; ++j) key_of(first + j, &keys[16 * j]);
          if (publisher) {
            for (uint64_t j = 0; j < n; ++j) content_of(first + j, &src[kBlockBytes * j]);
            try {
              published.fetch_add(p.publish(keys.data(), n, src.data(), kBlockBytes), std::memory_order_relaxed);
            } catch (const Error& e) {
              if (e.code() != ErrorCode::kFull) throw;
              full.fetch_add(1, std::memory_order_relaxed);
            }
            continue;
          }
          const size_t m = p.acquire(keys.data(), n, h.data());
          acquires.fetch_add(1, std::memory_order_relaxed);
          hits.fetch_add(m, std::memory_order_relaxed);
          for (size_t j = 0; j < m; ++j)
            if (!content_matches(p.pinned_block(h[j]), first + j))
              failures.add("key " + std::to_string(first + j) + " acquired as block " +
                           std::to_string(word::handle_index(h[j])) + " holds other bytes");
          if (m && (rng() & 1)) {
            // Hold the pins a while longer (evictors keep running) and read again.
            p.copy_out(h.data(), m, out.data(), kBlockBytes);
            for (size_t j = 0; j < m; ++j)
              if (!content_matches(&out[kBlockBytes * j], first + j))
                failures.add("copy_out of key " + std::to_string(first + j) + " returned other bytes");
          }
          verified_bytes.fetch_add(m * kBlockBytes, std::memory_order_relaxed);
          p.release(h.data(), m);
        }
      } catch (const std::exception& e) {
        failures.add(std::string(publisher ? "publisher " : "reader ") + std::to_string(t) + ": " + e.what());
      }
    });
  }
  start.arrive_and_wait();
  std::this_thread::sleep_for(stress_time());
  stop.store(true, std::memory_order_relaxed);
  for (auto& th : threads) th.join();

  EXPECT_EQ(failures.count.load(), 0u) << failures.summary();
  Stats st = main_pool->stats();
  EXPECT_GT(published.load(), kBlocks) << "the run never filled the pool";
  EXPECT_GT(st.counters[kCtrEvictions], 0u) << "eviction never ran";
  EXPECT_GT(hits.load(), 0u) << "no reader ever found a key";
  EXPECT_EQ(st.counters[kCtrPublished], published.load());
  EXPECT_EQ(st.writing + st.evicting, 0u) << "blocks left mid-write";
  EXPECT_EQ(st.pinned, 0u) << "pins leaked";
  EXPECT_EQ(st.free + st.sealed, st.total);
  EXPECT_NO_THROW(main_pool->check(true));

  // At rest, every key still in the index holds its own bytes.
  uint64_t present = 0;
  for (uint64_t id = 0; id < kKeys; ++id) {
    uint8_t k[16];
    key_of(id, k);
    uint64_t h = 0;
    if (main_pool->acquire(k, 1, &h) == 0) continue;
    ++present;
    EXPECT_TRUE(content_matches(main_pool->pinned_block(h), id)) << "key " << id << " at rest";
    main_pool->release(&h, 1);
  }
  EXPECT_EQ(present, st.sealed) << "sealed blocks that no key reaches";
  members.clear();
  EXPECT_NO_THROW(main_pool->check(true));
  std::printf("[   info   ] %s: %llu published, %llu acquires, %llu hits, %llu full, %llu evictions\n",
              shared_member ? "shared" : "per-thread", (unsigned long long)published.load(),
              (unsigned long long)acquires.load(), (unsigned long long)hits.load(), (unsigned long long)full.load(),
              (unsigned long long)st.counters[kCtrEvictions]);
}

INSTANTIATE_TEST_SUITE_P(Members, IndexHammer, ::testing::Values(0, 1, 2, 3), AllocHammer::param_name);

// ---------------------------------------------------------------------------
// (c) (a) with processes

// Lives in a MAP_SHARED anonymous mapping inherited by the children.
struct ForkShared {
  std::atomic<uint32_t> ready;
  std::atomic<uint32_t> go;
  std::atomic<bool> stop;
  std::atomic<uint64_t> allocated[16];
  std::atomic<uint64_t> failures;
  // followed by the ownership table: one std::atomic<uint32_t> per block
};

enum ChildStatus : int { kChildOk = 0, kChildHeldTwice = 2, kChildSetup = 3, kChildError = 4, kChildNoStart = 5 };

[[noreturn]] void child_main(const std::string& name, ForkShared* sh, std::atomic<uint32_t>* owner, uint64_t holder) {
  int status = kChildOk;
  try {
    auto p = Pool::open(name, PoolOptions{});
    sh->ready.fetch_add(1, std::memory_order_acq_rel);
    const auto give_up = Clock::now() + std::chrono::seconds(30);
    while (!sh->go.load(std::memory_order_acquire)) {
      if (Clock::now() > give_up) _exit(kChildNoStart);
      std::this_thread::yield();
    }
    HammerConfig cfg{holder};
    HammerResult r = hammer(*p, owner, cfg, sh->stop, [&](const std::string&) {
      sh->failures.fetch_add(1, std::memory_order_relaxed);
      status = kChildHeldTwice;
    });
    sh->allocated[holder].store(r.allocated, std::memory_order_relaxed);
    if (r.allocated != r.freed) status = kChildError;
    p->close();
  } catch (...) {
    status = status ? status : kChildError;
  }
  _exit(status);
}

class ForkHammer : public PoolFixture {};

// Opening a pool starts the process's heartbeat thread.  A child forked while
// that thread is still starting up can inherit a sanitizer allocator lock held
// by it (GCC 12's ASan does not lock its allocator around fork) and deadlock in
// its first malloc.  Wait until the thread has beaten once, so it sleeps.
void wait_for_heartbeat_thread(Pool& p) {
  auto sb = reinterpret_cast<const Superblock*>(p.base());
  auto* slot = reinterpret_cast<const MemberSlot*>(p.base() + sb->regions[kRegionMembers].offset) + p.member_slot();
  const uint64_t first = slot->heartbeat_ns.load(std::memory_order_acquire);
  const auto give_up = Clock::now() + std::chrono::seconds(1);
  while (slot->heartbeat_ns.load(std::memory_order_acquire) == first && Clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

TEST_F(ForkHammer, ProcessesNeverHoldABlockTwice) {
#if defined(PYKVSHM_TSAN)
  // Opening a pool starts the process's heartbeat thread, so the parent is
  // multi-threaded when it forks, and TSan refuses threads in such a child.
  // TSan could not see across processes anyway; ASan and plain builds run this.
  GTEST_SKIP() << "TSan does not support starting threads in the child of a multi-threaded fork()";
#endif
  constexpr int kChildren = 3;
  constexpr uint64_t kBlocks = 128;
  auto main_pool = Pool::create(name_, kSmall, (2ull << 20) + kBlocks * kBlockBytes, PoolOptions{});
  ASSERT_EQ(main_pool->num_blocks(), kBlocks);
  wait_for_heartbeat_thread(*main_pool);
  const size_t shared_bytes = sizeof(ForkShared) + kBlocks * sizeof(std::atomic<uint32_t>);
  void* mem = mmap(nullptr, shared_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free);
  auto* sh = new (mem) ForkShared{};  // zero-filled anonymous memory; atomics value-initialised
  auto* owner = reinterpret_cast<std::atomic<uint32_t>*>(static_cast<uint8_t*>(mem) + sizeof(ForkShared));
  for (uint64_t i = 0; i < kBlocks; ++i) new (&owner[i]) std::atomic<uint32_t>(0);

  std::vector<pid_t> kids;
  for (int c = 0; c < kChildren; ++c) {
    std::fflush(nullptr);
    pid_t pid = fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) child_main(name_, sh, owner, uint64_t(c + 1));
    kids.push_back(pid);
  }
  // Wait for every child to attach; stop early if one has already exited.
  const auto wait_ready = Clock::now() + std::chrono::seconds(30);
  bool child_gone = false;
  while (sh->ready.load(std::memory_order_acquire) < kChildren && Clock::now() < wait_ready && !child_gone) {
    siginfo_t si{};
    si.si_pid = 0;
    if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid != 0) child_gone = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(sh->ready.load(), uint32_t(kChildren)) << "children did not attach";
  sh->go.store(1, std::memory_order_release);
  const auto deadline = Clock::now() + stress_time();
  while (Clock::now() < deadline) {
    try {
      main_pool->check(false);
    } catch (const Error& e) {
      ADD_FAILURE() << "check(false) during the run: " << e.what();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  sh->stop.store(true, std::memory_order_release);

  const auto wait_exit = Clock::now() + std::chrono::seconds(20);
  for (pid_t pid : kids) {
    int st = 0;
    pid_t r = 0;
    while ((r = waitpid(pid, &st, WNOHANG)) == 0 && Clock::now() < wait_exit)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (r == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      ADD_FAILURE() << "child " << pid << " hung and was killed";
      continue;
    }
    ASSERT_EQ(r, pid);
    EXPECT_TRUE(WIFEXITED(st)) << "child " << pid << " died of signal " << (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    if (WIFEXITED(st)) {
      EXPECT_EQ(WEXITSTATUS(st), kChildOk) << "child " << pid << " (2 = a block held twice or overwritten, 4 = error)";
    }
  }
  EXPECT_EQ(sh->failures.load(), 0u);
  uint64_t allocated = 0;
  for (int c = 1; c <= kChildren; ++c) {
    EXPECT_GT(sh->allocated[c].load(), 0u) << "child " << c << " never allocated";
    allocated += sh->allocated[c].load();
  }
  uint64_t still_owned = 0;
  for (uint64_t i = 0; i < kBlocks; ++i) still_owned += owner[i].load() != 0;
  EXPECT_EQ(still_owned, 0u) << "blocks the ownership table still assigns to a child";
  Stats st = main_pool->stats();
  EXPECT_EQ(st.members, 1u) << "children did not detach";
  EXPECT_EQ(st.counters[kCtrAllocs], allocated);
  expect_all_free_and_usable(*main_pool, name_);
  munmap(mem, shared_bytes);
  std::printf("[   info   ] %d processes: %llu blocks allocated\n", kChildren, (unsigned long long)allocated);
}

// (d) close() while other threads are inside calls.  Each call holds a Pool::Call
// (as the Python binding does): once close() begins, new calls throw kClosed and
// close() waits for those in flight before it unmaps.  Under ASan a call running on
// the unmapped pool would be a SEGV; under TSan close's unmap would race the calls.
TEST(CloseWhileInCalls, CallsFinishOrFailCleanly) {
  const std::string name = test_pool_name();
  PoolOptions opt;
  for (int round = 0; round < 20; ++round) {
    auto pool = Pool::create(name, kSmall, 4ull << 20, opt);
    Mapping::destroy(name);  // the mapping stays; nothing is left behind if a check fails
    std::vector<uint8_t> keys(16 * 32), src(32 * kBlockBytes, 0x5a);
    for (uint64_t j = 0; j < 32; ++j) {
      const uint64_t k[2] = {word::mix64(j + 1), word::mix64(j + 1000)};
      std::memcpy(keys.data() + 16 * j, k, 16);
    }
    ASSERT_EQ(pool->publish(keys.data(), 32, src.data(), kBlockBytes), 32u);
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> calls{0}, unexpected{0};
    std::barrier go(5);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::vector<uint64_t> hs(32);
        std::vector<uint8_t> dst(32 * kBlockBytes);
        go.arrive_and_wait();
        while (!stop.load(std::memory_order_relaxed)) {
          try {
            Pool::Call call(*pool);
            if (t % 2 == 0) {
              (void)pool->match(keys.data(), 32);
              (void)pool->stats();
            } else {
              size_t n = pool->acquire(keys.data(), 32, hs.data());
              pool->copy_out(hs.data(), n, dst.data(), kBlockBytes);
              pool->release(hs.data(), n);
            }
            calls.fetch_add(1, std::memory_order_relaxed);
          } catch (const Error& e) {
            if (e.code() != ErrorCode::kClosed) unexpected.fetch_add(1);
            return;
          }
        }
      });
    }
    go.arrive_and_wait();
    std::this_thread::sleep_for(std::chrono::milliseconds(1 + round % 5));
    pool->close();
    EXPECT_TRUE(pool->closed());
    stop.store(true);
    for (auto& th : threads) th.join();
    EXPECT_EQ(unexpected.load(), 0u);
    EXPECT_CODE(Pool::Call c(*pool), ErrorCode::kClosed);
  }
}

}  // namespace
}  // namespace pykvshm
