// Bindings of pykvshm::Pool.  Heavy calls release the GIL; arguments are checked
// here (sizes, dtypes) so the core only ever sees well-formed arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "bindings.h"
#include "pykvshm/pool.h"

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
    const uint64_t* d = h.data();
    size_t n = size_t(h.size());
    py::gil_scoped_release rel;
    (p.*Method)(d, n);
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
                                              "allocs", "", "", "", "", ""};
  for (uint32_t c = 0; c < layout::kCounterCount; ++c)
    if (names[c][0]) d[names[c]] = s.counters[c];
  return d;
}

PoolOptions options(bool prefault, bool huge_pages, int numa_node, uint32_t mode, uint32_t coherence, bool checksums,
                    uint64_t host_id, double lease_s) {
  PoolOptions o;
  o.map.prefault = prefault;
  o.map.huge_pages = huge_pages;
  o.map.numa_node = numa_node;
  o.map.mode = mode;
  if (coherence > 1) throw py::value_error("coherence must be 0 (coherent) or 1 (noncoherent)");
  o.coherence = layout::Coherence(coherence);
  o.block_checksums = checksums;
  o.host_id = host_id;
  if (!(lease_s > 0)) throw py::value_error("lease must be positive");
  o.lease_ns = uint64_t(lease_s * 1e9);
  return o;
}

}  // namespace

void register_pool(py::module_& m) {
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
             int numa_node, uint32_t coherence, bool checksums, uint64_t host_id, double lease_s) {
            GeometryIn g{layers, heads, head_dim, block_tokens, dtype_code, dtype_size};
            auto o = options(prefault, huge_pages, numa_node, mode, coherence, checksums, host_id, lease_s);
            py::gil_scoped_release rel;
            return Pool::create(name, g, capacity, o);
          },
          py::arg("name"), py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_tokens"),
          py::arg("dtype_code"), py::arg("dtype_size"), py::arg("capacity"), py::arg("mode") = 0600,
          py::arg("prefault") = false, py::arg("huge_pages") = false, py::arg("numa_node") = -1,
          py::arg("coherence") = 0, py::arg("checksums") = false, py::arg("host_id") = 0, py::arg("lease_s") = 10.0)
      .def_static(
          "open",
          [](const std::string& name, bool prefault, bool huge_pages, int numa_node, uint64_t host_id, double lease_s,
             std::optional<std::array<uint32_t, 6>> expect) {
            auto o = options(prefault, huge_pages, numa_node, 0600, 0, false, host_id, lease_s);
            GeometryIn g{};
            if (expect) g = GeometryIn{(*expect)[0], (*expect)[1], (*expect)[2], (*expect)[3], (*expect)[4], (*expect)[5]};
            py::gil_scoped_release rel;
            return Pool::open(name, o, expect ? &g : nullptr);
          },
          py::arg("name"), py::arg("prefault") = false, py::arg("huge_pages") = false, py::arg("numa_node") = -1,
          py::arg("host_id") = 0, py::arg("lease_s") = 10.0, py::arg("expect") = py::none())
      .def_static("destroy", [](const std::string& name) { Mapping::destroy(name); })
      .def_static("path_for", [](const std::string& name) {
        return Mapping::backend_for(name) == Backend::kShm ? Mapping::shm_path(name) : name;
      })
      .def("close", &Pool::close, py::call_guard<py::gil_scoped_release>())
      .def("abandon", &Pool::abandon)
      .def("debug_hold_lock",
           [](Pool& p) {
             py::gil_scoped_release rel;
             p.debug_hold_lock();
           })
      .def("index_census",
           [](const Pool& p) {
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
      .def("lock_stats",
           [](const Pool& p) {
             LockStats st = p.lock_stats();
             py::dict d;
             d["acquisitions"] = st.acquisitions;
             d["takeovers"] = st.takeovers;
             d["hosts_skipped"] = st.hosts_skipped;
             d["host_line"] = st.host_line;
             return d;
           })
      .def_property_readonly("closed", &Pool::closed)
      .def_property_readonly("placement", [](const Pool& p) {
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
      .def_property_readonly("geometry", [](const Pool& p) {
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
      .def_property_readonly("total_bytes", &Pool::total_bytes)
      .def_property_readonly("data_offset", &Pool::data_offset)
      .def_property_readonly("path", &Pool::path)
      .def_property_readonly("coherence", [](const Pool& p) { return uint32_t(p.coherence()); })
      .def_property_readonly("block_checksums", &Pool::block_checksums)
      .def_property_readonly("member_slot", &Pool::member_slot)
      .def_property_readonly("host_id", &Pool::host_id)
      .def_property_readonly("created_ns", &Pool::created_ns)
      .def_property_readonly("address", [](const Pool& p) { return reinterpret_cast<uintptr_t>(p.base()); })
      .def_property_readonly("uuid", [](const Pool& p) {
        auto u = p.uuid();
        return py::bytes(reinterpret_cast<const char*>(u.data()), u.size());
      })
      .def("alloc",
           [](Pool& p, size_t n, bool evict) {
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
             uint8_t* ptr = writable ? p.writable_block(handle) : const_cast<uint8_t*>(p.pinned_block(handle));
             return BlockBuffer{ptr, size_t(p.geometry().block_bytes), !writable, std::move(anchor)};
           },
           py::arg("handle"), py::arg("writable"), py::arg("anchor"))
      .def("block_address", [](Pool& p, uint64_t index) {
        if (index >= p.num_blocks()) throw py::index_error("block index out of range");
        return reinterpret_cast<uintptr_t>(p.block_data(index));
      })
      .def("match",
           [](Pool& p, const py::buffer& keys) {
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             py::gil_scoped_release rel;
             return p.match(k.ptr, k.n);
           })
      .def("publish",
           [](Pool& p, const py::buffer& keys, uintptr_t src, uint64_t stride) {
             py::buffer_info info;
             KeyBuf k = keys_of(keys, info);
             if (stride < p.geometry().block_bytes) throw py::value_error("source stride is smaller than a block");
             py::gil_scoped_release rel;
             return p.publish(k.ptr, k.n, reinterpret_cast<const uint8_t*>(src), stride);
           })
      .def("acquire",
           [](Pool& p, const py::buffer& keys) {
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
      .def("copy_out",
           [](Pool& p, const Handles& h, uintptr_t dst, uint64_t stride) {
             if (stride < p.geometry().block_bytes) throw py::value_error("destination stride is smaller than a block");
             const uint64_t* d = h.data();
             size_t n = size_t(h.size());
             py::gil_scoped_release rel;
             p.copy_out(d, n, reinterpret_cast<uint8_t*>(dst), stride);
           })
      .def("reserve",
           [](Pool& p, const py::buffer& keys) {
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
             Stats s;
             {
               py::gil_scoped_release rel;
               s = p.stats();
             }
             return stats_dict(s);
           })
      .def("members",
           [](const Pool& p) {
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
             py::gil_scoped_release rel;
             p.transfer_put_layer({ch, epoch}, layer, reinterpret_cast<const uint8_t*>(src), stride);
           })
      .def("transfer_finish",
           [](Pool& p, uint32_t ch, uint32_t epoch) {
             py::gil_scoped_release rel;
             p.transfer_finish({ch, epoch});
           })
      .def("transfer_abort",
           [](Pool& p, uint32_t ch, uint32_t epoch) {
             py::gil_scoped_release rel;
             p.transfer_abort({ch, epoch});
           })
      .def("transfer_attach",
           [](Pool& p, std::optional<py::bytes> req, std::optional<py::bytes> first, uint32_t n, double timeout_s) {
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
             uint64_t ns = timeout_s <= 0 ? 0 : uint64_t(timeout_s * 1e9);
             py::gil_scoped_release rel;
             p.transfer_wait({ch, epoch}, layer, ns);
           })
      .def("transfer_copy_layer",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t layer, uintptr_t dst, uint64_t stride) {
             py::gil_scoped_release rel;
             p.transfer_copy_layer({ch, epoch}, layer, reinterpret_cast<uint8_t*>(dst), stride);
           })
      .def("transfer_read_layers",
           [](Pool& p, uint32_t ch, uint32_t epoch, uint32_t first, uint32_t count, uintptr_t dst,
              uint64_t layer_stride, uint64_t block_stride, double timeout_s) {
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
             // Layers [first, first+count) from src + (l - first) * layer_stride + j * block_stride,
             // each published (and its waiters woken) as soon as it is written; optionally finish.
             const uint64_t layer_bytes = p.geometry().block_bytes / p.geometry().num_layers;
             if (block_stride < layer_bytes) throw py::value_error("source block stride is smaller than a layer");
             py::gil_scoped_release rel;
             for (uint32_t l = first; l < first + count; ++l)
               p.transfer_put_layer({ch, epoch}, l, reinterpret_cast<const uint8_t*>(src) + (l - first) * layer_stride,
                                    block_stride);
             if (finish) p.transfer_finish({ch, epoch});
           })
      .def_property_readonly("transfer_max_blocks", &Pool::transfer_max_blocks)
      .def("check", &Pool::check, py::arg("strict") = true, py::call_guard<py::gil_scoped_release>())
      .def("heartbeat", &Pool::heartbeat);
}

}  // namespace pykvshm::bindings
