// Pin bookkeeping (docs/design/recovery.md, "Pins"): a count per block, a record
// per (member, pinned block), and a journal entry per member for the pin or unpin
// in flight.  Each test builds, word by word, the state a member leaves when it
// dies after a given step of pin or unpin (or its recoverer dies after a given
// step), declares it dead, recovers, and checks that its pin is released exactly
// once: the count ends at what the live members hold, no record of the dead
// member is left, and a strict check() passes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pykvshm/errors.h"
#include "pykvshm/layout.h"
#include "pykvshm/mapping.h"
#include "pykvshm/pool.h"
#include "pykvshm/shards.h"
#include "pykvshm/state.h"

#include "test_support.h"

namespace pykvshm {
namespace {

using namespace layout;
using namespace ::pykvshm::testing;

std::vector<uint8_t> key(uint64_t id) {
  std::vector<uint8_t> k(16);
  uint64_t k0 = id, k1 = word::mix64(id + 5) | 1;
  std::memcpy(&k[0], &k0, 8);
  std::memcpy(&k[8], &k1, 8);
  return k;
}

// The mapping seen as the layout, for building states by hand.
struct Raw {
  uint8_t* base;
  const Superblock* sb() const { return reinterpret_cast<const Superblock*>(base); }
  BlockDesc& desc(uint64_t i) const {
    return reinterpret_cast<BlockDesc*>(base + sb()->regions[kRegionDescriptors].offset)[i];
  }
  MemberSlot& member(uint32_t s) const {
    return reinterpret_cast<MemberSlot*>(base + sb()->regions[kRegionMembers].offset)[s];
  }
  Atomic64& rec(uint64_t pos) const { return reinterpret_cast<Atomic64*>(base + sb()->regions[kRegionPins].offset)[pos]; }
  uint64_t records() const { return sb()->regions[kRegionPins].size / 8; }
  uint32_t count(uint64_t i) const { return word::pins_count(desc(i).pins.load(std::memory_order_acquire)); }
  // Records of member slot s (any block), and the first one's position.
  uint64_t records_of(uint32_t s, uint64_t* first = nullptr) const {
    uint64_t n = 0;
    for (uint64_t p = 0; p < records(); ++p) {
      uint64_t r = rec(p).load(std::memory_order_acquire);
      if (word::rec_live(r) && word::rec_slot(r) == s) {
        if (n++ == 0 && first) *first = p;
      }
    }
    return n;
  }
  uint64_t free_record() const {
    for (uint64_t p = 0; p < records(); ++p)
      if (rec(p).load(std::memory_order_acquire) == 0) return p;
    return ~0ull;
  }
  uint32_t journal_seq(uint32_t s) const { return word::journal_seq(member(s).pin_op.load(std::memory_order_acquire)); }
};

class PinsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    name_ = "pykvshm-gt-" + std::to_string(getpid()) + "-" + info->test_suite_name() + "-" + info->name();
    for (char& c : name_)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
    a_ = Pool::create(name_, kSmall, (2ull << 20) + blocks() * kBlockBytes, options());
    raw_.base = a_->base();
    std::vector<uint8_t> src(kBlockBytes, 7);
    auto k = key(1);
    ASSERT_EQ(a_->publish(k.data(), 1, src.data(), kBlockBytes), 1u);
    uint64_t h = 0;
    ASSERT_EQ(a_->acquire(k.data(), 1, &h), 1u);
    block_ = word::handle_index(h);
    a_->release(&h, 1);
    b_ = Pool::open(name_, options());
    bslot_ = b_->member_slot();
  }
  virtual PoolOptions options() const { return PoolOptions{}; }
  virtual uint64_t blocks() const { return 64; }
  void TearDown() override {
    b_.reset();
    c_.reset();
    a_.reset();
    try {
      Mapping::destroy(name_);
    } catch (const Error&) {
    }
  }
  // B pins the block for real (acquire), returns its record position.
  uint64_t b_pins() {
    auto k = key(1);
    uint64_t h = 0;
    EXPECT_EQ(b_->acquire(k.data(), 1, &h), 1u);
    uint64_t pos = ~0ull;
    EXPECT_EQ(raw_.records_of(bslot_, &pos), 1u);
    return pos;
  }
  // B's steps of a pin or unpin, written as B would have left them when it died: the journal
  // entry (returns its sequence number), the record taken, the count changed with B's tag.
  uint32_t b_journals(uint64_t op, uint64_t pos) {
    const uint32_t seq = raw_.journal_seq(bslot_) + 1;
    raw_.member(bslot_).pin_op.store(word::journal(seq, op, pos), std::memory_order_release);
    return seq;
  }
  void b_takes_record(uint64_t pos) {
    raw_.rec(pos).store(word::pin_rec(bslot_, block_, false), std::memory_order_release);
  }
  void b_changes_count(int delta, uint32_t seq) {
    raw_.desc(block_).pins.store(word::pins(uint32_t(int64_t(raw_.count(block_)) + delta), bslot_, seq), std::memory_order_release);
  }
  // B leaves: no pin of it is counted or recorded afterwards, and the pool checks clean.
  void b_closes_clean() {
    b_->close();
    EXPECT_EQ(raw_.count(block_), 0u);
    EXPECT_EQ(raw_.records_of(bslot_), 0u);
    a_->check(true);
  }
  // Kill member slot s as a crash would: its handle unmaps without leaving, and the
  // slot's recorded start time no longer matches our process (a "reused pid").
  void kill(std::unique_ptr<Pool>& p) {
    uint32_t s = p->member_slot();
    p->abandon();
    p.reset();
    raw_.member(s).start_time.fetch_add(1, std::memory_order_relaxed);
  }
  // A (live) pins and unpins the block: its count changes replace B's tag.
  void a_pins_and_unpins() {
    auto k = key(1);
    uint64_t h = 0;
    ASSERT_EQ(a_->acquire(k.data(), 1, &h), 1u);
    a_->release(&h, 1);
  }
  // Recover and check the outcome: no pin of B left, the count is what A holds.
  void recover_expect(uint64_t dropped, uint32_t a_holds = 0) {
    RecoveryReport r = a_->recover();
    EXPECT_EQ(r.members_recovered, 1u);
    EXPECT_EQ(r.pins_dropped, dropped);
    EXPECT_EQ(raw_.count(block_), a_holds) << "the dead member's pin was lost or released twice";
    EXPECT_EQ(raw_.records_of(bslot_), 0u);
    EXPECT_EQ(word::journal_op(raw_.member(bslot_).pin_op.load(std::memory_order_acquire)), word::kPinOpNone);
    EXPECT_NO_THROW(a_->check(true));
    EXPECT_EQ(a_->recover().members_recovered, 0u);  // idempotent: nothing left to do
    EXPECT_EQ(raw_.count(block_), a_holds);
    // The block is evictable again iff A holds nothing: evict everything.
    if (a_holds == 0) {
      std::vector<uint64_t> all(a_->num_blocks());
      a_->alloc(all.size(), true, all.data());
      a_->free(all.data(), all.size());
      EXPECT_EQ(a_->stats().sealed, 0u);
    }
  }

  std::string name_;
  std::unique_ptr<Pool> a_, b_, c_;
  Raw raw_{};
  uint64_t block_ = 0;
  uint32_t bslot_ = 0;
};

TEST_F(PinsTest, CountAndRecordsFollowPinsOfManyMembers) {
  auto k = key(1);
  uint64_t ha = 0, hb = 0;
  ASSERT_EQ(a_->acquire(k.data(), 1, &ha), 1u);
  ASSERT_EQ(a_->acquire(k.data(), 1, &ha), 1u);  // a second pin of one member: a local count, one record
  ASSERT_EQ(b_->acquire(k.data(), 1, &hb), 1u);
  EXPECT_EQ(raw_.count(block_), 2u);
  EXPECT_EQ(raw_.records_of(a_->member_slot()), 1u);
  EXPECT_EQ(raw_.records_of(bslot_), 1u);
  EXPECT_EQ(a_->stats().pinned, 1u);
  a_->check(true);
  a_->release(&ha, 1);
  EXPECT_EQ(raw_.count(block_), 2u);
  a_->release(&ha, 1);
  EXPECT_EQ(raw_.count(block_), 1u);
  EXPECT_EQ(raw_.records_of(a_->member_slot()), 0u);
  b_->close();  // leaving drops B's pin
  EXPECT_EQ(raw_.count(block_), 0u);
  EXPECT_EQ(raw_.records_of(bslot_), 0u);
  a_->check(true);
}

TEST_F(PinsTest, JournalSequenceGoesOnAcrossOccupantsOfASlot) {
  b_pins();
  const uint32_t seq = raw_.journal_seq(bslot_);
  EXPECT_GT(seq, 0u);
  b_->close();  // the unpin of leaving is one more journal entry
  EXPECT_GT(raw_.journal_seq(bslot_), seq);
  const uint32_t after = raw_.journal_seq(bslot_);
  b_ = Pool::open(name_, options());
  ASSERT_EQ(b_->member_slot(), bslot_);
  b_pins();
  EXPECT_GT(raw_.journal_seq(bslot_), after) << "a new occupant reused a sequence number";
}

// ---- pin: died after step n ----

TEST_F(PinsTest, DiedAfterWritingThePinJournal) {
  const uint64_t q = raw_.free_record();
  b_journals(word::kPinOpPin, q);
  kill(b_);
  recover_expect(0);
}

TEST_F(PinsTest, DiedAfterTakingTheRecord) {
  const uint64_t q = raw_.free_record();
  b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  kill(b_);
  recover_expect(0);
}

TEST_F(PinsTest, DiedAfterRaisingTheCount) {
  const uint64_t q = raw_.free_record();
  const uint32_t seq = b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  b_changes_count(+1, seq);
  kill(b_);
  recover_expect(1);
}

TEST_F(PinsTest, DiedAfterRaisingTheCountWhoseTagWasThenReplaced) {
  const uint64_t q = raw_.free_record();
  const uint32_t seq = b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  b_changes_count(+1, seq);
  kill(b_);
  // Before anyone recovers B, A pins (its count change replaces B's tag) and keeps it.
  auto k = key(1);
  uint64_t h = 0;
  ASSERT_EQ(a_->acquire(k.data(), 1, &h), 1u);
  EXPECT_TRUE(word::journal_landed(raw_.member(bslot_).pin_op.load(std::memory_order_acquire)))
      << "replacing a tag must mark its journal entry landed";
  recover_expect(1, 1);
  a_->release(&h, 1);
  EXPECT_EQ(raw_.count(block_), 0u);
}

TEST_F(PinsTest, DiedAfterMarkingTheRecordHeld) {
  b_pins();  // complete: the journal still names the pin, the record is held
  kill(b_);
  recover_expect(1);
}

// ---- unpin: died after step n ----

TEST_F(PinsTest, DiedAfterWritingTheUnpinJournal) {
  const uint64_t p = b_pins();
  b_journals(word::kPinOpUnpin, p);
  kill(b_);
  recover_expect(1);
}

TEST_F(PinsTest, DiedAfterLoweringTheCount) {
  const uint64_t p = b_pins();
  const uint32_t seq = b_journals(word::kPinOpUnpin, p);
  b_changes_count(-1, seq);
  kill(b_);
  recover_expect(0);  // the record goes, the count is not lowered twice
}

TEST_F(PinsTest, DiedAfterLoweringTheCountWhoseTagWasThenReplaced) {
  const uint64_t p = b_pins();
  const uint32_t seq = b_journals(word::kPinOpUnpin, p);
  b_changes_count(-1, seq);
  kill(b_);
  a_pins_and_unpins();
  recover_expect(0);
}

// ---- noncoherent pools with lock shards: a member's journal line has one writer ----
// There, A (another host, in principle) must not write B's member slot; replacing B's
// tag finishes B's pin record instead (it is under the block's lock).  The recovery
// outcome must be the same exact one.

class NoncoherentPinsTest : public PinsTest {
 protected:
  PoolOptions options() const override {
    PoolOptions o;
    o.coherence = Coherence::kNoncoherent;
    o.lock_shards = 4;
    return o;
  }
  uint64_t blocks() const override { return 320; }
  // B's pin record of `block_` where B's journal put it: in the block's shard's part of the region.
  uint64_t free_record_of_block_shard() const {
    const uint64_t shards = raw_.sb()->lock_shards, per = raw_.records() / shards;
    const uint64_t shard = ShardMap::make(raw_.sb()->lock_shards, raw_.sb()->num_blocks, raw_.sb()->index_slots).block_shard(block_);
    for (uint64_t p = shard * per; p < (shard + 1) * per; ++p)
      if (raw_.rec(p).load(std::memory_order_acquire) == 0) return p;
    return ~0ull;
  }
  void expect_no_unguarded_write() const {
    EXPECT_EQ(a_->lock_stats().unguarded_writes, 0u) << "a metadata line was written outside its lock";
  }
};

TEST_F(NoncoherentPinsTest, PinsAreCountedAndRecordedUnderShards) {
  ASSERT_EQ(raw_.sb()->lock_shards, 4u);
  b_pins();
  EXPECT_EQ(raw_.count(block_), 1u);
  b_closes_clean();
}

TEST_F(NoncoherentPinsTest, DiedAfterRaisingTheCountWhoseTagWasThenReplaced) {
  const uint64_t q = free_record_of_block_shard();
  ASSERT_NE(q, ~0ull);
  const uint32_t seq = b_journals(word::kPinOpPin, q);
  const uint64_t journal = raw_.member(bslot_).pin_op.load(std::memory_order_acquire);
  b_takes_record(q);
  b_changes_count(+1, seq);
  kill(b_);
  auto k = key(1);
  uint64_t h = 0;
  ASSERT_EQ(a_->acquire(k.data(), 1, &h), 1u);
  EXPECT_EQ(raw_.member(bslot_).pin_op.load(std::memory_order_acquire), journal) << "A wrote B's member slot";
  EXPECT_EQ(raw_.rec(q).load(std::memory_order_acquire), word::pin_rec(bslot_, block_, true))
      << "replacing a tag must record in the pin record that the pin landed";
  expect_no_unguarded_write();
  recover_expect(1, 1);
  a_->release(&h, 1);
  EXPECT_EQ(raw_.count(block_), 0u);
  expect_no_unguarded_write();
}

TEST_F(NoncoherentPinsTest, DiedAfterLoweringTheCountWhoseTagWasThenReplaced) {
  const uint64_t p = b_pins();
  const uint32_t seq = b_journals(word::kPinOpUnpin, p);
  const uint64_t journal = raw_.member(bslot_).pin_op.load(std::memory_order_acquire);
  b_changes_count(-1, seq);
  kill(b_);
  a_pins_and_unpins();
  EXPECT_EQ(raw_.member(bslot_).pin_op.load(std::memory_order_acquire), journal) << "A wrote B's member slot";
  EXPECT_EQ(raw_.rec(p).load(std::memory_order_acquire), 0u) << "the unpin landed, so its record must go";
  expect_no_unguarded_write();
  recover_expect(0);
}

TEST_F(NoncoherentPinsTest, DiedAfterRaisingTheCountWithTheTagInPlace) {
  const uint64_t q = free_record_of_block_shard();
  const uint32_t seq = b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  b_changes_count(+1, seq);
  kill(b_);
  recover_expect(1);
}

TEST_F(PinsTest, DiedAfterFreeingTheRecord) {
  const uint64_t p = b_pins();
  const uint32_t seq = b_journals(word::kPinOpUnpin, p);
  b_changes_count(-1, seq);
  raw_.rec(p).store(0, std::memory_order_release);
  kill(b_);
  recover_expect(0);
}

// ---- close() of a live member whose pin was interrupted (an exception mid-pin) ----

TEST_F(PinsTest, CloseReleasesAPinInterruptedAfterRaisingTheCount) {
  b_pins();  // one known pin, released from the process's own table
  const uint64_t q = raw_.free_record();
  const uint32_t seq = b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  b_changes_count(+1, seq);
  EXPECT_EQ(raw_.count(block_), 2u);
  b_closes_clean();
}

TEST_F(PinsTest, CloseDropsARecordWhosePinNeverLanded) {
  const uint64_t q = raw_.free_record();
  b_journals(word::kPinOpPin, q);
  b_takes_record(q);
  b_closes_clean();
}

// ---- the recoverer died (it works through the dead member's own journal) ----

TEST_F(PinsTest, RecovererDiedMidUnpinIsTakenOverExactly) {
  const uint64_t p = b_pins();
  // B dies; recoverer C (alive at the time) claims B's slot, journals the unpin of B's
  // record as B and lowers the count, then dies before freeing the record.
  b_->abandon();
  b_.reset();
  c_ = Pool::open(name_, options());  // B is still alive by pid here, so C recovers nothing
  const uint32_t cslot = c_->member_slot();
  const uint32_t cepoch = word::member_epoch(raw_.member(cslot).ctl.load(std::memory_order_acquire));
  const uint64_t bctl = raw_.member(bslot_).ctl.load(std::memory_order_acquire);
  ASSERT_EQ(word::member_status(bctl), kMemberAlive);
  raw_.member(bslot_).ctl.store(word::member(kMemberRecovering, word::member_epoch(bctl), word::recoverer(cslot, cepoch)),
                                std::memory_order_release);
  const uint32_t seq = b_journals(word::kPinOpUnpin, p);
  b_changes_count(-1, seq);
  EXPECT_EQ(a_->recover().members_recovered, 0u) << "a live recoverer's claim was taken";
  kill(c_);
  RecoveryReport r = a_->recover();
  EXPECT_EQ(r.members_recovered, 2u);  // B (taken over from C) and C
  EXPECT_EQ(r.pins_dropped, 0u);
  EXPECT_EQ(raw_.count(block_), 0u) << "B's pin was released twice or never";
  EXPECT_EQ(raw_.records_of(bslot_), 0u);
  EXPECT_NO_THROW(a_->check(true));
}

// ---- check() sees what recovery must repair ----

TEST_F(PinsTest, CheckReportsALeakedCountAndAForeignRecord) {
  raw_.desc(block_).pins.store(word::pins(1, 0, 0), std::memory_order_release);
  EXPECT_CODE(a_->check(true), ErrorCode::kCorrupt);
  raw_.desc(block_).pins.store(0, std::memory_order_release);
  a_->check(true);
  const uint64_t q = raw_.free_record();
  raw_.rec(q).store(word::pin_rec(4000, block_, true), std::memory_order_release);  // a free slot
  EXPECT_CODE(a_->check(false), ErrorCode::kCorrupt);
  raw_.rec(q).store(word::pin_rec(0, 1u << 27, true), std::memory_order_release);  // no such block
  EXPECT_CODE(a_->check(false), ErrorCode::kCorrupt);
  raw_.rec(q).store(0, std::memory_order_release);
  a_->check(true);
}

TEST_F(PinsTest, ScribbledRecordsAndTagsNeverCrashRecovery) {
  b_pins();
  kill(b_);
  // Garbage a co-tenant might leave: records naming out-of-range slots and blocks,
  // a tag naming an out-of-range slot, a journal naming an out-of-range record.
  const uint64_t q = raw_.free_record();
  raw_.rec(q).store(~0ull, std::memory_order_release);
  raw_.desc(block_).pins.store(word::pins(raw_.count(block_), 65534, 9), std::memory_order_release);
  RecoveryReport r = a_->recover();
  EXPECT_EQ(r.members_recovered, 1u);
  EXPECT_EQ(raw_.records_of(bslot_), 0u);
  EXPECT_EQ(raw_.count(block_), 0u);
  EXPECT_CODE(a_->check(false), ErrorCode::kCorrupt);  // the garbage record is reported
  raw_.rec(q).store(0, std::memory_order_release);
  a_->check(true);
}

}  // namespace
}  // namespace pykvshm
