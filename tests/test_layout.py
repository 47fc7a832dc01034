"""The on-media layout is pinned: an accidental change must fail here."""

from __future__ import annotations

from pykvshm import _core

BUMP = "on-media layout changed: bump layout::kLayoutVersion and update docs/design/layout.md"

EXPECTED = {
    "layout_version": 4,
    "page_bytes": 4096,
    "data_align": 2 << 20,
    "block_align": 64,
    "default_max_members": 4096,
    "min_members": 2,
    "max_members_limit": 65535,
    "pin_probe_limit": 64,
    "index_probe_limit": 64,
    "max_blocks": (1 << 28) - 1,
    "sizeof_superblock": 512,
    "sizeof_control": 4096,
    "sizeof_member_slot": 256,
    "sizeof_block_desc": 64,
    "sizeof_geometry": 40,
    "sizeof_channel": 128,
    "sizeof_host_line": 128,
    "sizeof_shard_lock": 2304,
    "max_lock_shards": 16,
    "lock_hosts": 16,
    "transfer_channels": 128,
    "transfer_max_blocks_cap": 4096,
}

EXPECTED_OFFSETS = {
    "superblock.layout_version": 8,
    "superblock.header_bytes": 12,
    "superblock.uuid": 16,
    "superblock.total_bytes": 32,
    "superblock.created_ns": 40,
    "superblock.creator_pid": 48,
    "superblock.coherence": 52,
    "superblock.flags": 56,
    "superblock.max_members": 60,
    "superblock.geometry": 64,
    "superblock.num_blocks": 104,
    "superblock.index_slots": 112,
    "superblock.index_probe_limit": 120,
    "superblock.transfer_max_blocks": 124,
    "superblock.regions": 128,
    "superblock.lock_shards": 256,
    "superblock.reserved": 264,
    "superblock.checksum": 504,
    "geometry.block_bytes": 24,
    "geometry.block_stride": 32,
    "control.free_hint": 0,
    "control.clock_hand": 128,
    "control.attach_seq": 256,
    "control.channel_event": 384,
    "control.retired": 1024,
    "control.join": 1152,
    "control.hosts": 1280,
    "join_line.owner": 0,
    "join_line.since_ns": 8,
    "join_line.host_id": 16,
    "join_line.pid": 24,
    "join_line.lines_used": 32,
    "host_line.host_id": 0,
    "host_line.ticket": 8,
    "host_line.local": 16,
    "host_line.heartbeat_ns": 24,
    "host_line.choosing": 32,
    "host_line.hold_ns": 40,
    "host_line.hold_lease_ns": 48,
    "member.ctl": 0,
    "member.start_time": 8,
    "member.host_id": 16,
    "member.heartbeat_ns": 24,
    "member.attach_ns": 32,
    "member.pin_op": 40,
    "member.counters": 64,
    "desc.pins": 0,
    "desc.key": 16,
    "desc.crc": 32,
    "desc.desc_flags": 36,
    "channel.ctl": 0,
    "channel.ready": 8,
    "channel.waiters": 12,
    "channel.req_key": 16,
    "channel.first_key": 32,
    "channel.num_blocks": 48,
    "channel.num_layers": 52,
    "channel.open_ns": 56,
    "channel.done_ns": 64,
}


def test_layout_constants_pinned() -> None:
    info = _core.layout_info()
    for k, v in EXPECTED.items():
        assert info[k] == v, f"{k}: {info[k]} != {v}; {BUMP}"


def test_layout_offsets_pinned() -> None:
    offsets = _core.layout_info()["offsets"]
    assert set(offsets) == set(EXPECTED_OFFSETS), BUMP
    for k, v in EXPECTED_OFFSETS.items():
        assert offsets[k] == v, f"{k} at {offsets[k]}, expected {v}; {BUMP}"


def test_region_plan_pinned(pool_name: str) -> None:
    import pykvshm

    spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB") as p:
        with open(p.path, "rb") as f:
            raw = f.read(512)
    regions = [int.from_bytes(raw[128 + 16 * r : 136 + 16 * r], "little") for r in range(8)]
    sizes = [int.from_bytes(raw[136 + 16 * r : 144 + 16 * r], "little") for r in range(8)]
    nblocks = int.from_bytes(raw[104:112], "little")
    # 8 MiB of 512-byte blocks: the metadata (a 4096-slot member table, states,
    # descriptors, a 16384-slot index, 128 transfer channels of 512 handles and
    # 65536 pin records) takes the first 4 MiB (data is 2 MiB aligned); data fills the rest.
    assert nblocks == 8192, BUMP
    assert list(zip(regions, sizes)) == [
        (4096, 4096 + 36864),  # control, then the lock shard table: 16 x 2304
        (45056, 1048576),       # members: 4096 x 256
        (1093632, 65536),      # states: 8192 x 8
        (1159168, 524288),     # descriptors: 8192 x 64
        (1683456, 131072),     # index: 16384 x 8
        (1814528, 540672),     # transfer: 128 x (128 + 512 x 8)
        (4194304, 8192 * 512),  # data
        (2355200, 524288),     # pin records: 65536 x 8 (8 per block), after the transfer channels
    ], BUMP
