// Where a pool's memory lives: sysfs lookups, NUMA binding and huge-page checks.
// Every "not available" case is a kPlacement error that names what was asked
// for, what the machine has, and the file the answer came from.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pykvshm::placement {

// Root of sysfs: $PYKVSHM_SYSFS or "/sys".  Tests point it at a fake tree.
std::string sysfs_root();

// Reads a small sysfs attribute; false if it cannot be read.  Trailing whitespace is cut.
bool read_attr(const std::string& path, std::string* out);
// Parses a decimal attribute (optionally negative) strictly; raises kPlacement naming `path`.
int64_t parse_int(const std::string& text, const std::string& path);
// Parses a node list such as "0-3,5" (sysfs cpulist/nodelist format); raises on garbage.
std::vector<int> parse_list(const std::string& text, const std::string& path);
std::string format_list(const std::vector<int>& v);  // "0, 1, 3" or "none"

// Raises kPlacement unless NUMA node `node` exists, is online and has memory
// (a CPU-less node, as CXL memory appears, is fine).
void check_node(int node);
// mbind(MPOL_BIND) of [base, base + size) to `node`; moves pages already there.
void bind_node(uint8_t* base, uint64_t size, int node);

// The mount a file descriptor lives on, from /proc/self/mountinfo.
struct MountInfo {
  std::string mount_point, fs_type, super_options;
};
bool mount_of(int fd, MountInfo* out);

// Huge pages of `page_bytes` that can still be mapped (free minus reserved), from
// <sysfs>/kernel/mm/hugepages/hugepages-<kB>kB; -1 when unknown.
int64_t hugetlb_pages_available(uint64_t page_bytes);
// Raises kPlacement when a hugetlbfs file of `bytes` cannot get its huge pages.
void check_hugetlb(uint64_t page_bytes, uint64_t bytes, int fd, const std::string& path);
// The message for a hugetlbfs mapping that failed with ENOMEM.
std::string hugetlb_shortage(uint64_t page_bytes, uint64_t bytes, int fd, const std::string& path);
// Raises kPlacement unless transparent huge pages can back this (shm or tmpfs) file:
// shmem THP not globally denied and the tmpfs mount has huge=always|within_size|advise
// (or a DAX filesystem, whose aligned mappings are huge by themselves).
void check_file_huge_pages(int fd, const std::string& path);

}  // namespace pykvshm::placement
