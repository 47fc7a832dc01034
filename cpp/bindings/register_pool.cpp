// Bindings of pykvshm::Pool.  Heavy calls release the GIL; arguments are checked
// here (sizes, dtypes) so the core only ever sees well-formed arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>

#include "bindings.h"
#include "pykvshm/placement.h"
#include "pykvshm/pool.h"

#include <fcntl.h>
#include <unistd.h>

namespace py = pybind11;

namespace pykvshm::bindings {
namespace {

using Handles = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

// A window onto pool memory that Python sees through the buffer protocol.  It
// keeps `anchor` (the Python object that owns the right to the memory: a pool
// handle, a lease, a writer) alive for as long as any view of it exists.
struct BlockBuffer {
  uint8_t* ptr;
  size_t size;
  bool readonly;
  py::object anchor;
};

struct KeyBuf {
  const uint8_t* ptr;
  size_t n;
};

KeyBuf keys_of(const py::buffer& keys, py::buffer_info& info) {
  info = keys.request();
  if (info.ndim < 1 || info.itemsize != 1)
    throw py::type_error("keys must be a bytes-like object of 16 bytes per key (uint8)");
  size_t len = size_t(info.size);
  if (info.ndim > 1 || info.strides[0] != 1) throw py::value_error("keys must be a contiguous 1-D buffer");
  if (len % 16 != 0) throw py::value_error("keys buffer length " + std::to_string(len) + " is not a multiple of 16");
  return {static_cast<const uint8_t*>(info.ptr), len / 16};
}

// Binds a Pool method taking (handles, count) so that it runs without the GIL.
template <void (Pool::*Method)(const uint64_t*, size_t)>
auto on_handles() {
  return [](Pool& p, const Handles& h) {
    Pool::Call call(p);
    const uint64_t* d = h.data();
    size_t n = size_t(h.size());
    py::gil_scoped_release rel;
    (p.*Method)(d, n);
  };
}

// read_spans / write_spans: four equally long columns and an optional CopyGroup.
using SpanMethod = void (Pool::*)(const uint64_t*, const uint64_t*, const uint64_t*, const uint64_t*, size_t,
                                  const std::shared_ptr<CopyGroup>&);
template <SpanMethod Method>
auto on_spans(const char* what) {
  return [what](Pool& p, const Handles& h, const Handles& offsets, const Handles& addrs, const Handles& bytes,
                std::shared_ptr<CopyGroup> group) {
    Pool::Call call(p);
    const size_t n = size_t(h.size());
    if (size_t(offsets.size()) != n || size_t(addrs.size()) != n || size_t(bytes.size()) != n)
      throw py::value_error(std::string(what) + ": handles, offsets, addresses and sizes must have the same length");
    py::gil_scoped_release rel;
    (p.*Method)(h.data(), offsets.data(), addrs.data(), bytes.data(), n, group);
  };
}

Handles to_array(const std::vector<uint64_t>& v, size_t n) {
  Handles a(static_cast<py::ssize_t>(n));
  if (n) std::memcpy(a.mutable_data(), v.data(), n * 8);
  return a;
}

py::dict stats_dict(const Stats& s) {
  py::dict d;
  d["total"] = s.total;
  d["free"] = s.free;
  d["writing"] = s.writing;
  d["sealed"] = s.sealed;
  d["evicting"] = s.evicting;
  d["pinned"] = s.pinned;
  d["members"] = s.members;
  const char* names[layout::kCounterCount] = {"hits", "misses", "evictions", "bytes_in", "bytes_out", "published",
                                              "duplicates", "recovered_members", "index_full", "checksum_errors",
                                              "allocs", "pins_refused", "lock_waits", "tier_demoted",
                                              "tier_promoted", "tier_integrity_failures"};
  for (uint32_t c = 0; c < layout::kCounterCount; ++c)
    if (names[c][0]) d[names[c]] = s.counters[c];
  return d;
}

PoolOptions options(bool prefault, bool huge_pages, int numa_node, uint32_t mode, uint32_t coherence, bool checksums,
                    uint64_t host_id, double lease_s, unsigned copy_threads = 1, uint32_t copy_kernel = 0) {
  PoolOptions o;
  if (copy_threads < 1 || copy_threads > 64) throw py::value_error("copy_threads must be between 1 and 64");
  if (copy_kernel > 2) throw py::value_error("copy_kernel must be 0 (auto), 1 (memcpy) or 2 (stream)");
  o.copy_threads = copy_threads;
  o.copy_kernel = CopyKernel(copy_kernel);
  o.map.prefault = prefault;
  o.map.huge_pages = huge_pages;
  o.map.numa_node = numa_node;
  if (mode > 0777) throw py::value_error("mode must be permission bits between 0 and 0o777 (no setuid, setgid or sticky bit)");
  o.map.mode = mode;
  if (coherence > 1) throw py::value_error("coherence must be 0 (coherent) or 1 (noncoherent)");
  o.coherence = layout::Coherence(coherence);
  o.block_checksums = checksums;
  o.host_id = host_id;
  if (!(lease_s > 0 && lease_s < 1e9)) throw py::value_error("lease must be a positive, finite number of seconds");
  o.lease_ns = uint64_t(lease_s * 1e9);
  return o;
}

}  // namespace

void register_pool(py::module_& m) {
  py::class_<CopyGroup, std::shared_ptr<CopyGroup>>(m, "CopyGroup")
      .def(py::init<>())
      .def("wait", &CopyGroup::wait, py::call_guard<py::gil_scoped_release>(),
           "Block until every copy of the group has run; raise the first error one of them hit.")
      .def("idle", &CopyGroup::idle)
      .def("failed", &CopyGroup::failed)
      .def_property_readonly("pending", &CopyGroup::pending);
  m.def(
      "copy_bytes",
      [](uintptr_t dst, uintptr_t src, uint64_t n, uint32_t kernel) {
        if (kernel > 2) throw py::value_error("kernel must be 0 (auto), 1 (memcpy) or 2 (stream)");
        CopySpan s{reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), n};
        py::gil_scoped_release rel;
        copy_spans(&s, 1, CopyKernel(kernel));
      },
      "Copy n bytes between two process addresses with a copy-engine kernel (benchmarks).");
  m.def(
      "transparent_huge_pages_refusal",
      [](const std::string& path) -> std::string {
        // Why a shm/tmpfs file at `path` cannot get transparent huge pages ("" when it can).
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0) return "cannot open " + path;
        std::string why;
        try {
          placement::check_file_huge_pages(fd, path);
        } catch (const Error& e) {
          why = e.what();
        }
        ::close(fd);
        return why;
      },
      py::arg("path"));
  py::class_<BlockBuffer>(m, "BlockBuffer", py::buffer_protocol())
      .def_buffer([](BlockBuffer& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<uint8_t>::format(), 1, {py::ssize_t(b.size)}, {1},
                               b.readonly);
      })
      .def_property_readonly("address", [](const BlockBuffer& b) { return reinterpret_cast<uintptr_t>(b.ptr); })
      .def("__len__", [](const BlockBuffer& b) { return b.size; });

  py::class_<Pool, std::unique_ptr<Pool>>(m, "Pool")
      .def_static(
          "create",
          [](const std::string& name, uint32_t layers, uint32_t heads, uint32_t head_dim, uint32_t block_tokens,
             uint32_t dtype_code, uint32_t dtype_size, uint64_t capacity, uint32_t mode, bool prefault, bool huge_pages,
             int numa_node, uint32_t coherence, bool checksums, uint64_t host_id, double lease_s, unsigned copy_threads,
             uint32_t copy_kernel, int64_t max_members, uint32_t lock_shards) {
            GeometryIn g{layers, heads, head_dim, block_tokens, dtype_code, dtype_size};
            auto o = options(prefault, huge_pages, numa_node, mode, coherence, checksums, host_id, lease_s, copy_threads,
                             copy_kernel);
            if (max_members < int64_t(layout::kMinMembers) || max_members > int64_t(layout::kMaxMembersLimit))
              throw py::value_error("max_members must be an integer between " + std::to_string(layout::kMinMembers) +
                                    " and " + std::to_string(layout::kMaxMembersLimit) + " (member slots; one is kept "
                                    "spare), not " + std::to_string(max_members));
            o.max_members = uint32_t(max_members);
            o.lock_shards = lock_shards;
            py::gil_scoped_release rel;
            return Pool::create(name, g, capacity, o);
          },
          py::arg("name"), py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_tokens"),
          py::arg("dtype_code"), py::arg("dtype_size"), py::arg("capacity"), py::arg("mode") = 0600,
          py::arg("prefault") = false, py::arg("huge_pages") = false, py::arg("numa_node") = -1,
          py::arg("coherence") = 0, py::arg("checksums") = false, py::arg("host_id") = 0, py::arg("lease_s") = 10.0,
          py::arg("copy_threads") = 1, py::arg("copy_kernel") = 0,
          py::arg("max_members") = int64_t(layout::kDefaultMaxMembers), py::arg("lock_shards") = 0)
      .def_static(
          "open",
          [](const std::string& name, bool prefault, bool huge_pages, int numa_node, uint64_t host_id, double lease_s,
             std::optional<std::array<uint32_t, 6>> expect, unsigned copy_threads, uint32_t copy_kernel,
             bool allow_foreign) {
            auto o = options(prefault, huge_pages, numa_node, 0600, 0, false, host_id, lease_s, copy_threads, copy_kernel);
            o.map.allow_foreign = allow_foreign;
            GeometryIn g{};
            if (expect) g = GeometryIn{(*expect)[0], (*expect)[1], (*expect)[2], (*expect)[3], (*expect)[4], (*expect)[5]};
            py::gil_scoped_release rel;
            return Pool::open(name, o, expect ? &g : nullptr);
          },
          py::arg("name"), py::arg("prefault") = false, py::arg("huge_pages") = false, py::arg("numa_node") = -1,
          py::arg("host_id") = 0, py::arg("lease_s") = 10.0, py::arg("expect") = py::none(), py::arg("copy_threads") = 1,
          py::arg("copy_kernel") = 0, py::arg("allow_foreign") = false)
      .def_static(
          "open_read_only",
          [](const std::string& name, uint64_t host_id, double lease_s, std::optional<std::array<uint32_t, 6>> expect) {
            auto o = options(false, false, -1, 0600, 0, false, host_id, lease_s);
            // A monitor writes nothing, so a pool made by another user (or writable by others) cannot
            // be used against it: the ownership check guards writable attaches only.
            o.map.allow_foreign = true;
            GeometryIn g{};
            if (expect) g = GeometryIn{(*expect)[0], (*expect)[1], (*expect)[2], (*expect)[3], (*expect)[4], (*expect)[5]};
            py::gil_scoped_release rel;
            return Pool::open_read_only(name, o, expect ? &g : nullptr);
          },
          py::arg("name"), py::arg("host_id") = 0, py::arg("lease_s") = 10.0, py::arg("expect") = py::none())
      .def_static("destroy", [](const std::string& name) { Mapping::destroy(name); })
      .def_static("path_for", [](const std::string& name) {
        return Mapping::backend_for(name) == Backend::kShm ? Mapping::shm_path(name) : name;
      })
      .def("close", &Pool::close, py::call_guard<py::gil_scoped_release>())
      .def("shut_calls", &Pool::shut_calls)
      .def("reopen_calls", &Pool::reopen_calls)
      .def("abandon", &Pool::abandon, py::call_guard<py::gil_scoped_release>())
      .def("debug_hold_lock",
           [](Pool& p) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.debug_hold_lock();
           })
      .def("index_census",
           [](const Pool& p) {
             Pool::Call call(p);
             Pool::IndexCensus c;
             {
               py::gil_scoped_release rel;
               c = p.index_census();
             }
             py::dict d;
             d["empty"] = c.empty;
             d["tombstones"] = c.tombstones;
             d["live"] = c.live;
             d["clearing"] = c.clearing;
             d["other"] = c.other;
             return d;
           })
      .def(
          "add_tier_counts",
          [](Pool& p, uint64_t demoted, uint64_t promoted, uint64_t integrity_failures) {
            Pool::Call call(p);
            if (p.read_only()) throw py::value_error("add_tier_counts: a read-only handle has no counters of its own");
            p.add_counter(layout::kCtrTierDemoted, demoted);
            p.add_counter(layout::kCtrTierPromoted, promoted);
            p.add_counter(layout::kCtrTierIntegrity, integrity_failures);
          },
          py::arg("demoted"), py::arg("promoted"), py::arg("integrity_failures"),
          "Add the cluster tier's block counts to this member's counters (pykvshm.tier calls it).")
      .def("lock_stats",
           [](const Pool& p) {
             Pool::Call call(p);
             LockStats st = p.lock_stats();
             py::dict d;
             d["acquisitions"] = st.acquisitions;
             d["takeovers"] = st.takeovers;
             d["hosts_skipped"] = st.hosts_skipped;
             d["host_line"] = st.host_line;
             d["lock_shards"] = st.lock_shards;
             d["shard_acquisitions"] = st.shard_acquisitions;
             d["shard_takeovers"] = st.shard_takeovers;
             d["unguarded_writes"] = st.unguarded_writes;
             return d;
           })
      .def_property_readonly("closed", &Pool::closed)
      .def_property_readonly("read_only", &Pool::read_only)
      .def_property_readonly("placement", [](const Pool& p) {
        Pool::Call call(p);
        const Mapping& mp = p.mapping();
        static const char* kBackends[] = {"shm", "file", "devdax"};
        py::dict d;
        d["backend"] = kBackends[int(mp.backend())];
        d["page_size"] = mp.page_size();
        d["huge_pages"] = mp.huge();
        d["numa_node"] = mp.numa_node();
        d["device_node"] = mp.device_node();
        d["prefault"] = mp.prefaulted();
        return d;
      })
      .def_property_readonly("geometry", [](const Pool& p) {  // copied at attach: no mapping access
        const auto& g = p.geometry();
        py::dict d;
        d["num_layers"] = g.num_layers;
        d["num_kv_heads"] = g.num_kv_heads;
        d["head_dim"] = g.head_dim;
        d["block_tokens"] = g.block_tokens;
        d["dtype_code"] = g.dtype_code;
        d["dtype_size"] = g.dtype_size;
        d["block_bytes"] = g.block_bytes;
        d["block_stride"] = g.block_stride;
        return d;
      })
      .def_property_readonly("num_blocks", &Pool::num_blocks)
      .def_property_readonly("index_slots", &Pool::index_slots)
      .def_property_readonly("total_bytes",
                             [](const Pool& p) {
                               Pool::Call call(p);
                               return p.total_bytes();
                             })
      .def_property_readonly("data_offset", &Pool::data_offset)
      .def_property_readonly("path", &Pool::path)
      .def_property_readonly("coherence", [](const Pool& p) { return uint32_t(p.coherence()); })
      .def_property_readonly("lock_shards", [](const Pool& p) { return p.lock_shards(); })
      .def_property_readonly("block_checksums", &Pool::block_checksums)
      .def_property_readonly("max_members", &Pool::max_members)
      .def_property_readonly("member_slot", &Pool::member_slot)
      .def_property_readonly("host_id", &Pool::host_id)
      .def_property_readonly("created_ns",
                             [](const Pool& p) {
                               Pool::Call call(p);
                               return p.created_ns();
                             })
      .def_property_readonly("address",
                             [](const Pool& p) {
                               Pool::Call call(p);
                               return reinterpret_cast<uintptr_t>(p.base());
                             })
      .def_property_readonly("uuid", [](const Pool& p) {
        Pool::Call call(p);
        auto u = p.uuid();
        return py::bytes(reinterpret_cast<const char*>(u.data()), u.size());
      })
      .def("alloc",
           [](Pool& p, size_t n, bool evict) {
             Pool::Call call(p);
             // Refused before the handle array is allocated (n may be in the billions).
             if (n > p.num_blocks())
               raise(ErrorCode::kFull, "asked for " + std::to_string(n) + " blocks but the pool has only " +
                                           std::to_string(p.num_blocks()));
             std::vector<uint64_t> out(n);
             {
               py::gil_scoped_release rel;
               p.alloc(n, evict, out.data());
             }
             return to_array(out, n);
           },
           py::arg("n"), py::arg("evict") = true)
      .def("free", on_handles<&Pool::free>())
      .def("block_buffer",
           [](Pool& p, uint64_t handle, bool writable, py::object anchor) {
             Pool::Call call(p);
             uint8_t* ptr = writable ? p.writable_block(handle) : const_cast<uint8_t*>(p.pinned_block(handle));
             return BlockBuffer{ptr, size_t(p.geometry().block_bytes), !writable, std::move(anchor)};
           },
           py::arg("handle"), py::arg("writable"), py::arg("anchor"))
      .def("block_address", [](Pool& p, uint64_t index) {
        Pool::Call call(p);
        if (index >= p.num_blocks()) throw py::index_error("block index out of range");
        return reinterpret_cast<uintptr_t>(p.block_data(index));
      })
      .def("match",
           [](Pool& p, const py::buffer& keys) {
             Pool::Call call(p);
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             py::gil_scoped_release rel;
             return p.match(k.ptr, k.n);
           })
      .def("publish",
           [](Pool& p, const py::buffer& keys, uintptr_t src, uint64_t stride) {
             Pool::Call call(p);
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             if (stride < p.geometry().block_bytes) throw py::value_error("source stride is smaller than a block");
             py::gil_scoped_release rel;
             return p.publish(k.ptr, k.n, reinterpret_cast<const uint8_t*>(src), stride);
           })
      .def("acquire",
           [](Pool& p, const py::buffer& keys) {
             Pool::Call call(p);
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             std::vector<uint64_t> out(k.n);
             size_t got;
             {
               py::gil_scoped_release rel;
               got = p.acquire(k.ptr, k.n, out.data());
             }
             return to_array(out, got);
           })
      .def("release", on_handles<&Pool::release>())
      .def("pin_victims",
           [](Pool& p, size_t n) {
             Pool::Call call(p);
             const size_t cap = std::min<size_t>(n, size_t(p.num_blocks()));
             std::vector<uint64_t> out(cap);
             std::string keys(16 * cap, '\0');
             size_t got;
             {
               py::gil_scoped_release rel;
               got = p.pin_victims(cap, out.data(), reinterpret_cast<uint8_t*>(keys.data()));
             }
             keys.resize(16 * got);
             return py::make_tuple(to_array(out, got), py::bytes(keys));
           },
           py::arg("n"))
      .def("copy_out",
           [](Pool& p, const Handles& h, uintptr_t dst, uint64_t stride) {
             Pool::Call call(p);
             if (stride < p.geometry().block_bytes) throw py::value_error("destination stride is smaller than a block");
             const uint64_t* d = h.data();
             size_t n = size_t(h.size());
             py::gil_scoped_release rel;
             p.copy_out(d, n, reinterpret_cast<uint8_t*>(dst), stride);
           })
      .def("reserve",
           [](Pool& p, const py::buffer& keys) {
             Pool::Call call(p);
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             std::vector<int64_t> pos(k.n);
             std::vector<uint64_t> hs(k.n);
             size_t m;
             {
               py::gil_scoped_release rel;
               m = p.reserve(k.ptr, k.n, pos.data(), hs.data());
             }
             py::array_t<int64_t> pa(static_cast<py::ssize_t>(m));
             if (m) std::memcpy(pa.mutable_data(), pos.data(), m * 8);
             return py::make_tuple(pa, to_array(hs, m));
           })
      .def("commit", on_handles<&Pool::commit>())
      .def("abort", on_handles<&Pool::abort_writes>())
      .def("recover",
           [](Pool& p) {
             Pool::Call call(p);
             RecoveryReport r;
             {
               py::gil_scoped_release rel;
               r = p.recover();
             }
             py::dict d;
             d["members_recovered"] = r.members_recovered;
             d["blocks_freed"] = r.blocks_freed;
             d["pins_dropped"] = r.pins_dropped;
             return d;
           })
      .def("stats",
           [](const Pool& p) {
             Pool::Call call(p);
             Stats s;
             {
               py::gil_scoped_release rel;
               s = p.stats();
             }
             return stats_dict(s);
           })
      .def("members",
           [](const Pool& p) {
             Pool::Call call(p);
             py::list out;
             for (const auto& mi : p.members()) {
               py::dict d;
               const char* st[] = {"free", "alive", "recovering", "claiming"};
               d["slot"] = mi.slot;
               d["status"] = st[mi.status & 3];
               d["epoch"] = mi.epoch;
               d["pid"] = mi.pid;
               d["host_id"] = mi.host_id;
               d["start_time"] = mi.start_time;
               d["heartbeat_ns"] = mi.heartbeat_ns;
               d["attach_ns"] = mi.attach_ns;
               d["self"] = mi.self;
               d["alive"] = mi.alive;
               out.append(d);
             }
             return out;
           })
      .def("transfer_open",
           [](Pool& p, const py::bytes& req, const py::buffer& keys) {
             Pool::Call call(p);
             std::string r = req;
             if (r.size() != 16) throw py::value_error("request key must be 16 bytes");
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             Pool::TransferRef t;
             {
               py::gil_scoped_release rel;
               t = p.transfer_open(reinterpret_cast<const uint8_t*>(r.data()), k.ptr, k.n);
             }
             return py::make_tuple(t.channel, t.epoch);
           })
      .def("transfer_put_layer",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, uintptr_t src, uint64_t stride) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_put_layer({ch, epoch}, layer, reinterpret_cast<const uint8_t*>(src), stride);
           })
      .def("transfer_finish",
           [](Pool& p, uint32_t ch, uint32_t epoch) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_finish({ch, epoch});
           })
      .def("transfer_abort",
           [](Pool& p, uint32_t ch, uint32_t epoch) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_abort({ch, epoch});
           })
      .def("transfer_attach",
           [](Pool& p, std::optional<py::bytes> req, std::optional<py::bytes> first, uint32_t n, double timeout_s) {
             Pool::Call call(p);
             std::string r = req ? std::string(*req) : std::string();
             std::string f = first ? std::string(*first) : std::string();
             if ((req && r.size() != 16) || (first && f.size() != 16)) throw py::value_error("keys must be 16 bytes");
             if (!req && !first) throw py::value_error("give a request key or a first block key");
             uint64_t ns = timeout_s <= 0 ? 0 : uint64_t(timeout_s * 1e9);
             Pool::TransferRef t;
             {
               py::gil_scoped_release rel;
               t = p.transfer_attach(req ? reinterpret_cast<const uint8_t*>(r.data()) : nullptr,
                                     first ? reinterpret_cast<const uint8_t*>(f.data()) : nullptr, n, ns);
             }
             return py::make_tuple(t.channel, t.epoch);
           },
           py::arg("req"), py::arg("first"), py::arg("n"), py::arg("timeout_s"))
      .def("transfer_info",
           [](const Pool& p, uint32_t ch, uint32_t epoch) {
             Pool::Call call(p);
             auto i = p.transfer_info({ch, epoch});
             const char* st[] = {"free", "filling", "open", "done", "aborted", "?", "?", "?"};
             py::dict d;
             d["num_blocks"] = i.num_blocks;
             d["num_layers"] = i.num_layers;
             d["layers_ready"] = i.ready & layout::kReadyCount;
             d["done"] = (i.ready & layout::kReadyDone) != 0;
             d["aborted"] = (i.ready & layout::kReadyAborted) != 0;
             d["status"] = st[i.status & 7];
             d["cached"] = i.cached;
             return d;
           })
      .def("transfer_wait",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, double timeout_s) {
             Pool::Call call(p);
             uint64_t ns = timeout_s <= 0 ? 0 : uint64_t(timeout_s * 1e9);
             py::gil_scoped_release rel;
             p.transfer_wait({ch, epoch}, layer, ns);
           })
      .def("transfer_copy_layer",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, uintptr_t dst, uint64_t stride) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_copy_layer({ch, epoch}, layer, reinterpret_cast<uint8_t*>(dst), stride);
           })
      .def("transfer_read_layers",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t first, uint32_t count, uintptr_t dst,
              uint64_t layer_stride, uint64_t block_stride, double timeout_s) {
             Pool::Call call(p);
             // Layers [first, first+count), each as soon as it is ready: block j of layer l goes
             // to dst + (l - first) * layer_stride + j * block_stride.  One call without the GIL,
             // so a busy interpreter does not delay the handoff.
             const uint64_t layer_bytes = p.geometry().block_bytes / p.geometry().num_layers;
             if (block_stride < layer_bytes) throw py::value_error("destination block stride is smaller than a layer");
             if (uint64_t(first) + count > p.geometry().num_layers) throw py::value_error("layer range out of bounds");
             uint64_t ns = timeout_s <= 0 ? 0 : uint64_t(timeout_s * 1e9);
             py::gil_scoped_release rel;
             for (uint32_t l = first; l < first + count; ++l) {
               p.transfer_wait({ch, epoch}, l, ns);
               p.transfer_copy_layer({ch, epoch}, l, reinterpret_cast<uint8_t*>(dst) + (l - first) * layer_stride,
                                     block_stride);
             }
           })
      .def("transfer_put_layers",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t first, uint32_t count, uintptr_t src,
              uint64_t layer_stride, uint64_t block_stride, bool finish) {
             Pool::Call call(p);
             // Layers [first, first+count) from src + (l - first) * layer_stride + j * block_stride,
             // each published (and its waiters woken) as soon as it is written; optionally finish.
             const uint64_t layer_bytes = p.geometry().block_bytes / p.geometry().num_layers;
             if (block_stride < layer_bytes) throw py::value_error("source block stride is smaller than a layer");
             py::gil_scoped_release rel;
             if (src == 0)  // written in place: nothing to copy, one ready update for the range
               p.transfer_mark_layers({ch, epoch}, first, count);
             else
               for (uint32_t l = first; l < first + count; ++l)
                 p.transfer_put_layer({ch, epoch}, l, reinterpret_cast<const uint8_t*>(src) + (l - first) * layer_stride,
                                      block_stride);
             if (finish) p.transfer_finish({ch, epoch});
           })
      .def("transfer_put_layer_async",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, uintptr_t src, uint64_t stride,
              const std::shared_ptr<CopyGroup>& group) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_put_layer_async({ch, epoch}, layer, reinterpret_cast<const uint8_t*>(src), stride, group);
           })
      .def("transfer_slots",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, bool writable) {
             Pool::Call call(p);
             std::vector<uint8_t*> v;
             {
               py::gil_scoped_release rel;
               v = p.transfer_slots({ch, epoch}, layer, writable);
             }
             py::list out;
             for (uint8_t* a : v) out.append(reinterpret_cast<uintptr_t>(a));
             return out;
           })
      .def("transfer_validate",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer) {
             Pool::Call call(p);
             py::gil_scoped_release rel;
             p.transfer_validate({ch, epoch}, layer);
           })
      .def("slot_buffer",
           [](Pool& p, uintptr_t address, uint64_t size, bool writable, py::object anchor) {
             Pool::Call call(p);
             // A view of `size` bytes at `address`, which must lie inside one data block of this pool
             // (addresses come from transfer_slots).
             const uint64_t base = reinterpret_cast<uintptr_t>(p.block_data(0));
             const uint64_t stride = p.geometry().block_stride, bb = p.geometry().block_bytes;
             if (address < base || address >= base + p.num_blocks() * stride)
               throw py::value_error("address is not inside the pool's data blocks");
             const uint64_t off = (address - base) % stride;
             if (off + size > bb) throw py::value_error("the view would run past the end of its block");
             return BlockBuffer{reinterpret_cast<uint8_t*>(address), size_t(size), !writable, std::move(anchor)};
           })
      .def("read_spans", on_spans<&Pool::read_spans>("read_spans"), py::arg("handles"), py::arg("offsets"),
           py::arg("addrs"), py::arg("sizes"), py::arg("group") = nullptr)
      .def("write_spans", on_spans<&Pool::write_spans>("write_spans"), py::arg("handles"), py::arg("offsets"),
           py::arg("addrs"), py::arg("sizes"), py::arg("group") = nullptr)
      .def("copy_engine_info",
           [](Pool& p) {
             Pool::Call call(p);
             CopyEngine& e = p.copy_engine();
             py::dict d;
             d["threads"] = e.threads();
             d["kernel"] = kernel_name(e.kernel());
             d["stream_threshold"] = kStreamThreshold;
             d["jobs_done"] = e.jobs_done();
             d["bytes_done"] = e.bytes_done();
             return d;
           })
      .def_property_readonly("transfer_max_blocks", &Pool::transfer_max_blocks)
      .def(
          "check",
          [](const Pool& p, bool strict, bool checksums) {
            Pool::Call call(p);
            py::gil_scoped_release rel;
            p.check(strict, checksums);
          },
          py::arg("strict") = true, py::arg("checksums") = false)
      .def("heartbeat", [](Pool& p) {
        Pool::Call call(p);
        p.heartbeat();
      });
}

}  // namespace pykvshm::bindings
