#include "pykvshm/mapping.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "pykvshm/errors.h"

#ifndef MPOL_BIND
#define MPOL_BIND 2
#endif
#ifndef MPOL_MF_STRICT
#define MPOL_MF_STRICT (1 << 0)
#define MPOL_MF_MOVE (1 << 1)
#endif

namespace pykvshm {
namespace {

std::string errno_text(int e) { return std::string(std::strerror(e)); }

uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

bool is_hugetlbfs(int fd, uint64_t* page) {
  struct statfs sf {};
  if (fstatfs(fd, &sf) != 0) return false;
  if (static_cast<unsigned long>(sf.f_type) != HUGETLBFS_MAGIC) return false;
  *page = static_cast<uint64_t>(sf.f_bsize);
  return true;
}

void bind_node(uint8_t* base, uint64_t size, int node) {
  char path[96];
  std::snprintf(path, sizeof path, "/sys/devices/system/node/node%d", node);
  struct stat st {};
  if (node < 0 || node >= 1024 || stat(path, &st) != 0)
    raise(ErrorCode::kPlacement, "NUMA node " + std::to_string(node) + " does not exist on this machine (" +
                                     std::string(path) + " is missing)");
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[size_t(node) / (8 * sizeof(unsigned long))] |= 1ul << (size_t(node) % (8 * sizeof(unsigned long)));
  long rc = syscall(SYS_mbind, base, size, MPOL_BIND, mask, 1024ul, MPOL_MF_STRICT | MPOL_MF_MOVE);
  if (rc != 0) {
    int e = errno;
    raise(ErrorCode::kPlacement, "mbind to NUMA node " + std::to_string(node) + " failed: " + errno_text(e));
  }
}

}  // namespace

Mapping::Mapping(Mapping&& o) noexcept { *this = std::move(o); }

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = o.fd_; base_ = o.base_; size_ = o.size_; file_size_ = o.file_size_;
    name_ = std::move(o.name_); path_ = std::move(o.path_); backend_ = o.backend_;
    huge_ = o.huge_; huge_page_size_ = o.huge_page_size_;
    o.fd_ = -1; o.base_ = nullptr; o.size_ = 0;
  }
  return *this;
}

Mapping::~Mapping() { unmap(); }

void Mapping::unmap() noexcept {
  if (base_) munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Backend Mapping::backend_for(const std::string& name) {
  if (name.empty()) raise(ErrorCode::kInvalidName, "pool name is empty");
  if (name.size() > 4000) raise(ErrorCode::kInvalidName, "pool name is too long");
  if (name.find('\0') != std::string::npos) raise(ErrorCode::kInvalidName, "pool name contains a NUL byte");
  if (name[0] == '/') {
    // An absolute path.  Refuse ".." components: a pool path is given, not computed.
    size_t pos = 0;
    while (pos < name.size()) {
      size_t next = name.find('/', pos + 1);
      std::string comp = name.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
      if (comp == "..") raise(ErrorCode::kInvalidName, "pool path '" + name + "' contains '..'");
      if (next == std::string::npos) break;
      pos = next;
    }
    if (name.back() == '/') raise(ErrorCode::kInvalidName, "pool path '" + name + "' names a directory");
    return name.rfind("/dev/dax", 0) == 0 ? Backend::kDevDax : Backend::kFile;
  }
  // A POSIX shm name: one path component of safe characters.
  if (name.size() > 200) raise(ErrorCode::kInvalidName, "shm pool name is longer than 200 characters");
  if (name == "." || name == "..") raise(ErrorCode::kInvalidName, "pool name '" + name + "' is not a valid shm name");
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok)
      raise(ErrorCode::kInvalidName, "pool name '" + name +
                                         "' is not a valid shm name (use letters, digits, '-', '_', '.', or an absolute path)");
  }
  return Backend::kShm;
}

std::string Mapping::shm_path(const std::string& name) { return "/dev/shm/" + name; }

uint64_t Mapping::devdax_size(int fd, const std::string& path) {
  struct stat st {};
  if (fstat(fd, &st) != 0) raise(ErrorCode::kPool, "fstat " + path + ": " + errno_text(errno));
  char sys[128];
  std::snprintf(sys, sizeof sys, "/sys/dev/char/%u:%u/size", major(st.st_rdev), minor(st.st_rdev));
  std::ifstream in(sys);
  uint64_t size = 0;
  if (!(in >> size) || size == 0)
    raise(ErrorCode::kPool, "cannot read the size of device DAX " + path + " from " + sys);
  return size;
}

Mapping Mapping::create(const std::string& name, uint64_t size, const MapOptions& opt) {
  Mapping m;
  m.name_ = name;
  m.backend_ = backend_for(name);
  m.path_ = m.backend_ == Backend::kShm ? shm_path(name) : name;
  int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW;
  if (m.backend_ == Backend::kDevDax) {
    m.fd_ = ::open(m.path_.c_str(), flags);
    if (m.fd_ < 0) {
      int e = errno;
      raise(e == ENOENT ? ErrorCode::kNotFound : ErrorCode::kPool, "cannot open device DAX " + m.path_ + ": " + errno_text(e));
    }
    struct stat st {};
    fstat(m.fd_, &st);
    if (!S_ISCHR(st.st_mode)) raise(ErrorCode::kPool, m.path_ + " is not a character device");
    m.file_size_ = devdax_size(m.fd_, m.path_);
    m.huge_ = true;
    m.huge_page_size_ = 2ull << 20;
    m.map(opt);
    return m;
  }
  if (m.backend_ == Backend::kShm) {
    m.fd_ = shm_open(("/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL, static_cast<mode_t>(opt.mode));
  } else {
    m.fd_ = ::open(m.path_.c_str(), flags | O_CREAT | O_EXCL, static_cast<mode_t>(opt.mode));
  }
  if (m.fd_ < 0) {
    int e = errno;
    if (e == EEXIST) raise(ErrorCode::kExists, "pool '" + name + "' already exists (" + m.path_ + ")");
    if (e == ENOENT) raise(ErrorCode::kNotFound, "cannot create pool '" + name + "': directory does not exist");
    raise(ErrorCode::kPool, "cannot create pool '" + name + "': " + errno_text(e));
  }
  // shm_open applies the umask; make the mode exactly what the caller asked.
  fchmod(m.fd_, static_cast<mode_t>(opt.mode));
  try {
    uint64_t page = 4096;
    if (is_hugetlbfs(m.fd_, &m.huge_page_size_)) {
      m.huge_ = true;
      page = m.huge_page_size_;
    } else if (opt.huge_pages) {
      page = 2ull << 20;
    }
    m.file_size_ = round_up(size, page);
    if (ftruncate(m.fd_, static_cast<off_t>(m.file_size_)) != 0)
      raise(ErrorCode::kPool, "cannot size pool file " + m.path_ + ": " + errno_text(errno));
    m.map(opt);
    if (!m.huge_) {
      int rc = posix_fallocate(m.fd_, 0, static_cast<off_t>(m.file_size_));
      if (rc == ENOSPC)
        raise(ErrorCode::kFull, "not enough space for a " + std::to_string(m.file_size_ >> 20) + " MiB pool in the filesystem of " + m.path_);
      if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL)
        raise(ErrorCode::kPool, "cannot allocate pool file " + m.path_ + ": " + errno_text(rc));
    }
  } catch (...) {
    ::unlink(m.path_.c_str());
    throw;
  }
  return m;
}

Mapping Mapping::open(const std::string& name, const MapOptions& opt) {
  (void)opt;
  Mapping m;
  m.name_ = name;
  m.backend_ = backend_for(name);
  m.path_ = m.backend_ == Backend::kShm ? shm_path(name) : name;
  if (m.backend_ == Backend::kShm)
    m.fd_ = shm_open(("/" + name).c_str(), O_RDWR, 0);
  else
    m.fd_ = ::open(m.path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (m.fd_ < 0) {
    int e = errno;
    if (e == ENOENT) raise(ErrorCode::kNotFound, "pool '" + name + "' does not exist (" + m.path_ + ")");
    if (e == ELOOP) raise(ErrorCode::kInvalidName, "pool path " + m.path_ + " is a symbolic link; refusing to follow it");
    raise(ErrorCode::kPool, "cannot open pool '" + name + "': " + errno_text(e));
  }
  struct stat st {};
  if (fstat(m.fd_, &st) != 0) raise(ErrorCode::kPool, "fstat " + m.path_ + ": " + errno_text(errno));
  if (S_ISCHR(st.st_mode)) {
    m.backend_ = Backend::kDevDax;
    m.file_size_ = devdax_size(m.fd_, m.path_);
    m.huge_ = true;
    m.huge_page_size_ = 2ull << 20;
  } else if (S_ISREG(st.st_mode)) {
    m.file_size_ = static_cast<uint64_t>(st.st_size);
    is_hugetlbfs(m.fd_, &m.huge_page_size_) && (m.huge_ = true);
  } else {
    raise(ErrorCode::kCorrupt, "pool '" + name + "' (" + m.path_ + ") is not a regular file or device DAX");
  }
  return m;
}

std::vector<uint8_t> Mapping::read_prefix(size_t n) const {
  std::vector<uint8_t> buf(n);
  size_t got = 0;
  while (got < n) {
    ssize_t r = pread(fd_, buf.data() + got, n - got, static_cast<off_t>(got));
    if (r < 0) {
      if (errno == EINTR) continue;
      raise(ErrorCode::kPool, "cannot read " + path_ + ": " + errno_text(errno));
    }
    if (r == 0) break;
    got += size_t(r);
  }
  buf.resize(got);
  return buf;
}

void Mapping::map(const MapOptions& opt) {
  if (base_) return;
  int flags = MAP_SHARED | (opt.prefault ? MAP_POPULATE : 0);
  void* p = mmap(nullptr, file_size_, PROT_READ | PROT_WRITE, flags, fd_, 0);
  if (p == MAP_FAILED) raise(ErrorCode::kPool, "cannot map pool " + path_ + ": " + errno_text(errno));
  base_ = static_cast<uint8_t*>(p);
  size_ = file_size_;
  if (opt.prefault) {
    // MAP_POPULATE maps a shared mapping's pages read-only, so the first store
    // to each page still faults.  MADV_POPULATE_WRITE (Linux 5.14) installs
    // writable entries without touching the data; older kernels keep MAP_POPULATE's.
    constexpr int kMadvPopulateWrite = 23;
    (void)madvise(base_, size_, kMadvPopulateWrite);
  }
  if (opt.huge_pages && !huge_) {
    if (madvise(base_, size_, MADV_HUGEPAGE) != 0) {
      int e = errno;
      unmap();
      raise(ErrorCode::kPlacement, "huge pages are not available for " + path_ + " (madvise MADV_HUGEPAGE: " + errno_text(e) +
                                       "); use a hugetlbfs path or huge_pages=False");
    }
  }
  if (opt.numa_node >= 0) {
    try {
      bind_node(base_, size_, opt.numa_node);
    } catch (...) {
      unmap();
      throw;
    }
  }
}

void Mapping::destroy(const std::string& name) {
  Backend b = backend_for(name);
  if (b == Backend::kShm) {
    if (shm_unlink(("/" + name).c_str()) != 0) {
      int e = errno;
      if (e == ENOENT) raise(ErrorCode::kNotFound, "pool '" + name + "' does not exist");
      raise(ErrorCode::kPool, "cannot remove pool '" + name + "': " + errno_text(e));
    }
    return;
  }
  int fd = ::open(name.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    int e = errno;
    if (e == ENOENT) raise(ErrorCode::kNotFound, "pool '" + name + "' does not exist");
    raise(ErrorCode::kPool, "cannot open pool '" + name + "': " + errno_text(e));
  }
  struct stat st {};
  fstat(fd, &st);
  if (S_ISCHR(st.st_mode)) {
    // A device cannot be unlinked, and device DAX supports no write(2): map its first
    // 2 MiB (the device's alignment) and wipe the superblock page so it is no pool any more.
    void* p = mmap(nullptr, 2ull << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) raise(ErrorCode::kPool, "cannot map device " + name + " to wipe its superblock: " + errno_text(errno));
    std::memset(p, 0, 4096);
    msync(p, 4096, MS_SYNC);
    munmap(p, 2ull << 20);
    return;
  }
  ::close(fd);
  if (::unlink(name.c_str()) != 0) raise(ErrorCode::kPool, "cannot remove pool '" + name + "': " + errno_text(errno));
}

}  // namespace pykvshm
