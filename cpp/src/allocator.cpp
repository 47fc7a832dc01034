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

uint64_t Pool::scan_claim_free(size_t want, uint64_t* out, size_t have) {
  uint64_t i = cursor_.load(std::memory_order_relaxed) % nblocks_, steps = 0;
  uint64_t claimed = 0;
  while (have < want && steps < nblocks_) {
    if (try_claim(i, &out[have])) {
      ++have;
      ++claimed;
    }
    ++steps;
    if (++i == nblocks_) i = 0;
  }
  cursor_.store(i, std::memory_order_relaxed);
  if (steps == nblocks_ && have < want) {
    // A whole pass found no more free blocks: the hint was wrong (a crash
    // between a state change and the hint update); reset it.
    ctl()->free_hint.value.store(0, std::memory_order_relaxed);
  }
  return claimed;
}

uint64_t Pool::scan_evict(size_t want, uint64_t* out, size_t have) {
  uint64_t got = 0, steps = 0;
  const uint64_t limit = 3 * nblocks_ + 64;  // ref bits cleared on pass 1, evicted on pass 2
  while (have + got < want && steps < limit) {
    uint64_t base = ctl()->clock_hand.value.fetch_add(64, std::memory_order_relaxed);
    for (uint64_t j = 0; j < 64 && have + got < want; ++j, ++steps) {
      uint64_t i = (base + j) % nblocks_;
      Atomic64& sw = state(i);
      uint64_t s = sw.load(std::memory_order_relaxed);
      switch (word::kind(s)) {
        case kFree:
          if (try_claim(i, &out[have + got])) {
            ++got;
            ctl()->free_hint.value.fetch_sub(1, std::memory_order_relaxed);
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
    write_back_block(i);
    if (state(i).cas(s, word::state(g, kFree, 0), std::memory_order_release)) {
      flush(&state(i), 8);
      ctl()->free_hint.value.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

void Pool::alloc(size_t n, bool evict, uint64_t* out) {
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  if (n == 0) return;
  if (n > nblocks_)
    raise(ErrorCode::kFull, "asked for " + std::to_string(n) + " blocks but the pool has only " + std::to_string(nblocks_));
  size_t have = 0;
  int64_t hint = int64_t(ctl()->free_hint.value.load(std::memory_order_relaxed));
  if (hint > 0) {
    uint64_t got = scan_claim_free(n, out, 0);
    have = got;
    ctl()->free_hint.value.fetch_sub(got, std::memory_order_relaxed);
  }
  if (have < n && evict) have += scan_evict(n, out, have);
  if (have < n && hint <= 0) {
    // Last resort when the hint said "nothing free" (it may be stale after a
    // crash): one full pass over the states.
    uint64_t got = scan_claim_free(n, out, have);
    have += got;
    ctl()->free_hint.value.fetch_sub(got, std::memory_order_relaxed);
  }
  if (have < n) {
    release_claims(out, have);
    Stats st = stats();
    raise(ErrorCode::kFull, "pool is full: asked for " + std::to_string(n) + " blocks; of " + std::to_string(st.total) +
                                " blocks " + std::to_string(st.free) + " are free, " + std::to_string(st.writing) +
                                " being written, " + std::to_string(st.pinned) + " pinned, " + std::to_string(st.sealed) +
                                " sealed" + (evict ? "" : " (eviction was not allowed)"));
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
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  std::vector<uint64_t> seen(handles, handles + n);
  std::sort(seen.begin(), seen.end());
  for (size_t j = 0; j < n; ++j) {
    check_handle_owned(handles[j], kWriting, "free", true);
    if (j && seen[j] == seen[j - 1])
      raise(ErrorCode::kDoubleFree, "free: block " + std::to_string(word::handle_index(seen[j])) + " appears twice (double free)");
  }
  for (size_t j = 0; j < n; ++j) {
    uint64_t i = word::handle_index(handles[j]);
    uint32_t g = word::handle_gen(handles[j]);
    uint64_t s = word::state(g, kWriting, slot_);
    write_back_block(i);
    // SYNC POINT: block-free.  Release pairs with the next claimer's acquire.
    if (!state(i).cas(s, word::state(g, kFree, 0), std::memory_order_release))
      raise(ErrorCode::kCorrupt, "free: block " + std::to_string(i) + " changed state under its owner");
    flush(&state(i), 8);
  }
  ctl()->free_hint.value.fetch_add(n, std::memory_order_relaxed);
}

uint8_t* Pool::writable_block(uint64_t h) {
  Exclusive ex(this);
  ensure_usable();
  check_handle_owned(h, kWriting, "block_view");
  return block_data(word::handle_index(h));
}

}  // namespace pykvshm
