// One atomic word type for everything that lives in shared memory.
//
// Processes share these words through a MAP_SHARED mapping, so they must be
// address-free: a lock-based std::atomic (libatomic's fallback) would lock a
// process-local mutex and silently stop being atomic across processes.  The
// static_asserts make that impossible.  Every operation names its memory order.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace pykvshm {

template <typename T>
struct ShmAtomic {
  static_assert(std::is_integral_v<T>, "shared atomics are plain integers (offsets, indices, words)");
  static_assert(std::atomic<T>::is_always_lock_free, "a shared atomic must be lock-free to be process-shared");
  std::atomic<T> v;

  static constexpr std::memory_order failure_order(std::memory_order mo) noexcept {
    switch (mo) {
      case std::memory_order_seq_cst: return std::memory_order_seq_cst;
      case std::memory_order_relaxed:
      case std::memory_order_release: return std::memory_order_relaxed;
      default: return std::memory_order_acquire;
    }
  }

  T load(std::memory_order mo) const noexcept { return v.load(mo); }
  void store(T x, std::memory_order mo) noexcept { v.store(x, mo); }
  T exchange(T x, std::memory_order mo) noexcept { return v.exchange(x, mo); }
  bool cas(T& expected, T desired, std::memory_order mo) noexcept {
    return v.compare_exchange_strong(expected, desired, mo, failure_order(mo));
  }
  T fetch_add(T x, std::memory_order mo) noexcept { return v.fetch_add(x, mo); }
  T fetch_sub(T x, std::memory_order mo) noexcept { return v.fetch_sub(x, mo); }
  T fetch_or(T x, std::memory_order mo) noexcept { return v.fetch_or(x, mo); }
  T fetch_and(T x, std::memory_order mo) noexcept { return v.fetch_and(x, mo); }
};

using Atomic64 = ShmAtomic<uint64_t>;
using Atomic32 = ShmAtomic<uint32_t>;
static_assert(sizeof(Atomic64) == 8 && alignof(Atomic64) == 8);
static_assert(sizeof(Atomic32) == 4 && alignof(Atomic32) == 4);

}  // namespace pykvshm
