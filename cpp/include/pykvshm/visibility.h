// Making stores visible to other hosts on non-coherent shared memory (CXL 2.0
// memory shared by several hosts).  On coherent memory none of this is called.
//
// flush_range writes back every cache line of [p, p+n) (clwb if the CPU has it,
// else clflushopt, else clflush) and fences; invalidate_range drops the lines so
// the next load comes from the device (clflushopt/clflush evict; clwb does not).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pykvshm::visibility {

enum class FlushInsn { kNone = 0, kClflush = 1, kClflushopt = 2, kClwb = 3 };

FlushInsn detected_flush() noexcept;      // what flush_range uses on this CPU
FlushInsn detected_invalidate() noexcept; // what invalidate_range uses on this CPU
const char* name(FlushInsn f) noexcept;

void flush_range(const void* p, size_t n) noexcept;
void invalidate_range(const void* p, size_t n) noexcept;
void store_fence() noexcept;

// Process-wide counts of cache lines flushed / invalidated (tests check the
// non-coherent path really issues them).
uint64_t lines_flushed() noexcept;
uint64_t lines_invalidated() noexcept;

}  // namespace pykvshm::visibility
