// The block allocator.
//
// The state word of each block is the only truth about who holds it: a block
// changes hands by one CAS on that word (FREE -> WRITING(owner), SEALED ->
// EVICTING(owner) -> WRITING(owner)), so a process that dies at any instruction
// leaves every block either free or tagged with its member slot, never in limbo
// between a free list and an owner.  Finding a free block is a scan from a
// per-process cursor over the dense state array (8 blocks per cache line),
// guided by a shared free-count hint; eviction is CLOCK over the same array.
// docs/design/allocator.md has the argument.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "pykvshm/pool.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

using namespace layout;

bool Pool::try_claim(uint64_t i, uint64_t* h) {
  Atomic64& sw = state(i);
  uint64_t s = sw.load(std::memory_order_relaxed);
  if (word::kind(s) != kFree) return false;
  if (word::gen(s) == word::kGenLast) return false;  // retired: its generations are spent
  uint32_t g = word::gen(s) + 1;
  // SYNC POINT: block-claim.  Acquire pairs with the release that freed it, so
  // the previous holder's accesses happen-before ours.
  if (!sw.cas(s, word::state(g, kWriting, slot_), std::memory_order_acq_rel)) return false;
  flush(&sw, 8);
  *h = word::handle(g, i);
  return true;
}

bool Pool::try_evict(uint64_t i, uint64_t* h) {
  Atomic64& sw = state(i);
  uint64_t s = sw.load(std::memory_order_acquire);
  if (word::kind(s) != kSealed || word::ref(s)) return false;
  BlockDesc& d = desc(i);
  if (word::pins_count(d.pins.load(std::memory_order_relaxed))) return false;
  const uint32_t g = word::gen(s);
  const uint64_t evicting = word::state(g, kEvicting, slot_);
  // SYNC POINT: evict-vs-pin (Dekker).  The evictor CASes the state and then
  // reads the pin count; a pinner raises the count and then reads the state; all
  // four operations are seq_cst, so at least one of the two sees the other.
  if (!sw.cas(s, evicting, std::memory_order_seq_cst)) return false;
  if (word::pins_count(d.pins.load(std::memory_order_seq_cst))) {
    uint64_t e = evicting;
    sw.cas(e, word::state(g, kSealed, 0), std::memory_order_release);
    flush(&sw, 8);
    return false;
  }
  remove_entry(i, g);
  uint64_t e = evicting;
  if (g == word::kGenLast) {
    // Its generations are spent: retire it (FREE at the last generation, never claimed again).
    write_back_block(i);
    if (sw.cas(e, word::state(g, kFree, 0), std::memory_order_acq_rel)) flush(&sw, 8);
    return false;
  }
  const uint32_t g2 = g + 1;
  if (!sw.cas(e, word::state(g2, kWriting, slot_), std::memory_order_acq_rel)) return false;
  flush(&sw, 8);
  add_counter(kCtrEvictions, 1);
  *h = word::handle(g2, i);
  return true;
}

uint64_t Pool::scan_claim_free(uint32_t sh, size_t want, uint64_t* out, size_t have) {
  // The shard's block range (the whole pool when it has one lock).
  const uint64_t b = shards_.block_begin(sh), len = shards_.block_end(sh) - b;
  if (len == 0) return 0;
  uint64_t i = b + cursor_.load(std::memory_order_relaxed) % len, steps = 0;
  uint64_t claimed = 0;
  while (have < want && steps < len) {
    if (try_claim(i, &out[have])) {
      ++have;
      ++claimed;
    }
    ++steps;
    if (++i == b + len) i = b;
  }
  cursor_.store(i - b, std::memory_order_relaxed);
  if (steps == len && have < want) {
    // A whole pass found no more free blocks: the hint was wrong (a crash
    // between a state change and the hint update); reset it.
    hint_word(sh).store(0, std::memory_order_relaxed);
  }
  return claimed;
}

uint64_t Pool::scan_evict(uint32_t sh, size_t want, uint64_t* out, size_t have) {
  const uint64_t b = shards_.block_begin(sh), len = shards_.block_end(sh) - b;
  if (len == 0) return 0;
  uint64_t got = 0, steps = 0;
  const uint64_t limit = 3 * len + 64;  // ref bits cleared on pass 1, evicted on pass 2
  while (have + got < want && steps < limit) {
    uint64_t base = clock_word(sh).fetch_add(64, std::memory_order_relaxed);
    for (uint64_t j = 0; j < 64 && have + got < want; ++j, ++steps) {
      uint64_t i = b + (base + j) % len;
      Atomic64& sw = state(i);
      uint64_t s = sw.load(std::memory_order_relaxed);
      switch (word::kind(s)) {
        case kFree:
          if (try_claim(i, &out[have + got])) {
            ++got;
            hint_word(sh).fetch_sub(1, std::memory_order_relaxed);
          }
          break;
        case kSealed:
          if (word::ref(s)) {
            if (sw.cas(s, s & ~word::kRefBit, std::memory_order_relaxed)) flush(&sw, 8);
          } else if (try_evict(i, &out[have + got])) {
            ++got;
          }
          break;
        default:
          break;
      }
    }
  }
  return got;
}

void Pool::release_claims(const uint64_t* handles, size_t n) {
  for (size_t j = 0; j < n; ++j) {
    uint64_t i = word::handle_index(handles[j]);
    uint32_t g = word::handle_gen(handles[j]);
    uint64_t s = word::state(g, kWriting, slot_);
    const uint32_t sh = shards_.block_shard(i);
    ShardHold hold(this, sh);
    write_back_block(i);
    if (state(i).cas(s, word::state(g, kFree, 0), std::memory_order_release)) {
      flush(&state(i), 8);
      hint_word(sh).fetch_add(1, std::memory_order_relaxed);
    }
  }
}

size_t Pool::alloc_in_shard(uint32_t sh, size_t want, bool evict, uint64_t* out, size_t have) {
  const auto claim_free = [&] {
    const uint64_t got = scan_claim_free(sh, want, out, have);
    have += got;
    hint_word(sh).fetch_sub(got, std::memory_order_relaxed);
  };
  const int64_t hint = int64_t(hint_word(sh).load(std::memory_order_relaxed));
  if (hint > 0) claim_free();
  if (have < want && evict) have += scan_evict(sh, want, out, have);
  // Last resort when the hint said "nothing free" (it may be stale after a crash): one full
  // pass over the states.
  if (have < want && hint <= 0) claim_free();
  return have;
}

void Pool::raise_full(size_t n, bool evict, const std::string& where) {
  Stats st = stats();
  raise(ErrorCode::kFull, "pool is full: asked for " + std::to_string(n) + " blocks" + where + "; of " +
                              std::to_string(st.total) + " blocks " + std::to_string(st.free) + " are free, " +
                              std::to_string(st.writing) + " being written, " + std::to_string(st.pinned) + " pinned, " +
                              std::to_string(st.sealed) + " sealed" + (evict ? "" : " (eviction was not allowed)"));
}

void Pool::alloc(size_t n, bool evict, uint64_t* out) {
  if (sharded()) return alloc_sharded(n, evict, out);
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  if (n == 0) return;
  if (n > nblocks_)
    raise(ErrorCode::kFull, "asked for " + std::to_string(n) + " blocks but the pool has only " + std::to_string(nblocks_));
  size_t have = alloc_in_shard(0, n, evict, out, 0);
  if (have < n) {
    release_claims(out, have);
    raise_full(n, evict, "");
  }
  add_counter(kCtrAllocs, n);
}

bool Pool::shard_pass(uint32_t sh, int pass) const {
  // Pass 0 visits only shards whose free hint (read without the lock: a hint) says they
  // have free blocks; pass 1 visits every shard, and alloc_in_shard evicts there or, when
  // the hint says nothing is free, scans the whole range once (the hint may be stale).
  return pass == 1 || int64_t(hint_word(sh).load(std::memory_order_relaxed)) > 0;
}

void Pool::alloc_sharded(size_t n, bool evict, uint64_t* out) {
  heartbeat();  // before any shard: it may take the pool-wide lock
  ensure_usable();
  if (n == 0) return;
  if (n > nblocks_)
    raise(ErrorCode::kFull, "asked for " + std::to_string(n) + " blocks but the pool has only " + std::to_string(nblocks_));
  // One shard at a time, starting from this member's own: members of different
  // hosts mostly allocate under different locks.  Free blocks of every shard first,
  // then (when allowed) eviction (shard_pass).
  size_t have = 0;
  for (int pass = 0; pass < 2 && have < n; ++pass) {
    for (uint32_t k = 0; k < shards_.shards && have < n; ++k) {
      const uint32_t sh = (home_shard() + k) % shards_.shards;
      if (!shard_pass(sh, pass)) continue;
      ShardHold hold(this, sh);
      have = alloc_in_shard(sh, n, pass == 1 && evict, out, have);
    }
  }
  if (have < n) {
    release_claims(out, have);
    raise_full(n, evict, "");
  }
  add_counter(kCtrAllocs, n);
}

void Pool::check_handle_owned(uint64_t h, uint64_t expect_kind, const char* what, bool freeing) const {
  uint64_t i = word::handle_index(h);
  if (i >= nblocks_)
    raise(ErrorCode::kInvalidHandle, std::string(what) + ": block handle " + std::to_string(h) + " names block " +
                                         std::to_string(i) + ", but the pool has " + std::to_string(nblocks_) + " blocks");
  uint64_t s = state(i).load(std::memory_order_acquire);
  if (word::gen(s) != word::handle_gen(h))
    raise(ErrorCode::kStaleHandle, std::string(what) + ": block " + std::to_string(i) + " handle has generation " +
                                       std::to_string(word::handle_gen(h)) + " but the block is now at generation " +
                                       std::to_string(word::gen(s)) + " (stale handle)");
  if (expect_kind == kWriting && word::kind(s) == kFree) {
    if (freeing)
      raise(ErrorCode::kDoubleFree, std::string(what) + ": block " + std::to_string(i) + " is already free (double free)");
    raise(ErrorCode::kStaleHandle, std::string(what) + ": block " + std::to_string(i) + " has been freed (stale handle)");
  }
  if (word::kind(s) != expect_kind)
    raise(ErrorCode::kInvalidHandle, std::string(what) + ": block " + std::to_string(i) + " is not a block being written");
  if (word::owner(s) != slot_)
    raise(ErrorCode::kInvalidHandle, std::string(what) + ": block " + std::to_string(i) + " belongs to another pool handle");
}

void Pool::free(const uint64_t* handles, size_t n) {
  if (sharded()) return free_sharded(handles, n);
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  check_free(handles, n);
  for (size_t j = 0; j < n; ++j) free_written(handles[j]);
  hint_word(0).fetch_add(n, std::memory_order_relaxed);
}

void Pool::check_free(const uint64_t* handles, size_t n) const {
  std::vector<uint64_t> seen(handles, handles + n);
  std::sort(seen.begin(), seen.end());
  for (size_t j = 0; j < n; ++j) {
    check_handle_owned(handles[j], kWriting, "free", true);
    if (j && seen[j] == seen[j - 1])
      raise(ErrorCode::kDoubleFree, "free: block " + std::to_string(word::handle_index(seen[j])) + " appears twice (double free)");
  }
}

void Pool::free_written(uint64_t h) {
  // One checked WRITING block of ours, under the lock that guards it: bytes written back, then FREE.
  const uint64_t i = word::handle_index(h);
  const uint32_t g = word::handle_gen(h);
  uint64_t s = word::state(g, kWriting, slot_);
  write_back_block(i);
  // SYNC POINT: block-free.  Release pairs with the next claimer's acquire.
  if (!state(i).cas(s, word::state(g, kFree, 0), std::memory_order_release))
    raise(ErrorCode::kCorrupt, "free: block " + std::to_string(i) + " changed state under its owner");
  flush(&state(i), 8);
}

void Pool::free_sharded(const uint64_t* handles, size_t n) {
  heartbeat();
  ensure_usable();
  const std::vector<uint32_t> shard_of = handle_shards(handles, n);
  // Checked before anything is freed: under the one shard's lock when all the blocks lie
  // in one shard (the usual case), else without a lock -- a block this member is writing
  // changes state only by this member (or by a recoverer once it is declared dead, and
  // then the CAS below fails).
  std::optional<ShardHold> one;
  hold_if_one_shard(shard_of, one);
  check_free(handles, n);
  for (const auto& [sh, group] : group_by_shard(shard_of)) {
    ShardHold hold(this, sh);
    for (size_t j : group) free_written(handles[j]);
    hint_word(sh).fetch_add(group.size(), std::memory_order_relaxed);
  }
}

std::vector<uint32_t> Pool::handle_shards(const uint64_t* handles, size_t n) const {
  std::vector<uint32_t> shard_of(n);
  for (size_t j = 0; j < n; ++j) shard_of[j] = shards_.block_shard(word::handle_index(handles[j]));
  return shard_of;
}

void Pool::hold_if_one_shard(const std::vector<uint32_t>& shard_of, std::optional<ShardHold>& hold) const {
  if (!shard_of.empty() && std::all_of(shard_of.begin(), shard_of.end(), [&](uint32_t s) { return s == shard_of[0]; }))
    hold.emplace(this, shard_of[0]);
}

std::vector<std::pair<uint32_t, std::vector<size_t>>> Pool::group_by_shard(const std::vector<uint32_t>& shard_of) const {
  std::vector<std::pair<uint32_t, std::vector<size_t>>> groups;
  std::vector<std::vector<size_t>> by(shards_.shards);
  for (size_t j = 0; j < shard_of.size(); ++j) by[shard_of[j]].push_back(j);
  for (uint32_t s = 0; s < shards_.shards; ++s)
    if (!by[s].empty()) groups.emplace_back(s, std::move(by[s]));
  return groups;
}

uint8_t* Pool::writable_block(uint64_t h) {
  // The block's own lock (every lock when the pool has one): its state word is the only
  // line read, and only its owner (this member) changes it while it is WRITING.
  ShardHold hold(this, shards_.block_shard(word::handle_index(h)));
  ensure_usable();
  check_handle_owned(h, kWriting, "block_view");
  return block_data(word::handle_index(h));
}

}  // namespace pykvshm
