#include "pykvshm/mapping.h"

#include <fcntl.h>
#include <pwd.h>
#include <linux/magic.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "pykvshm/dax.h"
#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/placement.h"

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

bool has_pool_magic(int fd) {
  char magic[sizeof layout::kMagic] = {};
  ssize_t r;
  do r = pread(fd, magic, sizeof magic, 0);
  while (r < 0 && errno == EINTR);
  return r == ssize_t(sizeof magic) && std::memcmp(magic, layout::kMagic, sizeof magic) == 0;
}

// Placement requests that can be refused before anything exists.
void check_placement(const MapOptions& opt) {
  if (opt.numa_node < -1) raise(ErrorCode::kPlacement, "NUMA node " + std::to_string(opt.numa_node) + " is not a node number");
  if (opt.numa_node >= 0) placement::check_node(opt.numa_node);
}

std::string user_text(uid_t uid) {
  std::string s = "uid " + std::to_string(uid);
  char buf[1024];
  passwd pw{}, *found = nullptr;
  if (getpwuid_r(uid, &pw, buf, sizeof buf, &found) == 0 && found) s += " (" + std::string(pw.pw_name) + ")";
  return s;
}

// Attaching shares every KV block with whoever controls the file: refuse a file another
// user made (a squatter who created the name first) or one others may write.
void check_trusted(const std::string& name, const std::string& path, const struct stat& st, bool allow_group_write) {
  const uid_t me = geteuid();
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
  const std::string anyway = "open it with allow_foreign=True (CLI: --allow-foreign)";
  if (st.st_uid != me)
    raise(ErrorCode::kUntrusted,
          "pool '" + name + "' (" + path + ") is owned by " + user_text(st.st_uid) + ", not by this process's user (" +
              user_text(me) + "); another local user may have created the name first to read or alter the KV "
              "blocks of whoever attaches. If that user shares the pool with you on purpose, " + anyway +
              "; otherwise have it removed (`pykvshm destroy --force " + name + "` as its owner or root) or use "
              "another name");
  if ((st.st_mode & 022) && !allow_group_write)
    raise(ErrorCode::kUntrusted,
          "pool '" + name + "' (" + path + ") is writable by " + ((st.st_mode & 002) ? "every local user" : "its group") +
              " (mode " + mode + "), so others can alter its KV blocks. If the pool is shared on purpose, " + anyway +
              "; otherwise `chmod go-w " + path + "` as its owner");
}

}  // namespace

Mapping::Mapping(Mapping&& o) noexcept { *this = std::move(o); }

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = o.fd_; base_ = o.base_; size_ = o.size_; file_size_ = o.file_size_;
    name_ = std::move(o.name_); path_ = std::move(o.path_); backend_ = o.backend_;
    huge_ = o.huge_; huge_page_size_ = o.huge_page_size_;
    numa_node_ = o.numa_node_; device_node_ = o.device_node_; prefaulted_ = o.prefaulted_;
    read_only_ = o.read_only_;
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
    return dax::is_device_path(name) ? Backend::kDevDax : Backend::kFile;
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

void Mapping::open_device(int flags) {
  fd_ = ::open(path_.c_str(), flags | O_CLOEXEC | O_NOFOLLOW);
  if (fd_ < 0) {
    int e = errno;
    if (e == ENOENT) raise(ErrorCode::kNotFound, "device DAX " + path_ + " does not exist");
    if (e == ELOOP) raise(ErrorCode::kInvalidName, "pool path " + path_ + " is a symbolic link; refusing to follow it");
    raise(ErrorCode::kPool, "cannot open device DAX " + path_ + ": " + errno_text(e));
  }
  dax::Attributes a = dax::attributes(fd_, path_);
  backend_ = Backend::kDevDax;
  file_size_ = a.size;
  huge_ = true;
  huge_page_size_ = a.align;
  device_node_ = a.target_node;
}

Mapping Mapping::create(const std::string& name, uint64_t size, const MapOptions& opt) {
  Mapping m;
  m.name_ = name;
  m.backend_ = backend_for(name);
  m.path_ = m.backend_ == Backend::kShm ? shm_path(name) : name;
  check_placement(opt);
  if (opt.mode & ~0777u)
    raise(ErrorCode::kPool, "mode " + std::to_string(opt.mode) + " has bits beyond the permission bits (setuid, setgid, "
                            "sticky); a pool file takes permission bits only");
  // The creator's mapping is only for initialising the metadata; Pool::open maps
  // again and prefaults then (after posix_fallocate has reserved the space, so a
  // full filesystem is ENOSPC here, not a fault).
  MapOptions init = opt;
  init.prefault = false;
  int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW;
  if (m.backend_ == Backend::kDevDax) {
    m.open_device(O_RDWR);
    // Refuse a device holding a pool before mapping it writable.
    if (has_pool_magic(m.fd_))
      raise(ErrorCode::kExists, "device " + m.path_ + " already holds a pykvshm pool; destroy it first");
    m.map(init);
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
  // Held until this mapping is dropped (Pool::create drops it after publishing the
  // layout version): an opener that finds no superblock yet tells a creator at work
  // (locked) from one that died (unlocked) with creator_at_work().
  (void)flock(m.fd_, LOCK_EX | LOCK_NB);
  // shm_open applies the umask; make the mode exactly what the caller asked.
  fchmod(m.fd_, static_cast<mode_t>(opt.mode));
  try {
    uint64_t page = 4096;
    if (is_hugetlbfs(m.fd_, &m.huge_page_size_)) {
      m.huge_ = true;
      page = m.huge_page_size_;
      placement::check_hugetlb(page, round_up(size, page), m.fd_, m.path_);
    } else if (opt.huge_pages) {
      placement::check_file_huge_pages(m.fd_, m.path_);
      page = 2ull << 20;
    }
    m.file_size_ = round_up(size, page);
    if (ftruncate(m.fd_, static_cast<off_t>(m.file_size_)) != 0)
      raise(ErrorCode::kPool, "cannot size pool file " + m.path_ + ": " + errno_text(errno));
    m.map(init);
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
  Mapping m;
  m.name_ = name;
  m.backend_ = backend_for(name);
  m.path_ = m.backend_ == Backend::kShm ? shm_path(name) : name;
  // A read-only mapping is for watching a pool: it places nothing (a NUMA policy on
  // a shared object would change it for every process) and faults nothing in.
  m.read_only_ = opt.read_only;
  if (m.read_only_ && (opt.prefault || opt.huge_pages || opt.numa_node >= 0))
    raise(ErrorCode::kPlacement, "a read-only attach takes no placement options (prefault, huge pages, NUMA node)");
  check_placement(opt);
  const int access = m.read_only_ ? O_RDONLY : O_RDWR;
  if (m.backend_ == Backend::kDevDax) {
    m.open_device(access);
    return m;
  }
  if (m.backend_ == Backend::kShm)
    m.fd_ = shm_open(("/" + name).c_str(), access, 0);
  else
    m.fd_ = ::open(m.path_.c_str(), access | O_CLOEXEC | O_NOFOLLOW);
  if (m.fd_ < 0) {
    int e = errno;
    if (e == ENOENT) raise(ErrorCode::kNotFound, "pool '" + name + "' does not exist (" + m.path_ + ")");
    if (e == ELOOP) raise(ErrorCode::kInvalidName, "pool path " + m.path_ + " is a symbolic link; refusing to follow it");
    if (e == EACCES && !m.read_only_)
      raise(ErrorCode::kPool, "cannot open pool '" + name + "' for writing: " + errno_text(e) +
                                  " (with read permission only, watch it with Pool.open(name, read_only=True) or pykvshm stat)");
    raise(ErrorCode::kPool, "cannot open pool '" + name + "': " + errno_text(e));
  }
  struct stat st {};
  if (fstat(m.fd_, &st) != 0) raise(ErrorCode::kPool, "fstat " + m.path_ + ": " + errno_text(errno));
  if (S_ISCHR(st.st_mode)) {
    // A device DAX under another name (e.g. a udev alias).
    dax::Attributes a = dax::attributes(m.fd_, m.path_);
    m.backend_ = Backend::kDevDax;
    m.file_size_ = a.size;
    m.huge_ = true;
    m.huge_page_size_ = a.align;
    m.device_node_ = a.target_node;
  } else if (S_ISREG(st.st_mode)) {
    if (!opt.allow_foreign) check_trusted(name, m.path_, st, opt.allow_group_write);
    m.file_size_ = static_cast<uint64_t>(st.st_size);
    m.owner_uid_ = st.st_uid;
    m.file_mode_ = st.st_mode & 07777;
    auto ns = [](const timespec& t) { return uint64_t(t.tv_sec) * 1'000'000'000ull + uint64_t(t.tv_nsec); };
    m.changed_ns_ = std::max(ns(st.st_mtim), ns(st.st_ctim));
    if (is_hugetlbfs(m.fd_, &m.huge_page_size_)) m.huge_ = true;
    else if (opt.huge_pages) placement::check_file_huge_pages(m.fd_, m.path_);
  } else {
    raise(ErrorCode::kCorrupt, "pool '" + name + "' (" + m.path_ + ") is not a regular file or device DAX");
  }
  return m;
}

bool Mapping::creator_at_work() const {
  if (fd_ < 0 || backend_ == Backend::kDevDax) return false;
  if (flock(fd_, LOCK_SH | LOCK_NB) == 0) {
    (void)flock(fd_, LOCK_UN);
    return false;
  }
  return errno == EWOULDBLOCK;
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
  if (backend_ == Backend::kDevDax && opt.numa_node >= 0 && device_node_ != opt.numa_node)
    raise(ErrorCode::kPlacement, "device DAX " + path_ + " is memory of NUMA node " +
                                     (device_node_ < 0 ? std::string("unknown (sysfs has no target_node)")
                                                       : std::to_string(device_node_)) +
                                     ", not node " + std::to_string(opt.numa_node) +
                                     "; device memory cannot be moved (leave numa_node unset or pick the device on that node)");
  // No MAP_POPULATE: pages must not be faulted in before the NUMA policy is set.
  void* p = mmap(nullptr, file_size_, read_only_ ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    if (e == ENOMEM && huge_ && backend_ != Backend::kDevDax)
      raise(ErrorCode::kPlacement, placement::hugetlb_shortage(huge_page_size_, file_size_, fd_, path_));
    raise(ErrorCode::kPool, "cannot map pool " + path_ + ": " + errno_text(e));
  }
  base_ = static_cast<uint8_t*>(p);
  size_ = file_size_;
  try {
    if (opt.huge_pages && !huge_ && madvise(base_, size_, MADV_HUGEPAGE) != 0)
      raise(ErrorCode::kPlacement, "huge pages are not available for " + path_ + " (madvise MADV_HUGEPAGE: " +
                                       errno_text(errno) + "); use a hugetlbfs path or huge_pages=False");
    if (opt.numa_node >= 0 && backend_ != Backend::kDevDax) placement::bind_node(base_, size_, opt.numa_node);
    numa_node_ = opt.numa_node;
    if (opt.prefault) {
      // Writable page-table entries for every page, without touching the data
      // (MADV_POPULATE_WRITE, Linux 5.14).  Older kernels: read each page once.
      constexpr int kMadvPopulateWrite = 23;
      if (madvise(base_, size_, kMadvPopulateWrite) != 0) {
        int e = errno;
        if (e != EINVAL) {
          if (huge_ && backend_ != Backend::kDevDax && (e == ENOMEM || e == EFAULT))
            raise(ErrorCode::kPlacement, "prefault failed: " + placement::hugetlb_shortage(huge_page_size_, size_, fd_, path_));
          raise(ErrorCode::kPlacement, "prefault of " + path_ + " failed: " +
                                           (e == EFAULT ? std::string("a page could not be faulted in (its filesystem is full?)")
                                                        : errno_text(e)));
        }
        volatile const uint8_t* q = base_;
        uint8_t sink = 0;
        for (uint64_t off = 0; off < size_; off += page_size()) sink = uint8_t(sink ^ q[off]);
        (void)sink;
      }
      prefaulted_ = true;
    }
  } catch (...) {
    unmap();
    throw;
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
  if (S_ISCHR(st.st_mode) || b == Backend::kDevDax) {
    // A device cannot be unlinked, and device DAX supports no write(2): map its first
    // alignment unit and wipe the superblock page so it is no pool any more.
    uint64_t align = 0;
    try {
      align = dax::attributes(fd, name).align;
    } catch (...) {
      ::close(fd);
      throw;
    }
    if (!has_pool_magic(fd)) {
      ::close(fd);
      raise(ErrorCode::kNotFound, "device " + name + " holds no pykvshm pool; it was left untouched");
    }
    void* p = mmap(nullptr, align, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    ::close(fd);
    if (p == MAP_FAILED) raise(ErrorCode::kPool, "cannot map device " + name + " to wipe its superblock: " + errno_text(e));
    std::memset(p, 0, 4096);
    msync(p, 4096, MS_SYNC);
    munmap(p, align);
    return;
  }
  ::close(fd);
  if (::unlink(name.c_str()) != 0) raise(ErrorCode::kPool, "cannot remove pool '" + name + "': " + errno_text(errno));
}

}  // namespace pykvshm
