#include "pykvshm/dax.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/placement.h"
#include "pykvshm/pool.h"

namespace pykvshm::dax {
namespace {

std::string mib(uint64_t b) {
  if (b % (1ull << 20) == 0) return std::to_string(b >> 20) + " MiB";
  return std::to_string(b) + " bytes";
}

std::string basename_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string dirname_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string devices_dir() { return placement::sysfs_root() + "/bus/dax/devices"; }

// "dax3.12" -> (3, 12), for a stable numeric order.
std::pair<unsigned long, unsigned long> order_key(const std::string& name) {
  auto dot = name.find('.');
  return {std::strtoul(name.c_str() + 3, nullptr, 10), std::strtoul(name.c_str() + dot + 1, nullptr, 10)};
}

uint64_t attr_u64(const std::string& dir, const char* attr, const std::string& path, bool required, bool* present) {
  std::string text;
  *present = placement::read_attr(dir + "/" + attr, &text);
  if (!*present) {
    if (required)
      raise(ErrorCode::kPool, "cannot read the " + std::string(attr) + " of device DAX " + path + " from " + dir + "/" +
                                  attr);
    return 0;
  }
  int64_t v = placement::parse_int(text, dir + "/" + attr);
  if (v < 0) raise(ErrorCode::kPool, dir + "/" + attr + " holds a negative value");
  return uint64_t(v);
}

}  // namespace

std::string dev_dir() {
  const char* env = std::getenv("PYKVSHM_DAX_DEV_DIR");
  std::string d = env && *env ? env : "/dev";
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

bool is_device_name(const std::string& base) {
  if (base.size() < 6 || base.size() > 32 || base.compare(0, 3, "dax") != 0) return false;
  size_t i = 3, digits = 0;
  while (i < base.size() && base[i] >= '0' && base[i] <= '9') ++i, ++digits;
  if (digits == 0 || i >= base.size() || base[i] != '.') return false;
  ++i;
  digits = 0;
  while (i < base.size() && base[i] >= '0' && base[i] <= '9') ++i, ++digits;
  return digits > 0 && i == base.size();
}

bool is_device_path(const std::string& path) {
  if (path.rfind("/dev/dax", 0) == 0) return true;
  return dirname_of(path) == dev_dir() && is_device_name(basename_of(path));
}

Attributes attributes(int fd, const std::string& path) {
  struct stat st {};
  if (fstat(fd, &st) != 0) raise(ErrorCode::kPool, "fstat " + path + ": " + std::strerror(errno));
  Attributes a;
  if (S_ISCHR(st.st_mode)) {
    a.sysfs_dir = placement::sysfs_root() + "/dev/char/" + std::to_string(major(st.st_rdev)) + ":" +
                  std::to_string(minor(st.st_rdev));
  } else if (S_ISREG(st.st_mode) && dev_dir() != "/dev" && dirname_of(path) == dev_dir() &&
             is_device_name(basename_of(path))) {
    // The only difference from a real device: it is found by name, not by device number.
    a.sysfs_dir = devices_dir() + "/" + basename_of(path);
    a.stand_in = true;
  } else {
    raise(ErrorCode::kPool, path + " is not a device DAX character device");
  }
  bool present = false;
  a.size = attr_u64(a.sysfs_dir, "size", path, true, &present);
  if (a.size == 0)
    raise(ErrorCode::kPool, "device DAX " + path + " has size 0 (" + a.sysfs_dir + "/size); is it configured (daxctl)?");
  uint64_t align = attr_u64(a.sysfs_dir, "align", path, false, &present);
  if (present && (align == 0 || (align & (align - 1)) != 0))
    raise(ErrorCode::kPool, a.sysfs_dir + "/align holds " + std::to_string(align) + ", not a power of two");
  a.align = std::max(align, kMinAlign);
  if (a.size % a.align != 0)
    raise(ErrorCode::kPool, "device DAX " + path + " has size " + std::to_string(a.size) + " bytes (" + a.sysfs_dir +
                                "/size), not a multiple of its " + mib(a.align) + " alignment");
  std::string text;
  for (const char* attr : {"target_node", "numa_node"}) {
    if (!placement::read_attr(a.sysfs_dir + "/" + attr, &text)) continue;
    int64_t node = placement::parse_int(text, a.sysfs_dir + "/" + attr);
    a.target_node = node < 0 || node > 1 << 20 ? -1 : int(node);
    break;
  }
  if (a.stand_in && uint64_t(st.st_size) < a.size)
    raise(ErrorCode::kPool, "device DAX stand-in " + path + " is " + std::to_string(st.st_size) +
                                " bytes, shorter than its sysfs size " + std::to_string(a.size));
  return a;
}

std::string format_uuid(const uint8_t* u) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += hex[u[i] >> 4];
    s += hex[u[i] & 15];
  }
  return s;
}

std::vector<Probe> scan() {
  std::vector<std::string> names;
  if (DIR* d = opendir(devices_dir().c_str())) {
    while (dirent* e = readdir(d))
      if (is_device_name(e->d_name)) names.emplace_back(e->d_name);
    closedir(d);
  }
  std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) { return order_key(a) < order_key(b); });
  std::vector<Probe> out;
  for (const auto& name : names) {
    Probe p;
    p.name = name;
    p.path = dev_dir() + "/" + name;
    // Read only: a foreign device is never mapped, let alone written.
    int fd = ::open(p.path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
      p.note = std::string("cannot open: ") + std::strerror(errno);
      out.push_back(p);
      continue;
    }
    try {
      p.size = attributes(fd, p.path).size;
      alignas(64) uint8_t buf[sizeof(layout::Superblock)] = {};
      size_t got = 0;
      while (got < sizeof buf) {
        ssize_t r = pread(fd, buf + got, sizeof buf - got, off_t(got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) raise(ErrorCode::kPool, std::string("cannot read: ") + std::strerror(errno));
        if (r == 0) break;
        got += size_t(r);
      }
      auto sb = reinterpret_cast<const layout::Superblock*>(buf);
      if (got < sizeof buf || std::memcmp(sb->magic, layout::kMagic, sizeof layout::kMagic) != 0) {
        p.note = "not a pykvshm pool";
      } else if (superblock_checksum(sb) != sb->checksum) {
        p.note = "pykvshm magic but a damaged superblock (checksum mismatch)";
      } else {
        p.is_pool = true;
        std::memcpy(p.uuid.data(), sb->uuid, 16);
        p.note = "pykvshm pool " + format_uuid(sb->uuid);
        try {
          validate_superblock(buf, got, p.size, p.path);
        } catch (const Error& e) {
          p.note += " (cannot be opened: " + std::string(e.what()) + ")";
        }
      }
    } catch (const Error& e) {
      p.note = e.what();
    }
    ::close(fd);
    out.push_back(p);
  }
  return out;
}

std::string find_pool(const std::array<uint8_t, 16>& uuid) {
  std::vector<Probe> probes = scan();
  std::vector<std::string> hits;
  std::string listing;
  for (const auto& p : probes) {
    if (p.is_pool && p.uuid == uuid) hits.push_back(p.path);
    listing += (listing.empty() ? "" : "; ") + p.path + ": " + p.note;
  }
  std::string u = format_uuid(uuid.data());
  if (hits.size() == 1) return hits[0];
  if (hits.empty())
    raise(ErrorCode::kNotFound, "no device DAX holds the pool " + u + "; scanned " + devices_dir() +
                                    (probes.empty() ? " and found no devices" : ": " + listing));
  std::string all;
  for (const auto& h : hits) all += (all.empty() ? "" : ", ") + h;
  raise(ErrorCode::kPool, "pool " + u + " appears on " + std::to_string(hits.size()) + " devices (" + all +
                              "): a device was copied; destroy the copies or open one by path");
}

}  // namespace pykvshm::dax
