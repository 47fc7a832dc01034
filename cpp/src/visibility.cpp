#include "pykvshm/visibility.h"

#include <atomic>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace pykvshm::visibility {
namespace {

constexpr uintptr_t kLine = 64;
std::atomic<uint64_t> g_flushed{0};
std::atomic<uint64_t> g_invalidated{0};

struct CpuFlags {
  bool clflush = false, clflushopt = false, clwb = false;
};

CpuFlags detect() noexcept {
  CpuFlags f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) f.clflush = (d & (1u << 19)) != 0;  // CPUID.1:EDX.CLFSH
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.clflushopt = (b & bit_CLFLUSHOPT) != 0;
    f.clwb = (b & bit_CLWB) != 0;
  }
#endif
  return f;
}

const CpuFlags& flags() noexcept {
  static const CpuFlags f = detect();
  return f;
}

#if defined(__x86_64__)
__attribute__((target("clwb"))) void clwb_lines(uintptr_t a, uintptr_t end) noexcept {
  for (; a < end; a += kLine) _mm_clwb(reinterpret_cast<void*>(a));
}
__attribute__((target("clflushopt"))) void clflushopt_lines(uintptr_t a, uintptr_t end) noexcept {
  for (; a < end; a += kLine) _mm_clflushopt(reinterpret_cast<void*>(a));
}
void clflush_lines(uintptr_t a, uintptr_t end) noexcept {
  for (; a < end; a += kLine) _mm_clflush(reinterpret_cast<void*>(a));
}
#endif

}  // namespace

FlushInsn detected_flush() noexcept {
  const auto& f = flags();
  if (f.clwb) return FlushInsn::kClwb;
  if (f.clflushopt) return FlushInsn::kClflushopt;
  if (f.clflush) return FlushInsn::kClflush;
  return FlushInsn::kNone;
}

FlushInsn detected_invalidate() noexcept {
  const auto& f = flags();
  if (f.clflushopt) return FlushInsn::kClflushopt;
  if (f.clflush) return FlushInsn::kClflush;
  return FlushInsn::kNone;
}

const char* name(FlushInsn f) noexcept {
  switch (f) {
    case FlushInsn::kClwb: return "clwb";
    case FlushInsn::kClflushopt: return "clflushopt";
    case FlushInsn::kClflush: return "clflush";
    default: return "none";
  }
}

void store_fence() noexcept {
#if defined(__x86_64__)
  _mm_sfence();
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

void flush_range(const void* p, size_t n) noexcept {
  if (n == 0) return;
  uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  g_flushed.fetch_add((end - a + kLine - 1) / kLine, std::memory_order_relaxed);
#if defined(__x86_64__)
  switch (detected_flush()) {
    case FlushInsn::kClwb: clwb_lines(a, end); break;
    case FlushInsn::kClflushopt: clflushopt_lines(a, end); break;
    case FlushInsn::kClflush: clflush_lines(a, end); break;
    default: break;
  }
#endif
  store_fence();
}

void invalidate_range(const void* p, size_t n) noexcept {
  if (n == 0) return;
  uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  g_invalidated.fetch_add((end - a + kLine - 1) / kLine, std::memory_order_relaxed);
#if defined(__x86_64__)
  switch (detected_invalidate()) {
    case FlushInsn::kClflushopt: clflushopt_lines(a, end); break;
    case FlushInsn::kClflush: clflush_lines(a, end); break;
    default: break;
  }
  _mm_mfence();
#endif
}

uint64_t lines_flushed() noexcept { return g_flushed.load(std::memory_order_relaxed); }
uint64_t lines_invalidated() noexcept { return g_invalidated.load(std::memory_order_relaxed); }

}  // namespace pykvshm::visibility
