// Pool::open_read_only, the monitor: it validates like open(), takes no member
// slot, reads stats/members/check while members work, and every entry point
// that would change the pool throws kReadOnly before touching shared memory
// (under ASan: an out-of-bounds access on the monitor's empty per-member state
// would show here).  Both coherence modes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"

#include "test_support.h"

namespace pykvshm {
namespace {

using namespace ::pykvshm::testing;

class ReadOnlyTest : public ::testing::TestWithParam<layout::Coherence> {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->name();
    for (char& c : name_)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
    PoolOptions o;
    o.coherence = GetParam();
    owner_ = Pool::create(name_, kSmall, 8ull << 20, o);
  }
  void TearDown() override {
    owner_.reset();
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }
  static std::vector<uint8_t> keys(uint64_t first, size_t n) {
    std::vector<uint8_t> k(16 * n);
    for (size_t i = 0; i < n; ++i) {
      uint64_t k0 = first + i, k1 = ~(first + i);
      std::memcpy(&k[16 * i], &k0, 8);
      std::memcpy(&k[16 * i + 8], &k1, 8);
    }
    return k;
  }
  std::string name_;
  std::unique_ptr<Pool> owner_;
};

TEST_P(ReadOnlyTest, SeesWhatMembersDoAndTakesNoSlot) {
  auto ro = Pool::open_read_only(name_, PoolOptions{});
  ASSERT_TRUE(ro->read_only());
  EXPECT_EQ(ro->num_blocks(), owner_->num_blocks());
  EXPECT_EQ(ro->uuid(), owner_->uuid());
  auto k = keys(100, 4);
  std::vector<uint8_t> src(4 * kBlockBytes, 7);
  ASSERT_EQ(owner_->publish(k.data(), 4, src.data(), kBlockBytes), 4u);
  std::vector<uint64_t> h(4);
  ASSERT_EQ(owner_->acquire(k.data(), 4, h.data()), 4u);
  Stats s = ro->stats();
  EXPECT_EQ(s.sealed, 4u);
  EXPECT_EQ(s.pinned, 4u);
  EXPECT_EQ(s.members, 1u);  // the owner only
  EXPECT_EQ(s.counters[layout::kCtrHits], 4u);
  auto members = ro->members();
  ASSERT_EQ(members.size(), 1u);
  EXPECT_FALSE(members[0].self);
  EXPECT_TRUE(members[0].alive);
  ro->check(false);
  owner_->release(h.data(), 4);
  ro->check(true);
  EXPECT_EQ(ro->stats().pinned, 0u);
}

TEST_P(ReadOnlyTest, EveryChangeIsRefused) {
  auto k = keys(7, 2);
  std::vector<uint8_t> src(2 * kBlockBytes, 1);
  ASSERT_EQ(owner_->publish(k.data(), 2, src.data(), kBlockBytes), 2u);
  auto ro = Pool::open_read_only(name_, PoolOptions{});
  std::vector<uint64_t> h(2, 0);
  std::vector<int64_t> pos(2, 0);
  std::vector<uint8_t> dst(2 * kBlockBytes);
  const uint8_t req[16] = {1};
  EXPECT_CODE(ro->alloc(1, true, h.data()), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->free(h.data(), 1), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->writable_block(h[0]), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->match(k.data(), 2), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->publish(k.data(), 2, src.data(), kBlockBytes), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->acquire(k.data(), 2, h.data()), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->release(h.data(), 2), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->pinned_block(h[0]), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->copy_out(h.data(), 2, dst.data(), kBlockBytes), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->reserve(k.data(), 2, pos.data(), h.data()), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->commit(h.data(), 2), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->abort_writes(h.data(), 2), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->recover(), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->transfer_open(req, k.data(), 2), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->transfer_attach(req, nullptr, 0, 1000), ErrorCode::kReadOnly);
  EXPECT_CODE(ro->debug_hold_lock(), GetParam() == layout::Coherence::kNoncoherent ? ErrorCode::kReadOnly
                                                                                   : ErrorCode::kInvalidHandle);
  ro->heartbeat();  // nothing to beat: no slot
  ro->add_counter(layout::kCtrHits, 1);
  EXPECT_EQ(owner_->stats().counters[layout::kCtrHits], 0u);
  EXPECT_EQ(owner_->stats().members, 1u);
  owner_->check(true);
  ro->close();
  ro->close();
}

TEST_P(ReadOnlyTest, MappingIsReadOnlyAndPlacementIsRefused) {
  auto ro = Pool::open_read_only(name_, PoolOptions{});
  // The kernel's view of the mapping: readable, shared, not writable (a stray write would fault,
  // not change the pool).
  EXPECT_TRUE(ro->mapping().read_only());
  char start[32];
  std::snprintf(start, sizeof start, "%lx-", static_cast<unsigned long>(reinterpret_cast<uintptr_t>(ro->base())));
  std::ifstream maps("/proc/self/maps");
  std::string line, perms;
  while (std::getline(maps, line))
    if (line.rfind(start, 0) == 0) perms = line.substr(line.find(' ') + 1, 4);
  EXPECT_EQ(perms, "r--s");
  PoolOptions placed;
  placed.map.prefault = true;
  EXPECT_CODE(Pool::open_read_only(name_, placed), ErrorCode::kPlacement);
  GeometryIn other = kSmall;
  other.num_layers = 3;
  EXPECT_CODE(Pool::open_read_only(name_, PoolOptions{}, &other), ErrorCode::kGeometry);
  EXPECT_CODE(Pool::open_read_only(name_ + "-missing", PoolOptions{}), ErrorCode::kNotFound);
}

INSTANTIATE_TEST_SUITE_P(Modes, ReadOnlyTest,
                         ::testing::Values(layout::Coherence::kCoherent, layout::Coherence::kNoncoherent),
                         [](const ::testing::TestParamInfo<layout::Coherence>& p) {
                           return p.param == layout::Coherence::kCoherent ? std::string("Coherent")
                                                                          : std::string("Noncoherent");
                         });

}  // namespace
}  // namespace pykvshm
