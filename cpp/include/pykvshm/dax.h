// Device DAX (/dev/daxX.Y): which devices exist, their sysfs attributes, and which
// pool (by uuid) each holds.  The same device has different names on different
// hosts, so a pool on device DAX is found by the uuid in its superblock.
//
// Where devices are looked for: <sysfs>/bus/dax/devices/daxX.Y (sysfs from
// placement::sysfs_root(), $PYKVSHM_SYSFS) and the device node <dev dir>/daxX.Y
// ($PYKVSHM_DAX_DEV_DIR, default /dev).  When the device directory is not /dev,
// a regular file there stands in for the character device; everything else
// (sysfs size and alignment, no ftruncate, the superblock wipe on destroy) is
// the same code.  A regular file in /dev itself is refused.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace pykvshm::dax {

constexpr uint64_t kMinAlign = 2ull << 20;  // a pool on device DAX is mapped in 2 MiB pages

std::string dev_dir();                         // $PYKVSHM_DAX_DEV_DIR or "/dev"
bool is_device_name(const std::string& base);  // "dax<N>.<M>"
bool is_device_path(const std::string& path);  // /dev/dax... or <dev dir>/daxN.M

struct Attributes {
  std::string sysfs_dir;  // the device's sysfs directory the values came from
  uint64_t size = 0;      // bytes; a multiple of align
  uint64_t align = 0;     // mapping alignment, >= kMinAlign
  int target_node = -1;   // NUMA node of the memory; -1 when sysfs does not say
  bool stand_in = false;  // a regular file standing in for the device (tests)
};
// Attributes of the device open at `fd`.  Raises a clear error when it is not a
// character device (nor a permitted stand-in), or its size is missing, zero or
// not a multiple of its alignment.
Attributes attributes(int fd, const std::string& path);

// What one device holds, read without mapping it (open O_RDONLY, pread).
struct Probe {
  std::string name, path;
  uint64_t size = 0;
  bool is_pool = false;            // the pykvshm magic and a valid superblock checksum
  std::array<uint8_t, 16> uuid{};  // when is_pool
  std::string note;                // a human description: "pykvshm pool <uuid>", "not a pykvshm pool", ...
};
std::vector<Probe> scan();
// The path of the one device whose pool has this uuid.  kNotFound (listing what
// was scanned) when none, kPool when several devices claim it.
std::string find_pool(const std::array<uint8_t, 16>& uuid);

std::string format_uuid(const uint8_t* u);

}  // namespace pykvshm::dax
