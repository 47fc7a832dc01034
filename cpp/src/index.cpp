// The prefix index: key -> (block, generation), an open-addressing table of
// 64-bit entries in the pool, with the 16-byte key itself kept in the block's
// descriptor.  Publish, match, acquire (pin) and release.
// docs/design/index.md has the state machine and its invariants.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "pykvshm/crc32c.h"
#include "pykvshm/pool.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

using namespace layout;

namespace {

inline void load_key(const uint8_t* keys, size_t i, uint64_t* k0, uint64_t* k1) {
  std::memcpy(k0, keys + 16 * i, 8);
  std::memcpy(k1, keys + 16 * i + 8, 8);
}

}  // namespace

bool Pool::lookup(uint64_t k0, uint64_t k1, bool sealed_only, Found* f) const {
  const uint64_t h = word::key_hash(k0, k1);
  const uint16_t fp = word::key_fp(h);
  const uint64_t home = shards_.home(h);
  for (uint32_t d = 0; d < kIndexProbeLimit; ++d) {
    const uint64_t pos = shards_.step(home, d);
    const uint64_t e = entry(pos).load(std::memory_order_seq_cst);
    if (e == kEntryEmpty) return false;
    if (!word::entry_live(e) || word::entry_fp(e) != fp) continue;
    const uint64_t i = word::entry_index(e);
    if (i >= nblocks_) continue;  // a corrupt entry never leads outside the mapping
    const uint64_t s1 = state(i).load(std::memory_order_acquire);
    const uint64_t k = word::kind(s1);
    if (!word::entry_gen_matches(e, word::gen(s1))) continue;
    if (sealed_only ? k != kSealed : (k != kSealed && k != kWriting && k != kEvicting)) continue;
    // Seqlock-style read of the key: valid only if the state did not move.
    const uint64_t d0 = desc(i).key[0].load(std::memory_order_relaxed);
    const uint64_t d1 = desc(i).key[1].load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    const uint64_t s2 = state(i).load(std::memory_order_relaxed);
    if ((s1 ^ s2) & ~word::kRefBit) continue;
    if (d0 != k0 || d1 != k1) continue;
    f->pos = pos;
    f->index = i;
    f->gen = word::gen(s1);
    f->kind = k;
    return true;
  }
  return false;
}

Pool::Insert Pool::insert(uint64_t k0, uint64_t k1, uint64_t index, uint32_t gen) {
  Found f;
  if (lookup(k0, k1, false, &f)) return Insert::kPresent;
  const uint64_t h = word::key_hash(k0, k1);
  const uint16_t fp = word::key_fp(h);
  const uint64_t home = shards_.home(h);
  const uint64_t mine = word::entry(fp, gen, index);
  uint64_t my_pos = 0;
  uint32_t my_dist = kIndexProbeLimit;
  for (uint32_t d = 0, retries = 0; d < kIndexProbeLimit; ++d) {
    const uint64_t pos = shards_.step(home, d);
    uint64_t e = entry(pos).load(std::memory_order_seq_cst);
    if (e == kEntryClearing) {
      // A reclaim in progress (or one whose process died): abort it, use the slot as a tombstone.
      if (entry(pos).cas(e, kEntryTomb, std::memory_order_seq_cst)) flush(&entry(pos), 8);
      e = entry(pos).load(std::memory_order_seq_cst);
    }
    bool reusable = e == kEntryEmpty || e == kEntryTomb;
    if (!reusable && word::entry_live(e)) {
      const uint64_t j = word::entry_index(e);
      if (j >= nblocks_) {
        reusable = true;
      } else {
        const uint64_t s = state(j).load(std::memory_order_acquire);
        reusable = !word::entry_gen_matches(e, word::gen(s)) || word::kind(s) == kFree;
      }
    } else if (!reusable) {
      reusable = true;  // neither empty, tombstone nor live: garbage, overwrite it
    }
    if (!reusable) continue;
    // SYNC POINT: index-insert.  The key was stored in the descriptor before
    // this CAS; a reader that loads the entry with acquire sees the key.
    if (entry(pos).cas(e, mine, std::memory_order_seq_cst)) {
      flush(&entry(pos), 8);
      if (!reachable(home, pos)) {
        // A reclaim emptied a slot before ours: lookups would stop there.  Withdraw and look again.
        uint64_t e2 = mine;
        if (entry(pos).cas(e2, kEntryTomb, std::memory_order_seq_cst)) flush(&entry(pos), 8);
        if (++retries < 8) {
          d = uint32_t(-1);
          continue;
        }
        break;
      }
      my_pos = pos;
      my_dist = d;
      break;
    }
    if (++retries < 8) --d;  // the slot changed under us: look at it again
  }
  if (my_dist == kIndexProbeLimit) return Insert::kFull;
  // Two publishers of one key may both get here.  Whoever sees another live
  // entry for the key withdraws its own.  Both CASes and these loads are
  // seq_cst, so at least one of the two sees the other: at most one entry
  // stays (possibly none, which is only a cache miss).
  for (uint32_t d = 0; d < kIndexProbeLimit; ++d) {
    const uint64_t pos = shards_.step(home, d);
    if (pos == my_pos) continue;
    const uint64_t e = entry(pos).load(std::memory_order_seq_cst);
    if (e == kEntryEmpty) break;
    if (!word::entry_live(e) || word::entry_fp(e) != fp) continue;
    const uint64_t j = word::entry_index(e);
    if (j >= nblocks_ || j == index) continue;
    const uint64_t s1 = state(j).load(std::memory_order_acquire);
    const uint64_t k = word::kind(s1);
    if (!word::entry_gen_matches(e, word::gen(s1)) || (k != kSealed && k != kWriting && k != kEvicting)) continue;
    const uint64_t d0 = desc(j).key[0].load(std::memory_order_relaxed);
    const uint64_t d1 = desc(j).key[1].load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((s1 ^ state(j).load(std::memory_order_relaxed)) & ~word::kRefBit) continue;
    if (d0 != k0 || d1 != k1) continue;
    uint64_t e2 = mine;
    entry(my_pos).cas(e2, kEntryTomb, std::memory_order_seq_cst);
    flush(&entry(my_pos), 8);
    return Insert::kPresent;
  }
  (void)my_dist;
  return Insert::kInserted;
}

// Reclaiming tombstones (index.md).  A tombstone at p can become empty when
// no live entry within the probe limit after it lies on a probe sequence
// through p (its home is after p), so no lookup needs to pass p.  Three steps:
// TOMB -> CLEARING; scan forward to the next empty slot checking each live
// entry's home; CLEARING -> EMPTY (or back to TOMB).  An inserter that meets
// CLEARING aborts it (-> TOMB); after placing its entry it re-reads the slots
// between the key's home and its entry backwards (reachable()), so a reclaim
// that emptied one of them meanwhile is seen and the insert is redone.  All of
// these are seq_cst (index.md has the argument).
bool Pool::try_reclaim(uint64_t p) {
  uint64_t e = entry(p).load(std::memory_order_seq_cst);
  if (e != kEntryTomb || !entry(p).cas(e, kEntryClearing, std::memory_order_seq_cst)) return false;
  flush(&entry(p), 8);
  bool ok = true;
  for (uint64_t d = 1; d < kIndexProbeLimit && ok; ++d) {
    const uint64_t q = shards_.step(p, d);
    const uint64_t f = entry(q).load(std::memory_order_seq_cst);
    if (f == kEntryEmpty) break;
    if (!word::entry_live(f)) continue;  // tombstones (and garbage) are passed by lookups, never ended at
    const uint64_t i = word::entry_index(f);
    if (i >= nblocks_) continue;  // never matches anything
    const uint64_t s1 = state(i).load(std::memory_order_acquire);
    if (!word::entry_gen_matches(f, word::gen(s1)) || word::kind(s1) == kFree) continue;  // a dead entry
    const uint64_t k0 = desc(i).key[0].load(std::memory_order_relaxed);
    const uint64_t k1 = desc(i).key[1].load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((s1 ^ state(i).load(std::memory_order_relaxed)) & ~word::kRefBit) {
      ok = false;  // the block moved while we read its key: keep the tombstone
      break;
    }
    const uint64_t home = shards_.home(word::key_hash(k0, k1));
    if (shards_.dist(home, q) >= d) ok = false;  // its probe sequence passes p
  }
  uint64_t c = kEntryClearing;
  const bool done = entry(p).cas(c, ok ? kEntryEmpty : kEntryTomb, std::memory_order_seq_cst);
  flush(&entry(p), 8);
  return done && ok;
}

void Pool::reclaim_tombstones(uint64_t pos) {
  // The new tombstone, and the run of tombstones just before it (the entry
  // just removed may have been the last one that needed them).
  for (uint32_t step = 0; step < 8; ++step, pos = shards_.back(pos)) {
    if (entry(pos).load(std::memory_order_seq_cst) != kEntryTomb) return;
    try_reclaim(pos);
  }
}

bool Pool::reachable(uint64_t home, uint64_t my_pos) {
  for (uint64_t pos = shards_.back(my_pos), n = shards_.dist(home, my_pos); n > 0; --n, pos = shards_.back(pos)) {
    uint64_t e = entry(pos).load(std::memory_order_seq_cst);
    if (e == kEntryClearing) {
      if (entry(pos).cas(e, kEntryTomb, std::memory_order_seq_cst)) {
        flush(&entry(pos), 8);
        continue;
      }
      e = entry(pos).load(std::memory_order_seq_cst);
    }
    if (e == kEntryEmpty) return false;
  }
  return true;
}

Pool::IndexCensus Pool::index_census() const {
  Exclusive ex(this);
  ensure_open();
  IndexCensus c;
  for (uint64_t pos = 0; pos < nslots_; ++pos) {
    const uint64_t e = entry(pos).load(std::memory_order_relaxed);
    if (e == kEntryEmpty) ++c.empty;
    else if (e == kEntryTomb) ++c.tombstones;
    else if (e == kEntryClearing) ++c.clearing;
    else if (word::entry_live(e)) ++c.live;
    else ++c.other;
  }
  return c;
}

void Pool::remove_entry(uint64_t index, uint32_t gen) {
  const uint64_t k0 = desc(index).key[0].load(std::memory_order_relaxed);
  const uint64_t k1 = desc(index).key[1].load(std::memory_order_relaxed);
  const uint64_t h = word::key_hash(k0, k1);
  // Index writes take the index's lock (with lock shards: after the block's shard, which the
  // caller holds; otherwise this nests in the caller's Exclusive).
  ShardHold hold(this, index_lock_id());
  const uint64_t home = shards_.home(h);
  for (uint32_t d = 0; d < kIndexProbeLimit; ++d) {
    const uint64_t pos = shards_.step(home, d);
    uint64_t e = entry(pos).load(std::memory_order_acquire);
    if (e == kEntryEmpty) return;
    if (word::entry_live(e) && word::entry_index(e) == index && word::entry_gen_matches(e, gen)) {
      if (entry(pos).cas(e, kEntryTomb, std::memory_order_seq_cst)) {
        flush(&entry(pos), 8);
        reclaim_tombstones(pos);
      }
      return;
    }
  }
}

bool Pool::withdrawn(uint64_t i, uint64_t s) const {
  const uint32_t f = desc(i).desc_flags.load(std::memory_order_relaxed);
  return (f & kDescWithdrawn) && (f & kDescGenMask) == (word::gen(s) & kDescGenMask);
}

bool Pool::withdraw(uint64_t i, uint32_t g) {
  Atomic64& sw = state(i);
  uint64_t s = sw.load(std::memory_order_acquire);
  if (word::kind(s) != kSealed || word::gen(s) != g) return false;  // already evicted or withdrawn
  // The flag first: check() then never sees this generation sealed and out of the index unflagged.
  // It names the generation, so a later reuse of the block is not affected by it.
  BlockDesc& d = desc(i);
  d.desc_flags.store(kDescWithdrawn | (g & kDescGenMask), std::memory_order_release);
  flush(&d.desc_flags, 4);
  remove_entry(i, g);  // match() stops counting it; a republish of its key stores it anew
  // Free it now unless pinned: the evictor's half of the evict-vs-pin protocol (see try_evict).
  const uint64_t evicting = word::state(g, kEvicting, slot_);
  if (!sw.cas(s, evicting, std::memory_order_seq_cst)) return false;
  flush(&sw, 8);
  if (word::pins_count(d.pins.load(std::memory_order_seq_cst))) {
    uint64_t e = evicting;
    sw.cas(e, word::state(g, kSealed, 0), std::memory_order_release);
    flush(&sw, 8);
    return false;
  }
  uint64_t e = evicting;
  if (!sw.cas(e, word::state(g, kFree, 0), std::memory_order_release)) return false;
  flush(&sw, 8);
  hint_word(shards_.block_shard(i)).fetch_add(1, std::memory_order_relaxed);
  return true;
}

size_t Pool::sealed_prefix(const uint8_t* keys, size_t n, std::vector<Found>* found) const {
  Found f;
  for (size_t i = 0; i < n; ++i) {
    uint64_t k0, k1;
    load_key(keys, i, &k0, &k1);
    if (!lookup(k0, k1, true, &f)) return i;
    if (found) found->push_back(f);
  }
  return n;
}

std::vector<size_t> Pool::missing_keys(const uint8_t* keys, size_t n) const {
  std::vector<size_t> missing;
  missing.reserve(n);
  Found f;
  for (size_t i = 0; i < n; ++i) {
    uint64_t k0, k1;
    load_key(keys, i, &k0, &k1);
    if (!lookup(k0, k1, false, &f)) missing.push_back(i);
  }
  return missing;
}

void Pool::set_key(uint64_t index, uint64_t k0, uint64_t k1) {
  BlockDesc& d = desc(index);
  d.key[0].store(k0, std::memory_order_relaxed);
  d.key[1].store(k1, std::memory_order_relaxed);
  d.crc.store(0, std::memory_order_relaxed);
  flush(&d, sizeof(BlockDesc));
}

size_t Pool::match(const uint8_t* keys, size_t n) {
  if (sharded()) return match_sharded(keys, n);
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  return sealed_prefix(keys, n);
}

size_t Pool::reserve(const uint8_t* keys, size_t n, int64_t* positions, uint64_t* handles) {
  if (sharded()) return reserve_sharded(keys, n, positions, handles);
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  const std::vector<size_t> missing = missing_keys(keys, n);
  add_counter(kCtrDuplicates, n - missing.size());
  if (missing.empty()) return 0;
  std::vector<uint64_t> got(missing.size());
  alloc(missing.size(), true, got.data());
  size_t m = 0;
  for (size_t j = 0; j < missing.size(); ++j) {
    const size_t i = missing[j];
    const uint64_t bi = word::handle_index(got[j]);
    const uint32_t g = word::handle_gen(got[j]);
    uint64_t k0, k1;
    load_key(keys, i, &k0, &k1);
    set_key(bi, k0, k1);
    std::atomic_thread_fence(std::memory_order_release);
    Insert r = insert(k0, k1, bi, g);
    if (r == Insert::kInserted) {
      positions[m] = int64_t(i);
      handles[m] = got[j];
      ++m;
      continue;
    }
    add_counter(r == Insert::kFull ? kCtrIndexFull : kCtrDuplicates, 1);
    release_claims(&got[j], 1);
  }
  return m;
}

void Pool::commit(const uint64_t* handles, size_t n) {
  if (noncoherent() && map_.base()) {
    // The bytes go to the device before the lock is taken; the seal publishes them.
    for (size_t j = 0; j < n; ++j)
      if (word::handle_index(handles[j]) < nblocks_) write_back_block(word::handle_index(handles[j]));
  }
  if (sharded()) return commit_sharded(handles, n);
  Exclusive ex(this);
  ensure_usable();
  for (size_t j = 0; j < n; ++j) check_handle_owned(handles[j], kWriting, "commit");
  for (size_t j = 0; j < n; ++j) seal(handles[j]);
  add_counter(kCtrPublished, n);
  add_counter(kCtrBytesIn, n * geo_.block_bytes);
}

void Pool::seal(uint64_t h) {
  // One checked WRITING block of ours, under the lock that guards it: checksum, then SEALED.
  const uint64_t i = word::handle_index(h);
  const uint32_t g = word::handle_gen(h);
  if (checksums_) desc(i).crc.store(crc32c(block_data(i), geo_.block_bytes), std::memory_order_relaxed);
  flush(&desc(i), sizeof(BlockDesc));
  uint64_t s = word::state(g, kWriting, slot_);
  // SYNC POINT: block-seal.  The block's bytes, key and checksum happen-before
  // any reader that sees SEALED with acquire.
  if (!state(i).cas(s, word::state(g, kSealed, 0), std::memory_order_release))
    raise(ErrorCode::kCorrupt, "commit: block " + std::to_string(i) + " changed state under its writer");
  flush(&state(i), 8);
}

void Pool::abort_writes(const uint64_t* handles, size_t n) {
  if (sharded()) return abort_sharded(handles, n);
  Exclusive ex(this);
  ensure_usable();
  for (size_t j = 0; j < n; ++j) check_handle_owned(handles[j], kWriting, "abort");
  for (size_t j = 0; j < n; ++j) remove_entry(word::handle_index(handles[j]), word::handle_gen(handles[j]));
  release_claims(handles, n);
}

size_t Pool::publish(const uint8_t* keys, size_t n, const uint8_t* src, uint64_t src_stride) {
  std::vector<int64_t> pos(n);
  std::vector<uint64_t> hs(n);
  size_t m = reserve(keys, n, pos.data(), hs.data());
  std::vector<CopySpan> spans(m);
  for (size_t j = 0; j < m; ++j)
    spans[j] = {block_data(word::handle_index(hs[j])), src + uint64_t(pos[j]) * src_stride, geo_.block_bytes};
  try {
    copy_engine().run(spans.data(), spans.size());
  } catch (...) {
    abort_writes(hs.data(), m);
    throw;
  }
  commit(hs.data(), m);
  return m;
}

// Pins (recovery.md, "Pins").  A block's descriptor counts the members that pin
// it; each pin is also a record (member slot, block) in the pin record region, so
// that recovery knows exactly what a dead member held.  The count and the record
// are two words, so each count change is journaled in the member's slot first and
// tagged with (slot, seq) in the descriptor: whoever replaces a tag marks that
// journal entry landed, and recovery reads "did the dead member's last change
// land?" from the tag or the mark, never guessing.
uint32_t Pool::next_pin_seq(uint32_t s) {
  if (s == slot_ && !read_only_) {
    if (++pin_seq_ == 0) pin_seq_ = 1;  // seq 0 means "no tag"
    return pin_seq_;
  }
  uint32_t q = word::journal_seq(member(s)->pin_op.load(std::memory_order_acquire)) + 1;
  return q ? q : 1;
}

void Pool::help_landed(uint64_t i, uint64_t p) {
  const uint32_t seq = word::pins_seq(p), b = word::pins_slot(p);
  if (seq == 0 || b >= max_members_) return;
  MemberSlot* m = member(b);
  uint64_t j = m->pin_op.load(std::memory_order_acquire);
  if (word::journal_seq(j) != seq || word::journal_op(j) == word::kPinOpNone || word::journal_landed(j)) return;
  if (noncoherent()) {
    // Member b's slot is written only by b (and by b's recoverer once b is dead), so the
    // mark cannot go there: another host writing that line would break rule 1 of
    // coherence.md.  Instead the tag's news goes into b's pin record, which lies in
    // block i's part of the record region, under the lock this thread holds: b's change
    // landed, so its record is made what b leaves it as when it finishes (counted after
    // a pin, gone after an unpin), and recovery then reads it from the record.  b cannot
    // be inside that pin or unpin now: it holds block i's lock for the whole of it, so
    // either it finished (the record is already final and nothing is written) or it died
    // in it.
    const uint64_t pos = word::journal_pos(j);
    if (pos >= npins_ || pos / pins_per_shard() != shards_.block_shard(i)) return;
    Atomic64& r = pin_record(pos);
    uint64_t rec = r.load(std::memory_order_acquire);
    if (!word::rec_live(rec) || word::rec_slot(rec) != b || word::rec_index(rec) != i) return;
    if (word::journal_op(j) == word::kPinOpPin && !word::rec_held(rec)) {
      if (r.cas(rec, word::pin_rec(b, i, true), std::memory_order_acq_rel)) flush(&r, 8);
    } else if (word::journal_op(j) == word::kPinOpUnpin && word::rec_held(rec)) {
      if (r.cas(rec, 0, std::memory_order_acq_rel)) flush(&r, 8);
    }
    return;
  }
  // SYNC POINT: pin-landed.  The mark happens-before the tag that replaces (b, seq).
  if (m->pin_op.cas(j, j | word::kJournalLanded, std::memory_order_acq_rel)) flush(&m->pin_op, 8);
}

void Pool::change_pins(uint64_t i, int delta, uint32_t slot, uint32_t seq) {
  BlockDesc& d = desc(i);
  uint64_t p = d.pins.load(std::memory_order_acquire);
  for (;;) {
    help_landed(i, p);
    const uint32_t c = word::pins_count(p);
    // A count is never driven below zero or above the member limit (a scribbled word
    // stays wrong, and check() says so, but never wraps into "unpinned").
    const uint32_t n = delta < 0 ? (c ? c - 1 : 0) : (c < kMaxMembersLimit ? c + 1 : c);
    // SYNC POINT: evict-vs-pin (Dekker), the pinner's half; see try_evict.  Also
    // SYNC POINT: unpin: our reads of the block happen-before an evictor that sees the count drop.
    if (d.pins.cas(p, word::pins(n, slot, seq), std::memory_order_seq_cst)) break;
  }
  flush(&d.pins, 8);
}

bool Pool::pin(uint64_t i, uint32_t g, uint64_t k0, uint64_t k1) {
  std::lock_guard<std::mutex> lk(pin_mu_);
  Atomic64& sw = state(i);
  if (pin_count_[i]) {
    // Already pinned by this member, so it cannot have been evicted.
    uint64_t s = sw.load(std::memory_order_acquire);
    if (word::kind(s) != kSealed || word::gen(s) != g) return false;
    ++pin_count_[i];
    return true;
  }
  BlockDesc& d = desc(i);
  MemberSlot* me = member(slot_);
  const uint32_t seq = next_pin_seq(slot_);
  // 1. A free record near hash(slot, block); the journal names it before we take it.
  // In the block's shard's part of the region (the lock that guards the block guards its records).
  const uint64_t per = pins_per_shard(), mask = per - 1;
  const uint64_t base = uint64_t(shards_.block_shard(i)) * per, home = word::mix64((uint64_t(slot_) << 32) ^ i) & mask;
  uint64_t pos = npins_;
  for (uint32_t k = 0; k < kPinProbeLimit; ++k) {
    const uint64_t q = base + ((home + k) & mask);
    Atomic64& r = pin_record(q);
    uint64_t zero = 0;
    if (r.load(std::memory_order_relaxed) != 0) continue;
    me->pin_op.store(word::journal(seq, word::kPinOpPin, q), std::memory_order_release);
    flush(&me->pin_op, 8);
    if (r.cas(zero, word::pin_rec(slot_, i, false), std::memory_order_acq_rel)) {
      flush(&r, 8);
      pos = q;
      break;
    }
  }
  if (pos == npins_) {
    add_counter(kCtrPinsRefused, 1);  // no room to record the pin: the caller sees a miss
    return false;
  }
  // 2. The count, tagged with this journal entry.  3. The record is counted for certain.
  change_pins(i, +1, slot_, seq);
  Atomic64& rec = pin_record(pos);
  rec.store(word::pin_rec(slot_, i, true), std::memory_order_release);
  flush(&rec, 8);
  uint64_t s = sw.load(std::memory_order_seq_cst);
  if (word::kind(s) == kSealed && word::gen(s) == g && d.key[0].load(std::memory_order_relaxed) == k0 &&
      d.key[1].load(std::memory_order_relaxed) == k1) {
    pin_count_[i] = 1;
    pin_pos_[i] = uint32_t(pos);
    if (!word::ref(s) && sw.cas(s, s | word::kRefBit, std::memory_order_relaxed)) flush(&sw, 8);  // CLOCK: recently used
    return true;
  }
  unpin_record(slot_, pos, word::pin_rec(slot_, i, true));
  return false;
}

void Pool::unpin_record(uint32_t s, uint64_t pos, uint64_t rec) {
  // The unpin of member s's record `rec` at `pos`: journal, count, record.  Run by
  // the member itself, or by the one process recovering it (as s).
  MemberSlot* m = member(s);
  const uint32_t seq = next_pin_seq(s);
  m->pin_op.store(word::journal(seq, word::kPinOpUnpin, pos), std::memory_order_release);
  flush(&m->pin_op, 8);
  change_pins(word::rec_index(rec), -1, s, seq);
  Atomic64& r = pin_record(pos);
  uint64_t want = rec;
  if (r.cas(want, 0, std::memory_order_release)) flush(&r, 8);
}

void Pool::unpin(uint64_t i) {
  // Caller holds pin_mu_.
  if (pin_count_[i] == 0) return;
  if (--pin_count_[i] == 0) unpin_record(slot_, pin_pos_[i], word::pin_rec(slot_, i, true));
}

void Pool::resolve_pin_journal(uint32_t s) {
  // Member s died (or is us, leaving) between writing its journal and finishing that
  // pin or unpin: decide from the descriptor's tag or the landed mark whether its
  // count change happened, and make its record agree.  Idempotent.
  MemberSlot* m = member(s);
  const uint64_t j = m->pin_op.load(std::memory_order_acquire);
  const uint64_t op = word::journal_op(j);
  if (op == word::kPinOpNone) return;
  const uint64_t pos = word::journal_pos(j);
  const uint32_t seq = word::journal_seq(j);
  if (pos < npins_) {
    Atomic64& r = pin_record(pos);
    const uint64_t rec = r.load(std::memory_order_acquire);
    const uint64_t i = word::rec_index(rec);
    if (word::rec_live(rec) && word::rec_slot(rec) == s && i < nblocks_) {
      // Tag first, then the mark: a helper marks before it replaces the tag.
      const uint64_t p = desc(i).pins.load(std::memory_order_seq_cst);
      const bool landed = (word::pins_slot(p) == s && word::pins_seq(p) == seq) ||
                          word::journal_landed(m->pin_op.load(std::memory_order_seq_cst));
      uint64_t want = rec;
      if (op == word::kPinOpPin && !word::rec_held(rec)) {
        if (r.cas(want, landed ? word::pin_rec(s, i, true) : 0, std::memory_order_acq_rel)) flush(&r, 8);
      } else if (op == word::kPinOpUnpin && landed) {
        if (r.cas(want, 0, std::memory_order_acq_rel)) flush(&r, 8);
      }
    }
  }
  uint64_t jj = j;
  // Only the mark can have changed meanwhile; either way the entry is done.
  if (!m->pin_op.cas(jj, word::journal(seq, word::kPinOpNone, 0), std::memory_order_acq_rel))
    m->pin_op.store(word::journal(seq, word::kPinOpNone, 0), std::memory_order_release);
  flush(&m->pin_op, 8);
}

void Pool::release_pins_of(const std::vector<bool>& mask, RecoveryReport& rep) {
  if (!read_only_ && slot_ < mask.size() && mask[slot_] && still_member()) {
    // Leaving (close): this process knows where its records are, so no scan.  At most
    // one pin or unpin was interrupted (an exception under pin_mu_): its journal entry
    // names its record; once resolved, a record of ours that no local count owns is
    // released too.
    std::lock_guard<std::mutex> lk(pin_mu_);
    const uint64_t j = member(slot_)->pin_op.load(std::memory_order_acquire);
    resolve_pin_journal(slot_);
    const uint64_t q = word::journal_pos(j);
    if (word::journal_op(j) != word::kPinOpNone && q < npins_) {
      const uint64_t r = pin_record(q).load(std::memory_order_acquire);
      const uint64_t i = word::rec_index(r);
      if (word::rec_live(r) && word::rec_held(r) && word::rec_slot(r) == slot_ && i < nblocks_ &&
          (pin_count_[i] == 0 || pin_pos_[i] != q)) {
        unpin_record(slot_, q, r);
        ++rep.pins_dropped;
      }
    }
    for (uint64_t i = 0; i < nblocks_; ++i) {
      if (!pin_count_[i]) continue;
      pin_count_[i] = 0;
      const uint64_t want = word::pin_rec(slot_, i, true);
      if (pin_pos_[i] < npins_ && pin_record(pin_pos_[i]).load(std::memory_order_acquire) == want) {
        unpin_record(slot_, pin_pos_[i], want);
        ++rep.pins_dropped;
      }
    }
    resolve_pin_journal(slot_);
    return;
  }
  for (uint32_t s = 0; s < max_members_; ++s)
    if (mask[s]) resolve_pin_journal(s);
  for (uint64_t pos = 0; pos < npins_; ++pos) {
    Atomic64& r = pin_record(pos);
    const uint64_t rec = r.load(std::memory_order_acquire);
    if (!word::rec_live(rec)) continue;
    const uint32_t s = word::rec_slot(rec);
    if (s >= max_members_ || !mask[s]) continue;
    if (word::rec_held(rec) && word::rec_index(rec) < nblocks_) {
      unpin_record(s, pos, rec);
      ++rep.pins_dropped;
    } else {
      // Never counted (its journal entry was resolved above), or names no block.
      uint64_t want = rec;
      if (r.cas(want, 0, std::memory_order_acq_rel)) flush(&r, 8);
    }
  }
  // Done: a later occupant of the slot starts with an empty journal entry.
  for (uint32_t s = 0; s < max_members_; ++s)
    if (mask[s]) resolve_pin_journal(s);
}

size_t Pool::acquire(const uint8_t* keys, size_t n, uint64_t* out) {
  if (sharded()) return acquire_sharded(keys, n, out);
  size_t got = 0;
  {
    Exclusive ex(this);
    ensure_usable();
    heartbeat();
    Found f;
    for (size_t i = 0; i < n; ++i) {
      uint64_t k0, k1;
      load_key(keys, i, &k0, &k1);
      bool ok = false;
      for (int attempt = 0; attempt < 2 && !ok; ++attempt) {
        if (!lookup(k0, k1, true, &f)) break;
        ok = pin(f.index, f.gen, k0, k1);
      }
      if (!ok) break;
      out[got++] = word::handle(f.gen, f.index);
    }
  }
  return acquire_finish(keys, n, out, got);
}

size_t Pool::acquire_finish(const uint8_t* keys, size_t n, uint64_t* out, size_t got) {
  (void)keys;
  // The pinned blocks are sealed and cannot change: their bytes are read outside the lock.
  if (checksums_) {
    for (size_t j = 0; j < got; ++j) {
      const uint64_t i = word::handle_index(out[j]);
      const uint8_t* p = block_data(i);
      fresh(p, geo_.block_bytes);
      if (crc32c(p, geo_.block_bytes) != desc(i).crc.load(std::memory_order_relaxed)) {
        release(out, got);
        add_counter(kCtrChecksumErrors, 1);
        {
          Exclusive ex(this);
          withdraw(i, word::handle_gen(out[j]));
        }
        raise(ErrorCode::kChecksum, "block " + std::to_string(i) + " (key #" + std::to_string(j) +
                                        ") does not match its checksum: the pool memory was corrupted; the block "
                                        "has been withdrawn from the pool (publish its key again to store it anew)");
      }
    }
  } else if (noncoherent()) {
    for (size_t j = 0; j < got; ++j) fresh(block_data(word::handle_index(out[j])), geo_.block_bytes);
  }
  add_counter(kCtrHits, got);
  add_counter(kCtrMisses, n - got);
  return got;
}

void Pool::release(const uint64_t* handles, size_t n) {
  if (!map_.base()) return;  // close() already dropped every pin
  if (sharded()) return release_sharded(handles, n);
  Exclusive ex(this);
  ensure_open();
  if (read_only_) raise_read_only();
  std::lock_guard<std::mutex> lk(pin_mu_);
  if (!check_release(handles, n)) return;
  for (size_t j = 0; j < n; ++j) unpin(word::handle_index(handles[j]));
}

bool Pool::check_release(const uint64_t* handles, size_t n) {
  // Caller holds pin_mu_.
  if (!still_member()) {
    // Declared dead and recovered: our pins were dropped, and the slot's bits
    // may belong to a new member now.  Forget them locally only.
    for (size_t j = 0; j < n; ++j) {
      const uint64_t i = word::handle_index(handles[j]);
      if (i < nblocks_ && pin_count_[i]) --pin_count_[i];
    }
    return false;
  }
  for (size_t j = 0; j < n; ++j) {
    const uint64_t i = word::handle_index(handles[j]);
    if (i >= nblocks_ || pin_count_[i] == 0)
      raise(ErrorCode::kInvalidHandle, "release: block handle " + std::to_string(handles[j]) + " is not pinned by this pool handle");
    // A pinned block cannot be reused, so its generation is the one we pinned.
    if (word::gen(state(i).load(std::memory_order_acquire)) != word::handle_gen(handles[j]))
      raise(ErrorCode::kStaleHandle, "release: block handle " + std::to_string(handles[j]) + " is stale (the block was reused)");
  }
  return true;
}

const uint8_t* Pool::pinned_block(uint64_t h) {
  Exclusive ex(this);
  ensure_usable();
  const uint64_t i = word::handle_index(h);
  std::lock_guard<std::mutex> lk(pin_mu_);
  if (i >= nblocks_ || pin_count_[i] == 0)
    raise(ErrorCode::kInvalidHandle, "block handle " + std::to_string(h) + " is not pinned by this pool handle");
  if (word::gen(state(i).load(std::memory_order_acquire)) != word::handle_gen(h))
    raise(ErrorCode::kStaleHandle, "block handle " + std::to_string(h) + " is stale");
  return block_data(i);
}

void Pool::copy_out(const uint64_t* handles, size_t n, uint8_t* dst, uint64_t dst_stride) {
  {
    Exclusive ex(this);
    ensure_usable();
    for (size_t j = 0; j < n; ++j) pinned_block(handles[j]);
  }
  std::vector<CopySpan> spans(n);
  for (size_t j = 0; j < n; ++j) spans[j] = {dst + j * dst_stride, block_data(word::handle_index(handles[j])), geo_.block_bytes};
  copy_engine().run(spans.data(), spans.size());
  add_counter(kCtrBytesOut, n * geo_.block_bytes);
}

void Pool::check_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* bytes, size_t n) const {
  for (size_t j = 0; j < n; ++j) {
    if (word::handle_index(handles[j]) >= nblocks_)
      raise(ErrorCode::kInvalidHandle, "span " + std::to_string(j) + ": block handle " + std::to_string(handles[j]) +
                                           " is outside the pool");
    if (offsets[j] > geo_.block_bytes || bytes[j] > geo_.block_bytes - offsets[j])
      raise(ErrorCode::kInvalidHandle, "span " + std::to_string(j) + ": " + std::to_string(bytes[j]) + " bytes at offset " +
                                           std::to_string(offsets[j]) + " run past the end of a " +
                                           std::to_string(geo_.block_bytes) + "-byte block");
  }
}

void Pool::read_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* addrs, const uint64_t* bytes,
                      size_t n, const std::shared_ptr<CopyGroup>& group) {
  check_spans(handles, offsets, bytes, n);
  {
    Exclusive ex(this);
    ensure_usable();
    for (size_t j = 0; j < n; ++j) pinned_block(handles[j]);
  }
  std::vector<CopySpan> spans(n);
  uint64_t total = 0;
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* src = block_data(word::handle_index(handles[j])) + offsets[j];
    fresh(src, bytes[j]);
    spans[j] = {reinterpret_cast<uint8_t*>(addrs[j]), src, bytes[j]};
    total += bytes[j];
  }
  add_counter(kCtrBytesOut, total);
  if (group)
    copy_engine().submit(group, std::move(spans));
  else
    copy_engine().run(spans.data(), spans.size());
}

void Pool::write_spans(const uint64_t* handles, const uint64_t* offsets, const uint64_t* addrs, const uint64_t* bytes,
                       size_t n, const std::shared_ptr<CopyGroup>& group) {
  check_spans(handles, offsets, bytes, n);
  {
    Exclusive ex(this);
    ensure_usable();
    for (size_t j = 0; j < n; ++j) check_handle_owned(handles[j], kWriting, "write_spans");
  }
  std::vector<CopySpan> spans(n);
  uint64_t total = 0;
  for (size_t j = 0; j < n; ++j) {
    spans[j] = {block_data(word::handle_index(handles[j])) + offsets[j], reinterpret_cast<const uint8_t*>(addrs[j]), bytes[j]};
    total += bytes[j];
  }
  add_counter(kCtrBytesIn, total);
  // commit() writes the blocks back in noncoherent mode (write_back_block), so no flush here.
  if (group)
    copy_engine().submit(group, std::move(spans));
  else
    copy_engine().run(spans.data(), spans.size());
}

// ---- sharded entry points (noncoherent pools with lock shards; coherence.md) ----
// Each takes the lock of one block shard at a time (grouping its handles by shard),
// and the index lock only to change the index, so calls of different hosts on
// different shards run at once.  Lookups take no lock (validated reads).  What a call
// checks without a lock is a fresh read of a line that only this member (or a
// recoverer, after declaring it dead) changes.

size_t Pool::match_sharded(const uint8_t* keys, size_t n) {
  heartbeat();
  ensure_usable();
  // Lookups take no lock: every line they read is invalidated first and the key is
  // validated against the block's state (seqlock), as a read-only handle reads.
  return sealed_prefix(keys, n);
}

size_t Pool::reserve_sharded(const uint8_t* keys, size_t n, int64_t* positions, uint64_t* handles) {
  heartbeat();
  ensure_usable();
  // Which keys are missing (a hint, read without a lock; insert() decides under the index lock).
  const std::vector<size_t> missing = missing_keys(keys, n);
  uint64_t present = n - missing.size(), index_full = 0, allocs = 0;
  std::vector<std::pair<size_t, uint64_t>> done;  // (key position, handle), inserted
  size_t next = 0;                                  // missing keys given a block so far
  // Blocks from this member's home shard first (one hold, usually enough), the next
  // shards if it runs short; under each block shard, the keys go into the descriptors
  // and then, under the index lock, into the index.
  // Free blocks of any shard before evicting in any (as alloc() does).
  for (uint32_t step = 0; step < 2 * shards_.shards && next < missing.size(); ++step) {
    const int pass = step < shards_.shards ? 0 : 1;
    const uint32_t sh = (home_shard() + step) % shards_.shards;
    if (!shard_pass(sh, pass)) continue;
    ShardHold hold(this, sh);
    std::vector<uint64_t> got(missing.size() - next);
    const size_t have = alloc_in_shard(sh, got.size(), pass == 1, got.data(), 0);
    if (have == 0) continue;
    allocs += have;
    for (size_t j = 0; j < have; ++j) {
      uint64_t k0, k1;
      load_key(keys, missing[next + j], &k0, &k1);
      set_key(word::handle_index(got[j]), k0, k1);
    }
    std::atomic_thread_fence(std::memory_order_release);
    std::vector<uint64_t> unused;
    {
      ShardHold ih(this, index_lock_id());
      for (size_t j = 0; j < have; ++j) {
        uint64_t k0, k1;
        load_key(keys, missing[next + j], &k0, &k1);
        Insert r = insert(k0, k1, word::handle_index(got[j]), word::handle_gen(got[j]));
        if (r == Insert::kInserted) {
          done.emplace_back(missing[next + j], got[j]);
          continue;
        }
        if (r == Insert::kFull) ++index_full; else ++present;
        unused.push_back(got[j]);
      }
    }
    release_claims(unused.data(), unused.size());  // the block shard is still held
    next += have;
  }
  add_counter(kCtrAllocs, allocs);
  add_counter(kCtrDuplicates, present);
  add_counter(kCtrIndexFull, index_full);
  if (next < missing.size()) {
    // All or nothing, as with one lock: take back what this call reserved.
    std::vector<uint64_t> hs;
    for (const auto& d : done) hs.push_back(d.second);
    abort_sharded(hs.data(), hs.size());
    raise_full(missing.size(), true, "");
  }
  std::sort(done.begin(), done.end());
  for (size_t m = 0; m < done.size(); ++m) {
    positions[m] = int64_t(done[m].first);
    handles[m] = done[m].second;
  }
  return done.size();
}

void Pool::commit_sharded(const uint64_t* handles, size_t n) {
  ensure_usable();
  const std::vector<uint32_t> shard_of = handle_shards(handles, n);
  // All checked before anything is sealed (under the shard's lock when there is one shard).
  std::optional<ShardHold> one;
  hold_if_one_shard(shard_of, one);
  for (size_t j = 0; j < n; ++j) check_handle_owned(handles[j], kWriting, "commit");
  for (const auto& [sh, group] : group_by_shard(shard_of)) {
    ShardHold hold(this, sh);
    for (size_t j : group) seal(handles[j]);
  }
  add_counter(kCtrPublished, n);
  add_counter(kCtrBytesIn, n * geo_.block_bytes);
}

void Pool::abort_sharded(const uint64_t* handles, size_t n) {
  ensure_usable();
  for (size_t j = 0; j < n; ++j) check_handle_owned(handles[j], kWriting, "abort");
  const std::vector<uint32_t> shard_of = handle_shards(handles, n);
  for (const auto& [sh, group] : group_by_shard(shard_of)) {
    ShardHold hold(this, sh);
    for (size_t j : group) {
      remove_entry(word::handle_index(handles[j]), word::handle_gen(handles[j]));
      release_claims(&handles[j], 1);
    }
  }
}

size_t Pool::acquire_sharded(const uint8_t* keys, size_t n, uint64_t* out) {
  heartbeat();
  ensure_usable();
  // Look the prefix up without a lock (validated reads), then pin under each block
  // shard's lock: pin() re-checks state, generation and key after setting its bit, so a
  // block evicted or reused since the lookup is never pinned.  Blocks published together
  // come from one shard, so a request usually takes one lock.
  std::vector<Found> found;
  found.reserve(n);
  const size_t cand = sealed_prefix(keys, n, &found);
  std::vector<uint8_t> ok(cand, 0);
  std::vector<uint32_t> shard_of(cand);
  for (size_t i = 0; i < cand; ++i) shard_of[i] = shards_.block_shard(found[i].index);
  for (const auto& [sh, group] : group_by_shard(shard_of)) {
    ShardHold hold(this, sh);
    for (size_t i : group) {
      uint64_t k0, k1;
      load_key(keys, i, &k0, &k1);
      ok[i] = pin(found[i].index, found[i].gen, k0, k1) ? 1 : 0;
    }
  }
  // A key whose block moved between lookup and pin: look once more (as with one lock).
  Found f;
  size_t got = 0;
  for (; got < cand; ++got) {
    if (ok[got]) continue;
    uint64_t k0, k1;
    load_key(keys, got, &k0, &k1);
    if (!lookup(k0, k1, true, &f)) break;
    {
      ShardHold hold(this, shards_.block_shard(f.index));
      if (!pin(f.index, f.gen, k0, k1)) break;
    }
    found[got] = f;
    ok[got] = 1;
  }
  // Pins after the first miss are not part of the prefix: give them back.
  std::vector<uint32_t> extra_shard;
  std::vector<uint64_t> extra;
  for (size_t i = got; i < cand; ++i)
    if (ok[i]) {
      extra.push_back(found[i].index);
      extra_shard.push_back(shards_.block_shard(found[i].index));
    }
  for (const auto& [sh, group] : group_by_shard(extra_shard)) {
    ShardHold hold(this, sh);
    std::lock_guard<std::mutex> lk(pin_mu_);
    for (size_t j : group) unpin(extra[j]);
  }
  for (size_t i = 0; i < got; ++i) out[i] = word::handle(found[i].gen, found[i].index);
  return acquire_finish(keys, n, out, got);
}

void Pool::release_sharded(const uint64_t* handles, size_t n) {
  ensure_open();
  if (read_only_) raise_read_only();
  {
    std::lock_guard<std::mutex> lk(pin_mu_);
    if (!check_release(handles, n)) return;
  }
  for (const auto& [sh, group] : group_by_shard(handle_shards(handles, n))) {
    ShardHold hold(this, sh);
    std::lock_guard<std::mutex> lk(pin_mu_);
    for (size_t j : group) unpin(word::handle_index(handles[j]));
  }
}

CopyEngine& Pool::copy_engine() {
  std::lock_guard<std::mutex> lk(engine_mu_);
  if (!engine_) engine_ = std::make_unique<CopyEngine>(copy_threads_, copy_kernel_);
  return *engine_;
}

}  // namespace pykvshm
