// Pins the on-media layout of a pool (layout version 4) and the checks that
// guard it.
//
// Every number below is written out by hand from docs/design/layout.md, not
// computed from the structs: a change to a struct, an encoding or the region
// plan must fail here until the layout version is bumped and the note updated.
// validate_superblock is then fed one corruption at a time; each must be
// rejected with its own ErrorCode and without touching the bytes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pykvshm/crc32c.h"
#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/shards.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"
#include "pykvshm/state.h"

#include "test_support.h"

namespace pykvshm {
namespace {

using namespace layout;
using namespace ::pykvshm::testing;

constexpr const char* kBump = "on-media layout changed: bump layout::kLayoutVersion and update docs/design/layout.md";

// PIN(expression, expected): one field, one message that says what to do.
#define PIN(expr, expected) \
  EXPECT_EQ(static_cast<uint64_t>(expr), static_cast<uint64_t>(expected)) << #expr << ": " << kBump

// ---------------------------------------------------------------------------
// Struct sizes and field offsets

TEST(LayoutPins, Constants) {
  EXPECT_EQ(std::string(kMagic, sizeof kMagic), std::string("PYKVSHM\0", 8)) << kBump;
  PIN(kLayoutVersion, 4);
  PIN(kPageBytes, 4096);
  PIN(kDataAlign, 2 * 1024 * 1024);
  PIN(kBlockAlign, 64);
  PIN(kDefaultMaxMembers, 4096);
  PIN(kMinMembers, 2);
  PIN(kMaxMembersLimit, 65535);
  PIN(kPinProbeLimit, 64);
  PIN(kMaxPinRecords, 1ull << 29);
  PIN(kIndexProbeLimit, 64);
  PIN(kMaxBlocks, 268435455);
  PIN(kFlagBlockChecksums, 1);
  PIN(Coherence::kCoherent, 0);
  PIN(Coherence::kNoncoherent, 1);
  PIN(kEntryEmpty, 0);
  PIN(kEntryTomb, 1);
}

TEST(LayoutPins, EnumsStoredInThePool) {
  PIN(kRegionControl, 0);
  PIN(kRegionMembers, 1);
  PIN(kRegionStates, 2);
  PIN(kRegionDescriptors, 3);
  PIN(kRegionIndex, 4);
  PIN(kRegionTransfer, 5);
  PIN(kRegionData, 6);
  PIN(kRegionPins, 7);
  PIN(kRegionCount, 8);
  // Counters are summed across members by index: the index is on media.
  PIN(kCtrHits, 0);
  PIN(kCtrMisses, 1);
  PIN(kCtrEvictions, 2);
  PIN(kCtrBytesIn, 3);
  PIN(kCtrBytesOut, 4);
  PIN(kCtrPublished, 5);
  PIN(kCtrDuplicates, 6);
  PIN(kCtrRecovered, 7);
  PIN(kCtrIndexFull, 8);
  PIN(kCtrChecksumErrors, 9);
  PIN(kCtrAllocs, 10);
  PIN(kCtrPinsRefused, 11);
  PIN(kCounterCount, 16);
  PIN(kMemberFree, 0);
  PIN(kMemberAlive, 1);
  PIN(kMemberRecovering, 2);
  PIN(kMemberClaiming, 3);
  PIN(kFree, 0);
  PIN(kWriting, 1);
  PIN(kSealed, 2);
  PIN(kEvicting, 3);
}

TEST(LayoutPins, RegionDesc) {
  PIN(sizeof(RegionDesc), 16);
  PIN(offsetof(RegionDesc, offset), 0);
  PIN(offsetof(RegionDesc, size), 8);
}

TEST(LayoutPins, Geometry) {
  PIN(sizeof(Geometry), 40);
  PIN(alignof(Geometry), 8);
  PIN(offsetof(Geometry, num_layers), 0);
  PIN(offsetof(Geometry, num_kv_heads), 4);
  PIN(offsetof(Geometry, head_dim), 8);
  PIN(offsetof(Geometry, block_tokens), 12);
  PIN(offsetof(Geometry, dtype_code), 16);
  PIN(offsetof(Geometry, dtype_size), 20);
  PIN(offsetof(Geometry, block_bytes), 24);
  PIN(offsetof(Geometry, block_stride), 32);
}

TEST(LayoutPins, Superblock) {
  PIN(sizeof(Superblock), 512);
  PIN(offsetof(Superblock, magic), 0);
  PIN(offsetof(Superblock, layout_version), 8);
  PIN(offsetof(Superblock, header_bytes), 12);
  PIN(offsetof(Superblock, uuid), 16);
  PIN(offsetof(Superblock, total_bytes), 32);
  PIN(offsetof(Superblock, created_ns), 40);
  PIN(offsetof(Superblock, creator_pid), 48);
  PIN(offsetof(Superblock, coherence), 52);
  PIN(offsetof(Superblock, flags), 56);
  PIN(offsetof(Superblock, max_members), 60);
  PIN(offsetof(Superblock, geometry), 64);
  PIN(offsetof(Superblock, num_blocks), 104);
  PIN(offsetof(Superblock, index_slots), 112);
  PIN(offsetof(Superblock, index_probe_limit), 120);
  // 124 .. 128: four zero bytes
  PIN(offsetof(Superblock, regions), 128);
  PIN(sizeof(Superblock::regions), 8 * 16);
  PIN(offsetof(Superblock, lock_shards), 256);
  PIN(offsetof(Superblock, reserved), 264);
  PIN(sizeof(Superblock::reserved), 240);
  PIN(sizeof(ShardLock), 2304);
  PIN(offsetof(ShardLock, lines), 256);
  PIN(kMaxLockShards, 16);
  PIN(offsetof(Superblock, checksum), 504);
  PIN(sizeof(Superblock::checksum), 8);
}

TEST(LayoutPins, Control) {
  PIN(sizeof(PaddedWord), 128);
  PIN(alignof(PaddedWord), 128);
  PIN(offsetof(PaddedWord, value), 0);
  PIN(sizeof(Control), 4096);
  PIN(alignof(Control), 128);
  PIN(offsetof(Control, free_hint), 0);
  PIN(offsetof(Control, clock_hand), 128);
  PIN(offsetof(Control, attach_seq), 256);
  // 384 .. 1024: five more 128-byte words, zero in layout v1
  PIN(offsetof(Control, retired), 1024);
  PIN(sizeof(Control::retired), 16 * 8);
  // Noncoherent pools' lock (zero, i.e. unused, in coherent pools and in pools made before it)
  PIN(offsetof(Control, join), 1152);
  PIN(sizeof(JoinLine), 128);
  PIN(offsetof(JoinLine, owner), 0);
  PIN(offsetof(JoinLine, since_ns), 8);
  PIN(offsetof(JoinLine, host_id), 16);
  PIN(offsetof(JoinLine, pid), 24);
  PIN(offsetof(JoinLine, lines_used), 32);
  PIN(offsetof(Control, hosts), 1280);
  PIN(kLockHosts, 16);
  PIN(sizeof(HostLine), 128);
  PIN(offsetof(HostLine, host_id), 0);
  PIN(offsetof(HostLine, ticket), 8);
  PIN(offsetof(HostLine, local), 16);
  PIN(offsetof(HostLine, heartbeat_ns), 24);
  PIN(offsetof(HostLine, choosing), 32);
  PIN(offsetof(HostLine, hold_ns), 40);
  PIN(offsetof(HostLine, hold_lease_ns), 48);
  PIN(offsetof(Control, pad), 3328);
}

TEST(LayoutPins, MemberSlot) {
  PIN(sizeof(MemberSlot), 256);
  PIN(alignof(MemberSlot), 64);
  PIN(offsetof(MemberSlot, ctl), 0);
  PIN(offsetof(MemberSlot, start_time), 8);
  PIN(offsetof(MemberSlot, host_id), 16);
  PIN(offsetof(MemberSlot, heartbeat_ns), 24);
  PIN(offsetof(MemberSlot, attach_ns), 32);
  PIN(offsetof(MemberSlot, pin_op), 40);
  PIN(offsetof(MemberSlot, pad0), 48);
  PIN(offsetof(MemberSlot, counters), 64);
  PIN(sizeof(MemberSlot::counters), 16 * 8);
  PIN(offsetof(MemberSlot, pad1), 192);
}

TEST(LayoutPins, BlockDesc) {
  PIN(sizeof(BlockDesc), 64);
  PIN(alignof(BlockDesc), 64);
  PIN(offsetof(BlockDesc, pins), 0);
  PIN(offsetof(BlockDesc, reserved0), 8);
  PIN(offsetof(BlockDesc, key), 16);
  PIN(offsetof(BlockDesc, crc), 32);
  PIN(offsetof(BlockDesc, desc_flags), 36);
  PIN(offsetof(BlockDesc, pad), 40);
  PIN(sizeof(BlockDesc::pad), 24);
}

TEST(LayoutPins, AtomicWords) {
  PIN(sizeof(Atomic64), 8);
  PIN(alignof(Atomic64), 8);
  PIN(sizeof(Atomic32), 4);
  PIN(alignof(Atomic32), 4);
}

// The words in shared memory are bit-packed; their encodings are layout too.
TEST(LayoutPins, WordEncodings) {
  // Block state: gen:32 | kind:3 | ref:1 | owner:28
  PIN(word::state(0, kFree, 0), 0);
  PIN(word::state(1, 0, 0), 1ull << 32);
  PIN(word::state(0, kWriting, 0), 1ull << 29);
  PIN(word::state(0, kSealed, 0), 2ull << 29);
  PIN(word::state(0, kEvicting, 0), 3ull << 29);
  PIN(word::state(0, 0, 0, true), 1ull << 28);
  PIN(word::state(0, 0, 0x0fffffff), 0x0fffffffull);
  PIN(word::state(0xdeadbeef, kSealed, 5, true), 0xdeadbeef50000005ull);
  // Handle: gen:32 | index:32
  PIN(word::handle(7, 9), (7ull << 32) | 9);
  // Index entry: 1 | fingerprint:15 | gen:20 | index:28
  PIN(word::entry(0, 0, 0), 1ull << 63);
  PIN(word::entry(0x7fff, 0, 0), 0xffff000000000000ull);
  PIN(word::entry(0, 0xfffff, 0), 0x8000fffff0000000ull);
  PIN(word::entry(0, 0, 0x0fffffff), 0x800000000fffffffull);
  PIN(word::entry(1, 0x100001, 3), 0x8001000010000003ull);  // gen keeps its low 20 bits
  // Member ctl: status:2 | epoch:30 | payload:32
  PIN(word::member(kMemberAlive, 0, 0), 1ull << 62);
  PIN(word::member(kMemberClaiming, 0x3fffffff, 0xffffffff), 0xffffffffffffffffull);
  PIN(word::member(kMemberRecovering, 2, 0x12345678), 0x8000000212345678ull);
  PIN(word::recoverer(5, 0x123456), 0x00053456u);  // recoverer slot:16 | epoch:16 (low bits)
  PIN(word::recoverer(0xfffe, 0x1ffff), 0xfffeffffu);
  // Descriptor pin word: count:16 | tag slot:16 | tag seq:32
  PIN(word::pins(1, 0, 0), 1ull << 48);
  PIN(word::pins(0xffff, 0xfffe, 0xffffffffu), 0xfffffffeffffffffull);
  PIN(word::pins(3, 2, 7), 0x0003000200000007ull);
  // Pin journal: seq:32 | op:2 | landed:1 | position:29
  PIN(word::journal(1, word::kPinOpPin, 5), 0x0000000140000005ull);
  PIN(word::journal(1, word::kPinOpUnpin, 5, true), 0x00000001a0000005ull);
  PIN(word::journal(0xffffffffu, word::kPinOpNone, (1ull << 29) - 1), 0xffffffff1fffffffull);
  // Pin record: live:1 | held:1 | 0:18 | slot:16 | block:28
  PIN(word::pin_rec(0, 0, false), 1ull << 63);
  PIN(word::pin_rec(0xffff, 0x0fffffff, true), 0xc0000fffffffffffull);
  PIN(word::pin_rec(2, 9, true), 0xc000000020000009ull);
  // Key hashing decides where an entry lives: a pool written by one build must
  // be searchable by another.
  PIN(word::mix64(0), 0);
  PIN(word::mix64(1), 0x5692161d100b05e5ull);
  PIN(word::key_hash(0, 0), 0x48218226ff3cd4bfull);
  PIN(word::key_hash(1, 2), 0xf2826f98653e9e57ull);
  PIN(word::key_fp(0x48218226ff3cd4bfull), 0x2410);
}

// ---------------------------------------------------------------------------
// Geometry and the region plan

TEST(LayoutPlan, MakeGeometry) {
  Geometry small = make_geometry({2, 2, 8, 4, 1, 2});
  PIN(small.block_bytes, 512);
  PIN(small.block_stride, 512);
  Geometry odd = make_geometry({1, 1, 3, 1, 7, 1});  // 6 bytes, padded to a cache line
  PIN(odd.block_bytes, 6);
  PIN(odd.block_stride, 64);
  PIN(odd.dtype_code, 7);
  Geometry llama = make_geometry({32, 8, 128, 16, 2, 2});
  PIN(llama.block_bytes, 2 * 1024 * 1024);
  PIN(llama.block_stride, 2 * 1024 * 1024);
  try {
    make_geometry({0, 2, 8, 4, 1, 2});
    ADD_FAILURE() << "a zero dimension was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kGeometry);
  }
  try {
    make_geometry({2, 2, 8, 4, 1, 3});
    ADD_FAILURE() << "a 3-byte dtype was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kGeometry);
  }
}

struct ExpectedPlan {
  uint64_t num_blocks, index_slots, total_bytes;
  RegionDesc regions[kRegionCount];
};

void expect_plan(const LayoutPlan& p, const ExpectedPlan& e) {
  PIN(p.num_blocks, e.num_blocks);
  PIN(p.index_slots, e.index_slots);
  PIN(p.total_bytes, e.total_bytes);
  for (uint32_t r = 0; r < kRegionCount; ++r) {
    EXPECT_EQ(p.regions[r].offset, e.regions[r].offset) << "region " << r << " offset: " << kBump;
    EXPECT_EQ(p.regions[r].size, e.regions[r].size) << "region " << r << " size: " << kBump;
  }
}

// 512-byte blocks in 8 MiB with 128 member slots: the metadata (states,
// descriptors, index, 128 transfer channels, 8 pin records per block) of 12288
// blocks would pass the first 2 MiB boundary; the search settles on 8192 blocks
// with data at [2 MiB, 6 MiB); the index has next_pow2(2 * 8192) slots; a transfer may cover
// 8192 * 512 / (64 * 128) = 512 blocks (the table stays at most 1/8 of the data).
TEST(LayoutPlan, SmallBlocksEightMiB) {
  LayoutPlan p = plan_layout(make_geometry({2, 2, 8, 4, 1, 2}), 8ull << 20, kPageBytes, 128);
  PIN(p.transfer_max_blocks, 512);
  PIN(p.max_members, 128);
  expect_plan(p, {8192, 16384, 8ull << 20,
                  {{4096, 40960},        // control + lock shard table (16 x 2304)
                   {45056, 32768},        // members: 128 x 256
                   {77824, 65536},       // states: 8192 x 8
                   {143360, 524288},     // descriptors: 8192 x 64
                   {667648, 131072},     // index: 16384 x 8
                   {798720, 540672},     // transfer: 128 x (128 + 512 x 8)
                   {2097152, 4194304},   // data: 8192 x 512
                   {1339392, 524288}}});  // pin records: 65536 x 8, after the transfer channels
}

// 2 MiB blocks, a capacity that is not a multiple of anything, rounded up to
// 2 MiB: 48 x 2 MiB of file, one 2 MiB unit of metadata (the default 4096
// member slots take 1 MiB of it), 47 blocks.  The state array (376 bytes) is
// padded to a cache line; the index has its minimum size; the pin records are
// 2 x 4096 (twice the member slots, more than 8 per block).
TEST(LayoutPlan, LargeBlocksOddCapacity) {
  LayoutPlan p = plan_layout(make_geometry({32, 8, 128, 16, 2, 2}), 100'000'000, kDataAlign);
  PIN(p.transfer_max_blocks, 48);  // 47 rounded up to a multiple of 8
  PIN(p.max_members, 4096);
  expect_plan(p, {47, 1024, 48ull * (2ull << 20),
                  {{4096, 40960},
                   {45056, 1048576},
                   {1093632, 384},
                   {1094016, 3008},
                   {1097024, 8192},
                   {1105216, 65536},  // transfer: 128 x (128 + 48 x 8)
                   {2097152, 47ull * (2ull << 20)},
                   {1170752, 65536}}});
}

TEST(LayoutPlan, MemberTableSizeIsValidated) {
  for (uint32_t bad : {0u, 1u, 65536u}) {
    try {
      plan_layout(make_geometry({2, 2, 8, 4, 1, 2}), 8ull << 20, kPageBytes, bad);
      ADD_FAILURE() << "max_members " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("max_members"), std::string::npos) << e.what();
    }
  }
}

TEST(LayoutPlan, TooSmallForOneBlockIsFull) {
  try {
    plan_layout(make_geometry({2, 2, 8, 4, 1, 2}), 1ull << 20, kPageBytes);
    ADD_FAILURE() << "a 1 MiB pool cannot hold the 2 MiB-aligned data region";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFull) << e.what();
    EXPECT_NE(std::string(e.what()).find("too small"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------
// validate_superblock: one corruption at a time

std::string shm_name_for_test() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string n = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->test_suite_name() + "-" + info->name();
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  return n;
}

class SuperblockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    name_ = shm_name_for_test();
    auto p = Pool::create(name_, {2, 2, 8, 4, 1, 2}, 4ull << 20, PoolOptions{});
    file_size_ = p->total_bytes();
    p->close();
    Mapping m = Mapping::open(name_, MapOptions{});
    good_ = m.read_prefix(sizeof(Superblock));
    ASSERT_EQ(good_.size(), sizeof(Superblock));
    validate_superblock(good_.data(), good_.size(), file_size_, name_);  // the baseline is valid
  }
  void TearDown() override {
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }

  Superblock* sb(std::vector<uint8_t>& img) { return reinterpret_cast<Superblock*>(img.data()); }
  void reseal(std::vector<uint8_t>& img) { sb(img)->checksum = superblock_checksum(sb(img)); }

  // Validates `img` and returns the error; the image must come back unchanged.
  std::optional<Error> validate(const std::vector<uint8_t>& img, uint64_t file_size, size_t n = sizeof(Superblock)) {
    const std::vector<uint8_t> before = img;
    std::optional<Error> err;
    try {
      validate_superblock(img.data(), n, file_size, name_);
    } catch (const Error& e) {
      err = e;
    }
    EXPECT_EQ(img, before) << "validate_superblock modified its input";
    return err;
  }

  void expect_rejected(const std::vector<uint8_t>& img, uint64_t file_size, ErrorCode code, const char* says,
                       size_t n = sizeof(Superblock)) {
    auto err = validate(img, file_size, n);
    ASSERT_TRUE(err.has_value()) << "corruption accepted; expected " << code_name(code);
    EXPECT_EQ(err->code(), code) << "got " << code_name(err->code()) << ": " << err->what();
    EXPECT_NE(std::string(err->what()).find(says), std::string::npos) << "message lacks '" << says << "': " << err->what();
    EXPECT_NE(std::string(err->what()).find(name_), std::string::npos) << "message does not name the pool: " << err->what();
  }

  std::string name_;
  uint64_t file_size_ = 0;
  std::vector<uint8_t> good_;
};

TEST_F(SuperblockTest, BadMagic) {
  auto img = good_;
  img[0] = 'X';
  reseal(img);  // only the magic is wrong
  expect_rejected(img, file_size_, ErrorCode::kCorrupt, "bad magic");
  auto zero = good_;
  std::memset(zero.data(), 0, zero.size());
  expect_rejected(zero, file_size_, ErrorCode::kCorrupt, "bad magic");
}

// The lock shard count is read from shared memory: anything but a power of two the pool
// allows (1 in a coherent pool, up to max_lock_shards in a noncoherent one) is rejected
// before it is used to size anything.
TEST_F(SuperblockTest, LockShards) {
  ASSERT_EQ(sb(good_)->lock_shards, 1u);  // a coherent pool
  for (uint32_t bad : {0u, 2u, 3u, 8u, 16u, 0xffffffffu}) {
    auto img = good_;
    sb(img)->lock_shards = bad;
    reseal(img);
    expect_rejected(img, file_size_, ErrorCode::kCorrupt, "lock shards");
  }
  auto nc = good_;
  sb(nc)->coherence = uint32_t(Coherence::kNoncoherent);
  const uint32_t most = max_lock_shards(sb(nc)->num_blocks);
  ASSERT_GE(most, 2u);
  for (uint32_t ok = 1; ok <= most; ok *= 2) {
    sb(nc)->lock_shards = ok;
    reseal(nc);
    EXPECT_FALSE(validate(nc, file_size_).has_value()) << ok << " shards";
  }
  for (uint32_t bad : {0u, 3u, most * 2, 1u << 31}) {
    sb(nc)->lock_shards = bad;
    reseal(nc);
    expect_rejected(nc, file_size_, ErrorCode::kCorrupt, "lock shards");
  }
  auto pad = good_;
  sb(pad)->reserved32 = 1;
  reseal(pad);
  expect_rejected(pad, file_size_, ErrorCode::kCorrupt, "reserved");
}

TEST_F(SuperblockTest, VersionZeroIsInitialising) {
  auto img = good_;
  uint32_t v = 0;
  std::memcpy(img.data() + offsetof(Superblock, layout_version), &v, 4);
  expect_rejected(img, file_size_, ErrorCode::kInitializing, "layout version 0");
}

TEST_F(SuperblockTest, NextVersionIsLayoutMismatch) {
  auto img = good_;
  uint32_t v = kLayoutVersion + 1;  // the next version: not this build's
  std::memcpy(img.data() + offsetof(Superblock, layout_version), &v, 4);
  // The version word is outside the checksum: this image is otherwise valid.
  expect_rejected(img, file_size_, ErrorCode::kLayoutMismatch, ("layout version " + std::to_string(v)).c_str());
  auto err = validate(img, file_size_);
  ASSERT_TRUE(err.has_value());
  EXPECT_NE(std::string(err->what()).find("reads layout version " + std::to_string(kLayoutVersion)), std::string::npos)
      << err->what();
  // Older layouts are refused the same way.
  v = 0xffffffffu;
  std::memcpy(img.data() + offsetof(Superblock, layout_version), &v, 4);
  expect_rejected(img, file_size_, ErrorCode::kLayoutMismatch, "layout version 4294967295");
}

TEST_F(SuperblockTest, ChecksumMismatch) {
  auto img = good_;
  sb(img)->created_ns ^= 1;  // a field nothing else checks
  expect_rejected(img, file_size_, ErrorCode::kCorrupt, "checksum");
  auto img2 = good_;
  sb(img2)->checksum ^= 0x100;
  expect_rejected(img2, file_size_, ErrorCode::kCorrupt, "checksum");
  auto img3 = good_;
  img3[offsetof(Superblock, reserved) + 10] = 1;  // reserved bytes are covered too
  expect_rejected(img3, file_size_, ErrorCode::kCorrupt, "checksum");
}

TEST_F(SuperblockTest, TotalBytesDisagreesWithFileSize) {
  expect_rejected(good_, file_size_ - kPageBytes, ErrorCode::kCorrupt, "truncated or resized");
  expect_rejected(good_, file_size_ + kPageBytes, ErrorCode::kCorrupt, "truncated or resized");
  auto img = good_;
  sb(img)->total_bytes += kPageBytes;
  reseal(img);
  expect_rejected(img, file_size_, ErrorCode::kCorrupt, "truncated or resized");
}

TEST_F(SuperblockTest, RegionMoved) {
  for (uint32_t r = 0; r < kRegionCount; ++r) {
    SCOPED_TRACE("region " + std::to_string(r));
    auto img = good_;
    sb(img)->regions[r].offset += 64;
    reseal(img);
    expect_rejected(img, file_size_, ErrorCode::kCorrupt, ("region " + std::to_string(r)).c_str());
    auto img2 = good_;
    sb(img2)->regions[r].size += 64;
    reseal(img2);
    expect_rejected(img2, file_size_, ErrorCode::kCorrupt, ("region " + std::to_string(r)).c_str());
  }
  auto img = good_;
  sb(img)->index_slots *= 2;
  reseal(img);
  expect_rejected(img, file_size_, ErrorCode::kCorrupt, "slots");
}

TEST_F(SuperblockTest, Truncated) {
  expect_rejected(good_, file_size_, ErrorCode::kCorrupt, "truncated", sizeof(Superblock) - 1);
  expect_rejected(good_, file_size_, ErrorCode::kCorrupt, "truncated", 0);
  expect_rejected(good_, kPageBytes - 1, ErrorCode::kCorrupt, "truncated");
}

TEST_F(SuperblockTest, OtherFieldsAreChecked) {
  struct Case {
    const char* what;
    void (*mutate)(Superblock*);
  };
  const Case cases[] = {
      {"header bytes", [](Superblock* s) { s->header_bytes = 256; }},
      {"block count", [](Superblock* s) { s->num_blocks = 0; }},
      {"block sizes", [](Superblock* s) { s->geometry.block_stride += 64; }},
      {"geometry", [](Superblock* s) { s->geometry.dtype_size = 3; }},
      {"member table", [](Superblock* s) { s->max_members = 64; }},  // valid range, regions then disagree
      {"member table too small", [](Superblock* s) { s->max_members = 1; }},
      {"member table too large", [](Superblock* s) { s->max_members = 65536; }},
      {"coherence", [](Superblock* s) { s->coherence = 2; }},
      {"feature flags", [](Superblock* s) { s->flags = 1u << 7; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto img = good_;
    c.mutate(sb(img));
    reseal(img);
    auto err = validate(img, file_size_);
    ASSERT_TRUE(err.has_value()) << c.what << " corruption accepted";
    EXPECT_EQ(err->code(), ErrorCode::kCorrupt) << err->what();
  }
}

// Opening a pool with a bad header fails with the same codes and leaves the
// backing store byte-for-byte as it was.
TEST_F(SuperblockTest, OpenRejectsWithoutWriting) {
  auto overwrite = [&](const std::vector<uint8_t>& img) {
    Mapping m = Mapping::open(name_, MapOptions{});
    m.map(MapOptions{});
    std::memcpy(m.base(), img.data(), img.size());
  };
  auto whole_file = [&] {
    Mapping m = Mapping::open(name_, MapOptions{});
    return m.read_prefix(size_t(file_size_));
  };
  struct Case {
    const char* what;
    uint32_t version;
    bool break_checksum;
    bool creator_at_work;  // hold the flock a creator holds until it publishes the version
    ErrorCode code;
  };
  const Case cases[] = {
      {"next version", kLayoutVersion + 1, false, false, ErrorCode::kLayoutMismatch},
      {"version 0, creator at work", 0, false, true, ErrorCode::kInitializing},
      {"version 0, creator gone", 0, false, false, ErrorCode::kCorrupt},
      {"checksum", kLayoutVersion, true, false, ErrorCode::kCorrupt},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto img = good_;
    std::memcpy(img.data() + offsetof(Superblock, layout_version), &c.version, 4);
    if (c.break_checksum) sb(img)->checksum ^= 1;
    overwrite(img);
    const auto before = whole_file();
    int creator = -1;
    if (c.creator_at_work) {
      creator = ::open(Mapping::shm_path(name_).c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_GE(creator, 0);
      ASSERT_EQ(flock(creator, LOCK_EX), 0);
    }
    struct Unlock {
      int fd;
      ~Unlock() {
        if (fd >= 0) ::close(fd);
      }
    } unlock{creator};
    try {
      auto p = Pool::open(name_, PoolOptions{});
      ADD_FAILURE() << "opened a pool with a bad superblock (" << c.what << ")";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), c.code) << code_name(e.code()) << ": " << e.what();
    }
    EXPECT_TRUE(whole_file() == before) << "a rejected open modified the pool";
  }
  overwrite(good_);
  auto p = Pool::open(name_, PoolOptions{});  // and the restored header opens again
  EXPECT_NO_THROW(p->check(true));
}

}  // namespace
}  // namespace pykvshm
