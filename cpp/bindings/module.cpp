// pykvshm._core: the C++ core as a Python extension.  Users import pykvshm, not this.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>

#include "bindings.h"
#include "pykvshm/crc32c.h"
#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/pool.h"
#include "pykvshm/visibility.h"

namespace py = pybind11;

namespace pykvshm::bindings {

void register_errors(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      const char* name = error_class_name(e.code());
      py::object cls = py::module_::import("pykvshm.errors").attr(name);
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace pykvshm::bindings

namespace {

py::dict layout_info() {
  using namespace pykvshm::layout;
  py::dict d;
  d["layout_version"] = kLayoutVersion;
  d["page_bytes"] = kPageBytes;
  d["data_align"] = kDataAlign;
  d["block_align"] = kBlockAlign;
  d["default_max_members"] = kDefaultMaxMembers;
  d["min_members"] = kMinMembers;
  d["max_members_limit"] = kMaxMembersLimit;
  d["pin_probe_limit"] = kPinProbeLimit;
  d["index_probe_limit"] = kIndexProbeLimit;
  d["max_blocks"] = kMaxBlocks;
  d["sizeof_superblock"] = sizeof(Superblock);
  d["sizeof_control"] = sizeof(Control);
  d["sizeof_member_slot"] = sizeof(MemberSlot);
  d["sizeof_block_desc"] = sizeof(BlockDesc);
  d["sizeof_geometry"] = sizeof(Geometry);
  d["sizeof_channel"] = sizeof(Channel);
  d["sizeof_host_line"] = sizeof(HostLine);
  d["sizeof_shard_lock"] = sizeof(ShardLock);
  d["max_lock_shards"] = kMaxLockShards;
  d["lock_hosts"] = kLockHosts;
  d["transfer_channels"] = kTransferChannels;
  d["transfer_max_blocks_cap"] = kTransferMaxBlocksCap;
  py::dict off;
  off["superblock.layout_version"] = offsetof(Superblock, layout_version);
  off["superblock.header_bytes"] = offsetof(Superblock, header_bytes);
  off["superblock.uuid"] = offsetof(Superblock, uuid);
  off["superblock.total_bytes"] = offsetof(Superblock, total_bytes);
  off["superblock.created_ns"] = offsetof(Superblock, created_ns);
  off["superblock.creator_pid"] = offsetof(Superblock, creator_pid);
  off["superblock.coherence"] = offsetof(Superblock, coherence);
  off["superblock.flags"] = offsetof(Superblock, flags);
  off["superblock.max_members"] = offsetof(Superblock, max_members);
  off["superblock.lock_shards"] = offsetof(Superblock, lock_shards);
  off["superblock.geometry"] = offsetof(Superblock, geometry);
  off["superblock.num_blocks"] = offsetof(Superblock, num_blocks);
  off["superblock.index_slots"] = offsetof(Superblock, index_slots);
  off["superblock.index_probe_limit"] = offsetof(Superblock, index_probe_limit);
  off["superblock.transfer_max_blocks"] = offsetof(Superblock, transfer_max_blocks);
  off["control.channel_event"] = offsetof(Control, channel_event);
  off["join_line.owner"] = offsetof(JoinLine, owner);
  off["join_line.since_ns"] = offsetof(JoinLine, since_ns);
  off["join_line.host_id"] = offsetof(JoinLine, host_id);
  off["join_line.pid"] = offsetof(JoinLine, pid);
  off["join_line.lines_used"] = offsetof(JoinLine, lines_used);
  off["host_line.host_id"] = offsetof(HostLine, host_id);
  off["host_line.hold_ns"] = offsetof(HostLine, hold_ns);
  off["host_line.hold_lease_ns"] = offsetof(HostLine, hold_lease_ns);
  off["channel.ctl"] = offsetof(Channel, ctl);
  off["channel.ready"] = offsetof(Channel, ready);
  off["channel.waiters"] = offsetof(Channel, waiters);
  off["channel.req_key"] = offsetof(Channel, req_key);
  off["channel.first_key"] = offsetof(Channel, first_key);
  off["channel.num_blocks"] = offsetof(Channel, num_blocks);
  off["channel.num_layers"] = offsetof(Channel, num_layers);
  off["channel.open_ns"] = offsetof(Channel, open_ns);
  off["channel.done_ns"] = offsetof(Channel, done_ns);
  off["superblock.regions"] = offsetof(Superblock, regions);
  off["superblock.reserved"] = offsetof(Superblock, reserved);
  off["superblock.checksum"] = offsetof(Superblock, checksum);
  off["geometry.block_bytes"] = offsetof(Geometry, block_bytes);
  off["geometry.block_stride"] = offsetof(Geometry, block_stride);
  off["control.free_hint"] = offsetof(Control, free_hint);
  off["control.clock_hand"] = offsetof(Control, clock_hand);
  off["control.attach_seq"] = offsetof(Control, attach_seq);
  off["control.retired"] = offsetof(Control, retired);
  off["control.join"] = offsetof(Control, join);
  off["control.hosts"] = offsetof(Control, hosts);
  off["host_line.ticket"] = offsetof(HostLine, ticket);
  off["host_line.local"] = offsetof(HostLine, local);
  off["host_line.heartbeat_ns"] = offsetof(HostLine, heartbeat_ns);
  off["host_line.choosing"] = offsetof(HostLine, choosing);
  off["member.ctl"] = offsetof(MemberSlot, ctl);
  off["member.start_time"] = offsetof(MemberSlot, start_time);
  off["member.host_id"] = offsetof(MemberSlot, host_id);
  off["member.heartbeat_ns"] = offsetof(MemberSlot, heartbeat_ns);
  off["member.attach_ns"] = offsetof(MemberSlot, attach_ns);
  off["member.counters"] = offsetof(MemberSlot, counters);
  off["member.pin_op"] = offsetof(MemberSlot, pin_op);
  off["desc.pins"] = offsetof(BlockDesc, pins);
  off["desc.key"] = offsetof(BlockDesc, key);
  off["desc.crc"] = offsetof(BlockDesc, crc);
  off["desc.desc_flags"] = offsetof(BlockDesc, desc_flags);
  d["offsets"] = off;
  py::dict regions;
  regions["control"] = int(kRegionControl);
  regions["members"] = int(kRegionMembers);
  regions["states"] = int(kRegionStates);
  regions["descriptors"] = int(kRegionDescriptors);
  regions["index"] = int(kRegionIndex);
  regions["transfer"] = int(kRegionTransfer);
  regions["pins"] = int(kRegionPins);
  regions["data"] = int(kRegionData);
  d["regions"] = regions;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pykvshm C++ core (private: use the pykvshm package)";
  pykvshm::bindings::register_errors(m);
  pykvshm::bindings::register_pool(m);
  pykvshm::bindings::register_dax(m);
  m.def("layout_info", &layout_info, "Sizes and offsets of the on-media layout");
  m.def("crc32c", [](py::buffer b, uint32_t crc) {
    py::buffer_info info = b.request();
    return pykvshm::crc32c(info.ptr, size_t(info.size * info.itemsize), crc);
  }, py::arg("data"), py::arg("crc") = 0);
  m.def("crc32c_hardware", &pykvshm::crc32c_hardware_available);
  m.def("flush_instruction", [] { return std::string(pykvshm::visibility::name(pykvshm::visibility::detected_flush())); });
  m.def("invalidate_instruction", [] { return std::string(pykvshm::visibility::name(pykvshm::visibility::detected_invalidate())); });
  m.def("lines_flushed", &pykvshm::visibility::lines_flushed);
  m.def("lines_invalidated", &pykvshm::visibility::lines_invalidated);
  m.def("process_start_time", &pykvshm::process_start_time);
  m.def("local_host_id", &pykvshm::local_host_id);
  m.def("proc_shows_own_pids", &pykvshm::proc_shows_own_pids);
  m.def("validate_superblock", [](py::bytes data, uint64_t file_size, const std::string& name) {
    std::string s = data;
    pykvshm::validate_superblock(reinterpret_cast<const uint8_t*>(s.data()), s.size(), file_size, name);
  });
}
