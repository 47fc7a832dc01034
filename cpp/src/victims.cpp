// pin_victims: the blocks CLOCK will evict next, pinned for a demoter (the cluster tier) to
// copy out before eviction can take them.  docs/design/tiering.md has the argument.
//
// Self-contained on purpose: it uses the allocator's state words and the index's pin() as
// they are, moves no clock hand and changes no eviction rule.  A block it pins is simply not
// evictable until the demoter releases it (like any reader's pin), so the worst it does to
// the allocator is delay one batch of evictions.
#include <algorithm>
#include <atomic>
#include <cstring>

#include "pykvshm/crc32c.h"
#include "pykvshm/pool.h"

namespace pykvshm {

using namespace layout;

size_t Pool::pin_victims(size_t n, uint64_t* handles, uint8_t* keys) {
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  if (n == 0 || nblocks_ == 0) return 0;
  size_t got = 0;
  // Eviction's next candidates are the blocks from the clock hand on.  The scan is bounded (at
  // most one lap, and 64 blocks per victim asked plus 1024) so that it never holds the pool's
  // exclusive section (the pool lock in noncoherent mode) for a sweep of a large pool.
  const uint64_t hand = ctl()->clock_hand.value.load(std::memory_order_relaxed) % nblocks_;
  const uint64_t limit = std::min<uint64_t>(nblocks_, 64 * uint64_t(n) + 1024);
  for (uint64_t step = 0; step < limit && got < n; ++step) {
    const uint64_t i = (hand + step) % nblocks_;
    Atomic64& sw = state(i);
    const uint64_t s = sw.load(std::memory_order_acquire);
    // CLOCK evicts a sealed block whose reference bit is clear and that nobody pins.
    if (word::kind(s) != kSealed || word::ref(s)) continue;
    BlockDesc& d = desc(i);
    if (word::pins_count(d.pins.load(std::memory_order_relaxed))) continue;
    if (withdrawn(i, s)) continue;
    // Seqlock-style read of the key, as lookup() does: valid only if the state did not move.
    const uint64_t k0 = d.key[0].load(std::memory_order_relaxed);
    const uint64_t k1 = d.key[1].load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((sw.load(std::memory_order_relaxed) ^ s) & ~word::kRefBit) continue;
    const uint32_t g = word::gen(s);
    if (!pin(i, g, k0, k1)) continue;
    // pin() marks the block recently used; a demoter's copy is not a use, so take the bit back
    // when nothing else moved the word (a reader that pinned it meanwhile set the same bit: the
    // approximation CLOCK already makes).
    uint64_t touched = s | word::kRefBit;
    if (sw.cas(touched, s, std::memory_order_relaxed)) flush(&sw, 8);
    if (checksums_) {
      const uint8_t* p = block_data(i);
      fresh(p, geo_.block_bytes);
      if (crc32c(p, geo_.block_bytes) != d.crc.load(std::memory_order_relaxed)) {
        // A corrupt block is not copied anywhere; acquire() reports and withdraws it.
        std::lock_guard<std::mutex> lk(pin_mu_);
        unpin(i);
        continue;
      }
    }
    handles[got] = word::handle(g, i);
    std::memcpy(keys + 16 * got, &k0, 8);
    std::memcpy(keys + 16 * got + 8, &k1, 8);
    ++got;
  }
  return got;
}

}  // namespace pykvshm
