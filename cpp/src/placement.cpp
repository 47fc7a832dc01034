#include "pykvshm/placement.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "pykvshm/errors.h"

#ifndef MPOL_BIND
#define MPOL_BIND 2
#endif
#ifndef MPOL_MF_STRICT
#define MPOL_MF_STRICT (1 << 0)
#define MPOL_MF_MOVE (1 << 1)
#endif

namespace pykvshm::placement {
namespace {

constexpr int kMaxNodes = 1024;  // the node mask handed to mbind

std::string node_dir() { return sysfs_root() + "/devices/system/node"; }

// "[always] within_size advise never" -> "always"
std::string selected(const std::string& text) {
  auto a = text.find('['), b = text.find(']');
  if (a == std::string::npos || b == std::string::npos || b < a) return text;
  return text.substr(a + 1, b - a - 1);
}

std::string option_value(const std::string& options, const std::string& key) {
  std::stringstream ss(options);
  std::string opt;
  while (std::getline(ss, opt, ','))
    if (opt.rfind(key + "=", 0) == 0) return opt.substr(key.size() + 1);
  return "";
}

bool has_option(const std::string& options, const std::string& name) {
  std::stringstream ss(options);
  std::string opt;
  while (std::getline(ss, opt, ','))
    if (opt == name || opt.rfind(name + "=", 0) == 0) return true;
  return false;
}

std::string kib_dir(uint64_t page_bytes) {
  return sysfs_root() + "/kernel/mm/hugepages/hugepages-" + std::to_string(page_bytes >> 10) + "kB";
}

}  // namespace

std::string sysfs_root() {
  const char* env = std::getenv("PYKVSHM_SYSFS");
  std::string root = env && *env ? env : "/sys";
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  return root;
}

bool read_attr(const std::string& path, std::string* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad() || s.size() > 4096) return false;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  *out = s;
  return true;
}

int64_t parse_int(const std::string& text, const std::string& path) {
  size_t i = text.size() > 0 && text[0] == '-' ? 1 : 0;
  bool ok = text.size() > i && text.size() - i <= 19;
  for (size_t j = i; ok && j < text.size(); ++j) ok = text[j] >= '0' && text[j] <= '9';
  if (!ok) raise(ErrorCode::kPlacement, path + " holds '" + text.substr(0, 40) + "', not a number");
  return std::strtoll(text.c_str(), nullptr, 10);
}

std::vector<int> parse_list(const std::string& text, const std::string& path) {
  std::vector<int> out;
  if (text.empty()) return out;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    auto dash = part.find('-');
    int64_t lo = parse_int(part.substr(0, dash), path);
    int64_t hi = dash == std::string::npos ? lo : parse_int(part.substr(dash + 1), path);
    if (lo < 0 || hi < lo || hi >= kMaxNodes) raise(ErrorCode::kPlacement, path + " holds an invalid list '" + text + "'");
    for (int64_t n = lo; n <= hi; ++n) out.push_back(int(n));
  }
  return out;
}

std::string format_list(const std::vector<int>& v) {
  if (v.empty()) return "none";
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

void check_node(int node) {
  std::string dir = node_dir();
  std::string text;
  if (!read_attr(dir + "/online", &text))
    raise(ErrorCode::kPlacement, "cannot bind to NUMA node " + std::to_string(node) + ": " + dir +
                                     "/online is unreadable (a kernel without NUMA support?)");
  std::vector<int> online = parse_list(text, dir + "/online");
  std::vector<int> possible;
  if (read_attr(dir + "/possible", &text)) possible = parse_list(text, dir + "/possible");
  auto has = [](const std::vector<int>& v, int n) { return std::find(v.begin(), v.end(), n) != v.end(); };
  struct stat st {};
  bool exists = node >= 0 && node < kMaxNodes && stat((dir + "/node" + std::to_string(node)).c_str(), &st) == 0;
  if (!exists && !has(online, node))
    raise(ErrorCode::kPlacement, "NUMA node " + std::to_string(node) + " does not exist on this machine; its node(s): " +
                                     format_list(online) + " (" + dir + "/online)");
  if (!has(online, node))
    raise(ErrorCode::kPlacement, "NUMA node " + std::to_string(node) + " is offline; online node(s): " +
                                     format_list(online) + " (" + dir + "/online)");
  std::vector<int> mem;
  if (read_attr(dir + "/has_memory", &text)) mem = parse_list(text, dir + "/has_memory");
  if (!has(mem, node))
    raise(ErrorCode::kPlacement,
          "NUMA node " + std::to_string(node) + " has no memory; node(s) with memory: " + format_list(mem) + " (" + dir +
              "/has_memory). CXL memory must be onlined as system RAM to appear as a node "
              "(daxctl reconfigure-device --mode=system-ram), or used as device DAX");
  (void)possible;
}

void bind_node(uint8_t* base, uint64_t size, int node) {
  check_node(node);
  constexpr size_t kBits = 8 * sizeof(unsigned long);
  unsigned long mask[kMaxNodes / kBits] = {};
  mask[size_t(node) / kBits] |= 1ul << (size_t(node) % kBits);
  long rc = syscall(SYS_mbind, base, size, MPOL_BIND, mask, static_cast<unsigned long>(kMaxNodes) + 1,
                    MPOL_MF_STRICT | MPOL_MF_MOVE);
  if (rc != 0) {
    int e = errno;
    std::string why = e == EIO ? "some pages are on another node and cannot be moved (the pool is in use elsewhere)"
                      : e == ENOSYS ? "the kernel has no NUMA support"
                                    : std::strerror(e);
    raise(ErrorCode::kPlacement, "mbind to NUMA node " + std::to_string(node) + " failed: " + why);
  }
}

bool mount_of(int fd, MountInfo* out) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return false;
  std::string dev = std::to_string(major(st.st_dev)) + ":" + std::to_string(minor(st.st_dev));
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::stringstream ss(line);
    std::string id, parent, mm, root, point;
    if (!(ss >> id >> parent >> mm >> root >> point) || mm != dev) continue;
    auto sep = line.find(" - ");
    if (sep == std::string::npos) continue;
    std::stringstream rest(line.substr(sep + 3));
    std::string type, source, opts;
    rest >> type >> source >> opts;
    *out = MountInfo{point, type, opts};
    return true;
  }
  return false;
}

int64_t hugetlb_pages_available(uint64_t page_bytes) {
  std::string dir = kib_dir(page_bytes), f, r;
  if (!read_attr(dir + "/free_hugepages", &f)) return -1;
  int64_t free_pages = parse_int(f, dir + "/free_hugepages");
  int64_t resv = read_attr(dir + "/resv_hugepages", &r) ? parse_int(r, dir + "/resv_hugepages") : 0;
  return std::max<int64_t>(0, free_pages - resv);
}

std::string hugetlb_shortage(uint64_t page_bytes, uint64_t bytes, int fd, const std::string& path) {
  uint64_t need = (bytes + page_bytes - 1) / page_bytes;
  int64_t avail = hugetlb_pages_available(page_bytes);
  MountInfo mi;
  std::string mount = mount_of(fd, &mi) ? " on the hugetlbfs mount " + mi.mount_point : "";
  std::string limit = mount_of(fd, &mi) && !option_value(mi.super_options, "size").empty()
                          ? " (the mount is limited to size=" + option_value(mi.super_options, "size") + ")"
                          : "";
  return "huge pages are not available for " + path + mount + limit + ": it needs " + std::to_string(need) + " pages of " +
         std::to_string(page_bytes >> 10) + " kB but " +
         (avail < 0 ? std::string("the number free is unknown") : std::to_string(avail) + " are free") +
         " (HugePages_Free - HugePages_Rsvd in /proc/meminfo); reserve more with "
         "'echo N > /proc/sys/vm/nr_hugepages' or use huge_pages=False on tmpfs";
}

void check_hugetlb(uint64_t page_bytes, uint64_t bytes, int fd, const std::string& path) {
  uint64_t need = (bytes + page_bytes - 1) / page_bytes;
  int64_t avail = hugetlb_pages_available(page_bytes);
  if (avail >= 0 && uint64_t(avail) < need) raise(ErrorCode::kPlacement, hugetlb_shortage(page_bytes, bytes, fd, path));
}

void check_file_huge_pages(int fd, const std::string& path) {
  MountInfo mi;
  if (!mount_of(fd, &mi))
    raise(ErrorCode::kPlacement, "huge pages requested for " + path +
                                     ", but its mount is not in /proc/self/mountinfo, so they cannot be checked");
  if (mi.fs_type == "tmpfs") {
    std::string global_text, global;
    std::string global_path = sysfs_root() + "/kernel/mm/transparent_hugepage/shmem_enabled";
    if (read_attr(global_path, &global_text)) global = selected(global_text);
    if (global == "deny")
      raise(ErrorCode::kPlacement, "huge pages are not available for " + path + ": transparent huge pages for shmem are "
                                   "disabled ([deny] in " + global_path + "); use a file on a hugetlbfs mount "
                                   "(with enough HugePages_Free in /proc/meminfo) or huge_pages=False");
    if (global == "force") return;
    std::string huge = option_value(mi.super_options, "huge");
    if (huge == "always" || huge == "within_size" || huge == "advise") return;
    raise(ErrorCode::kPlacement,
          "huge pages are not available for " + path + ": its tmpfs mount " + mi.mount_point + " has huge=" +
              (huge.empty() ? std::string("never") : huge) +
              " (remount it with -o huge=advise, or use a file on a hugetlbfs mount with enough HugePages_Free in "
              "/proc/meminfo, or huge_pages=False)");
  }
  if (has_option(mi.super_options, "dax") || has_option(mi.super_options, "dax=always")) return;
  raise(ErrorCode::kPlacement, "huge pages are not available for " + path + ": it is on " + mi.fs_type + " (" +
                                   mi.mount_point + "); huge pages need a hugetlbfs mount, a tmpfs mount with huge= "
                                   "enabled, a DAX filesystem or device DAX");
}

}  // namespace pykvshm::placement
