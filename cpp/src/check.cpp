// Pool::check: verifies the invariants of docs/design/*.md over the whole pool.
//
// Structural checks (always): every state word decodes to a known kind, every
// owner and pin record names a member slot that is in use, every index entry
// names a block inside the pool.  Strict checks (a quiescent pool: no operation in
// flight in any process) add exact accounting: every SEALED block is reachable
// through exactly one index entry within its probe window, no entry names a
// free block or an old generation, no key is stored twice, pins are only on
// sealed blocks and each block's pin count is the number of its pin records.  A sealed block withdrawn after failing its checksum (flagged in
// its descriptor, see Pool::withdraw) may be out of the index until eviction
// reclaims it.  With `checksums`, every sealed block's bytes are checked against
// its CRC (a block evicted meanwhile is skipped, seqlock style).
#include <algorithm>
#include <string>
#include <vector>

#include "pykvshm/crc32c.h"
#include "pykvshm/pool.h"

namespace pykvshm {

using namespace layout;

void Pool::check(bool strict, bool checksums) const {
  Exclusive ex(this);
  ensure_open();
  auto fail = [](const std::string& what) { raise(ErrorCode::kCorrupt, "pool check failed: " + what); };
  if (checksums && !checksums_)
    raise(ErrorCode::kPool, "the pool was created without block checksums (checksums=True): there are none to verify");
  std::vector<bool> in_use(max_members_, false);
  for (uint32_t s = 0; s < max_members_; ++s) {
    uint64_t c = member(s)->ctl.load(std::memory_order_acquire);
    if (word::member_status(c) == kMemberFree) continue;
    in_use[s] = true;
    if (strict && member_dead(s, c))
      fail("member slot " + std::to_string(s) + " belongs to a dead process and has not been recovered (run recover())");
  }
  std::vector<uint8_t> entries(nblocks_, 0);
  for (uint64_t i = 0; i < nblocks_; ++i) {
    uint64_t s = state(i).load(std::memory_order_acquire);
    uint64_t k = word::kind(s);
    uint64_t o = word::owner(s);
    const std::string b = "block " + std::to_string(i);
    if (k > kEvicting) fail(b + " has an unknown state kind " + std::to_string(k));
    if (k == kWriting || k == kEvicting) {
      if (o >= max_members_) fail(b + " is owned by member slot " + std::to_string(o) + ", out of range");
      if (!in_use[o])
        fail(b + " is held by member slot " + std::to_string(o) + ", which is free (a leaked block)");
      if (strict && k == kEvicting) fail(b + " is being evicted in a quiescent pool");
    } else if (strict && o != 0) {
      fail(b + " carries an owner in state " + std::to_string(k));
    }
    if (strict && word::pins_count(desc(i).pins.load(std::memory_order_acquire)) && k != kSealed)
      fail(b + " is pinned but not sealed");
  }
  // Pins: every record names a block and a member in use; at rest, each block's
  // count is the number of members holding a record of it.
  std::vector<uint32_t> held(nblocks_, 0);
  for (uint64_t pos = 0; pos < npins_; ++pos) {
    const uint64_t r = pin_record(pos).load(std::memory_order_acquire);
    if (r == 0) continue;
    const std::string at = "pin record " + std::to_string(pos);
    if (!word::rec_valid(r)) fail(at + " holds garbage");
    const uint32_t s = word::rec_slot(r);
    const uint64_t i = word::rec_index(r);
    if (i >= nblocks_) fail(at + " names block " + std::to_string(i) + ", outside the pool");
    if (s >= max_members_) fail(at + " names member slot " + std::to_string(s) + ", out of range");
    if (!in_use[s]) fail("block " + std::to_string(i) + " is pinned by member slot " + std::to_string(s) + ", which is free (a leaked pin)");
    if (!word::rec_held(r)) {
      if (strict) fail(at + " is a pin in progress in a quiescent pool");
      continue;
    }
    ++held[i];
  }
  if (strict)
    for (uint64_t i = 0; i < nblocks_; ++i) {
      const uint32_t c = word::pins_count(desc(i).pins.load(std::memory_order_acquire));
      if (c != held[i])
        fail("block " + std::to_string(i) + " has a pin count of " + std::to_string(c) + " but " + std::to_string(held[i]) +
             " pin record(s)" + (c > held[i] ? " (a leaked pin)" : " (a pin not counted)"));
    }
  struct KeyRef {
    uint64_t k0, k1, block;
  };
  std::vector<KeyRef> sealed_keys;
  for (uint64_t pos = 0; pos < nslots_; ++pos) {
    uint64_t e = entry(pos).load(std::memory_order_acquire);
    if (!word::entry_live(e)) {
      if (e != kEntryEmpty && e != kEntryTomb && e != kEntryClearing) fail("index slot " + std::to_string(pos) + " holds garbage");
      continue;
    }
    uint64_t i = word::entry_index(e);
    const std::string at = "index slot " + std::to_string(pos);
    if (i >= nblocks_) fail(at + " names block " + std::to_string(i) + ", outside the pool");
    uint64_t s = state(i).load(std::memory_order_acquire);
    bool current = word::entry_gen_matches(e, word::gen(s)) && word::kind(s) != kFree;
    if (!current) {
      if (strict) fail(at + " names block " + std::to_string(i) + " which is free or reused (stale entry)");
      continue;
    }
    uint64_t k0 = desc(i).key[0].load(std::memory_order_relaxed);
    uint64_t k1 = desc(i).key[1].load(std::memory_order_relaxed);
    uint64_t h = word::key_hash(k0, k1);
    if (word::key_fp(h) != word::entry_fp(e)) fail(at + " has a fingerprint that does not match block " + std::to_string(i) + "'s key");
    if (shards_.dist(shards_.home(h), pos) >= kIndexProbeLimit) fail(at + " is outside the probe window of its key");
    if (entries[i] < 255) ++entries[i];
    if (word::kind(s) == kSealed && !withdrawn(i, s)) sealed_keys.push_back({k0, k1, i});
  }
  if (checksums) {
    std::vector<uint64_t> bad;
    for (uint64_t i = 0; i < nblocks_; ++i) {
      const uint64_t s1 = state(i).load(std::memory_order_acquire);
      if (word::kind(s1) != kSealed || withdrawn(i, s1)) continue;
      const uint32_t want = desc(i).crc.load(std::memory_order_relaxed);
      fresh(block_data(i), geo_.block_bytes);
      const uint32_t got = crc32c(block_data(i), geo_.block_bytes);
      std::atomic_thread_fence(std::memory_order_acquire);
      const uint64_t s2 = state(i).load(std::memory_order_relaxed);
      if (word::kind(s2) != kSealed || word::gen(s2) != word::gen(s1)) continue;  // evicted meanwhile
      if (got != want) bad.push_back(i);
    }
    if (!bad.empty()) {
      std::string list;
      for (size_t j = 0; j < bad.size() && j < 8; ++j) list += (j ? ", " : "") + std::to_string(bad[j]);
      if (bad.size() > 8) list += ", ...";
      fail(std::to_string(bad.size()) + " sealed block(s) do not match their checksums (blocks " + list +
           "); acquiring one withdraws it from the pool");
    }
  }
  if (!strict) return;
  for (uint64_t i = 0; i < nblocks_; ++i) {
    uint64_t s = state(i).load(std::memory_order_acquire);
    if (entries[i] > 1) fail("block " + std::to_string(i) + " is named by " + std::to_string(entries[i]) + " index entries");
    if (word::kind(s) == kSealed && entries[i] == 0 && !withdrawn(i, s))
      fail("sealed block " + std::to_string(i) + " is not in the index");
  }
  std::sort(sealed_keys.begin(), sealed_keys.end(),
            [](const KeyRef& a, const KeyRef& b) { return a.k0 != b.k0 ? a.k0 < b.k0 : a.k1 < b.k1; });
  for (size_t j = 1; j < sealed_keys.size(); ++j)
    if (sealed_keys[j].k0 == sealed_keys[j - 1].k0 && sealed_keys[j].k1 == sealed_keys[j - 1].k1)
      fail("blocks " + std::to_string(sealed_keys[j - 1].block) + " and " + std::to_string(sealed_keys[j].block) +
           " are both sealed under one key");
}

}  // namespace pykvshm
