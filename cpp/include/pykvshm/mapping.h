// Mapping a pool's backing memory: POSIX shm, a file (tmpfs, hugetlbfs, a DAX
// filesystem) or a device-DAX character device.  Owns the fd and the mapping.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pykvshm {

enum class Backend { kShm = 0, kFile = 1, kDevDax = 2 };

struct MapOptions {
  bool prefault = false;   // fault every page in writable now (after binding), not on the hot path
  bool huge_pages = false; // hugetlbfs files and device DAX are always huge; tmpfs needs THP (checked)
  int numa_node = -1;      // mbind(MPOL_BIND) the mapping to this node (CXL memory is a CPU-less node);
                           // for device DAX: the device's memory must be on this node
  uint32_t mode = 0600;    // permission bits of a created file
  bool read_only = false;  // open: O_RDONLY and PROT_READ (a monitor); no placement, nothing written
  // open(): attach even to a file owned by another user or writable by group/others
  // (a pool shared between users on purpose).  Otherwise either is kUntrusted.
  bool allow_foreign = false;
  bool allow_group_write = false;  // the creator's own open of the pool it just made with such a mode
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
  // character device, see dax.h), anything else a POSIX shm name.  Validates the name.
  static Backend backend_for(const std::string& name);
  static std::string shm_path(const std::string& name);  // "/dev/shm/<name>"

  // Creates the backing store exclusively and maps it; `size` is rounded up to
  // the page or huge-page size.  Space is allocated up front (posix_fallocate),
  // so a full tmpfs is an error here instead of a SIGBUS later.  For device DAX
  // nothing is created, truncated or allocated: the device's sysfs size is used,
  // and a device that already holds a pool is refused (kExists) before it is mapped.
  // Placement (NUMA node, huge pages) is checked before anything is created.
  static Mapping create(const std::string& name, uint64_t size, const MapOptions& opt);
  // Opens existing backing store.  Nothing is mapped or written yet: call
  // read_header() to validate, then map().
  static Mapping open(const std::string& name, const MapOptions& opt);

  uint64_t file_size() const { return file_size_; }
  // From fstat of the opened file (regular files; 0 for device DAX): its owner, permission
  // bits and when it last changed (the later of mtime and ctime, ns since the epoch).
  uint32_t owner_uid() const { return owner_uid_; }
  uint32_t file_mode() const { return file_mode_; }
  uint64_t changed_ns() const { return changed_ns_; }
  // pread of the first `n` bytes (fewer if the file is shorter).
  std::vector<uint8_t> read_prefix(size_t n) const;
  void map(const MapOptions& opt);  // maps [0, file_size) shared, read-write (read-only if opened so)
  // True while a process creating this pool file still initialises it (create() holds
  // an exclusive flock on it until the creator drops its mapping).
  bool creator_at_work() const;
  void unmap() noexcept;

  uint8_t* base() const { return base_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  Backend backend() const { return backend_; }
  bool huge() const { return huge_; }
  uint64_t page_size() const { return huge_ ? huge_page_size_ : 4096; }
  int numa_node() const { return numa_node_; }        // the node this mapping was bound to (or checked), -1 none
  int device_node() const { return device_node_; }    // device DAX: NUMA node of its memory per sysfs, -1 unknown
  bool prefaulted() const { return prefaulted_; }
  bool read_only() const { return read_only_; }

  // Removes a pool's backing store (unlink; for device DAX, zeroes the superblock
  // page, and only when it holds a pykvshm pool).
  static void destroy(const std::string& name);

 private:
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t file_size_ = 0;
  uint32_t owner_uid_ = 0, file_mode_ = 0;
  uint64_t changed_ns_ = 0;
  std::string name_, path_;
  Backend backend_ = Backend::kShm;
  bool huge_ = false;
  uint64_t huge_page_size_ = 0;
  int numa_node_ = -1;
  int device_node_ = -1;
  bool prefaulted_ = false;
  bool read_only_ = false;

  void open_device(int flags);  // opens path_ as device DAX and reads its sysfs attributes
};

}  // namespace pykvshm
