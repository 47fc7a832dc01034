// Mapping a pool's backing memory: POSIX shm, a file (tmpfs, hugetlbfs, a DAX
// filesystem) or a device-DAX character device.  Owns the fd and the mapping.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pykvshm {

enum class Backend { kShm = 0, kFile = 1, kDevDax = 2 };

struct MapOptions {
  bool prefault = false;   // MAP_POPULATE: pay first-touch cost now, not on the hot path
  bool huge_pages = false; // hugetlbfs files are always huge; elsewhere MADV_HUGEPAGE (required to succeed)
  int numa_node = -1;      // mbind(MPOL_BIND) the mapping to this node (CXL memory is a CPU-less node)
  uint32_t mode = 0600;    // permission bits of a created file
};

class Mapping {
 public:
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  ~Mapping();

  // Backend from a user-facing name: an absolute path is a file (or a device-DAX
  // character device), anything else a POSIX shm name.  Validates the name.
  static Backend backend_for(const std::string& name);
  static std::string shm_path(const std::string& name);  // "/dev/shm/<name>"

  // Creates the backing store exclusively and maps it; `size` is rounded up to
  // the page or huge-page size.  Space is allocated up front (posix_fallocate),
  // so a full tmpfs is an error here instead of a SIGBUS later.  For device DAX
  // nothing is created: the device's size is used.
  static Mapping create(const std::string& name, uint64_t size, const MapOptions& opt);
  // Opens existing backing store.  Nothing is mapped or written yet: call
  // read_header() to validate, then map().
  static Mapping open(const std::string& name, const MapOptions& opt);

  uint64_t file_size() const { return file_size_; }
  // pread of the first `n` bytes (fewer if the file is shorter).
  std::vector<uint8_t> read_prefix(size_t n) const;
  void map(const MapOptions& opt);  // maps [0, file_size) shared, read-write
  void unmap() noexcept;

  uint8_t* base() const { return base_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  Backend backend() const { return backend_; }
  bool huge() const { return huge_; }

  // Removes a pool's backing store (unlink; for device DAX, zeroes the superblock page).
  static void destroy(const std::string& name);
  // Size of a device-DAX character device, from sysfs.
  static uint64_t devdax_size(int fd, const std::string& path);

 private:
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t file_size_ = 0;
  std::string name_, path_;
  Backend backend_ = Backend::kShm;
  bool huge_ = false;
  uint64_t huge_page_size_ = 0;
};

}  // namespace pykvshm
