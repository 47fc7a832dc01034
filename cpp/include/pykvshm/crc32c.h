// CRC32C (Castagnoli).  Uses the SSE4.2 crc32 instruction when the CPU has it
// (checked once with CPUID), a table otherwise.  Same result either way.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pykvshm {

uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0) noexcept;
uint32_t crc32c_software(const void* data, size_t len, uint32_t crc = 0) noexcept;
bool crc32c_hardware_available() noexcept;

}  // namespace pykvshm
