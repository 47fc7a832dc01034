// The lock of noncoherent pools: mutual exclusion among processes on several
// hosts that share memory without cache coherence (CXL 2.0), using no
// cross-host read-modify-write.  docs/design/coherence.md has the argument.
//
// Tier 1, among the processes of one host: a CAS on the `local` word of the
// host's own line (processes of one host share a cache, so their atomics work).
// Tier 2, among hosts: Lamport's bakery over the host lines.  Each host writes
// only its own line and writes it back (flush) after every change; a reader
// invalidates a line before reading it.  A host whose heartbeat is older than
// the lease is skipped (dead); a local holder whose process is gone is taken
// over by the next local process.
//
// Holder lease and fencing: the process holding a host's `local` word renews
// the line's `hold_ns` while it makes progress (renew(), called before every
// metadata access of the holder).  A holder silent past the lease -- dead,
// stopped or hung -- is taken over by its host's next waiter and passed over by
// the other hosts' waiters.  A holder checks, before each access, that it
// still holds `local` and renewed within half the lease; otherwise renew()
// answers false and the caller must not write (Pool raises kMemberLost).
// Every lock word read is untrusted: heartbeats and holds in the future beyond
// a lease, tickets that could overflow, a `choosing` or ticket without a live
// hold are passed over, so every wait is bounded by about two leases.
//
// Lock shards (layout version 4): a shard's HostLock runs the same two tiers over
// its own bakery lines (ShardLock::lines); the host identity, the heartbeat and
// the claim of a line stay with the pool-wide lock (init_shard names it), so a
// host has the same line index in every shard.
//
// A HostLock is one process's view; it is not thread-safe (Pool serializes its
// threads with a mutex around it).
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>

#include "pykvshm/layout.h"

namespace pykvshm {

class HostLock {
 public:
  void init(layout::Control* ctl, uint64_t host_id, uint64_t lease_ns, uint32_t pid);
  // A shard's lock: bakery over `lines`; identity, heartbeat and joining through `identity`
  // (the pool-wide lock, which outlives this one).  The pool-wide lock is told of the
  // shards' lines (add_shard_lines) so that a host claiming a line clears them too.
  void init_shard(HostLock* identity, layout::HostLine* lines);
  // Called now and then while this lock waits: renews the locks the caller already holds
  // (the pool-wide lock and lower shards), which must not look silent meanwhile.
  void set_keep_alive(std::function<void()> f) { keep_alive_ = std::move(f); }
  // The holder token this handle last took over for silence (a stopped holder): its
  // other lock words are taken over at once, without another lease of waiting.
  uint64_t silent_token() const noexcept { return identity_ ? identity_->silent_token_ : silent_token_; }
  // Called before each acquisition: the finding holds for one acquisition only (a fenced
  // handle later takes the lock afresh, with the same token, to close).
  void forget_silent() noexcept { silent_token_ = 0; }
  void add_shard_lines(layout::HostLine* lines) noexcept {
    if (nshard_lines_ < layout::kMaxLockShards) shard_lines_[nshard_lines_++] = lines;
  }
  // Finds this host's line, or claims a free (or dead host's) one.  Throws
  // kMembersFull when kLockHosts live hosts hold every line.
  void join();
  // Returns true when it took the host's lock over from a dead local process
  // (whose writes may still sit unflushed in this host's cache).
  bool lock();
  void unlock() noexcept;
  // The holder, before each access to shared metadata: true while this handle
  // still holds the lock and has not been silent for half the lease (then it
  // renews its hold when due); false when the lock may have passed to another
  // process: nothing may be written under it any more.
  bool renew() noexcept;
  void beat() noexcept;  // refresh this host's heartbeat (any thread, any time after join)
  // Whether some process of host `host_id` beat its line within the lease.
  bool host_beating(uint64_t host_id) const noexcept;

  uint32_t line() const noexcept { return identity_ ? identity_->line() : line_.load(std::memory_order_relaxed); }
  uint64_t acquisitions() const noexcept { return acquisitions_; }
  uint64_t takeovers() const noexcept { return takeovers_; }
  // Whether the last lock() found the lock held (by this host's tier 1 or another host's ticket).
  bool waited() const noexcept { return waited_; }
  uint64_t hosts_skipped() const noexcept { return skipped_; }
  uint64_t lease_ns() const noexcept { return lease_ns_; }

 private:
  layout::HostLine& host(uint32_t j) const { return ctl_->hosts[j]; }  // identity: host_id, heartbeat
  layout::HostLine& bak(uint32_t j) const { return lines_[j]; }        // this lock's bakery line
  // A time stamp read from the pool older than the lease, or in the future by
  // more than a lease (clocks agree far better than that: a corrupt word).
  bool stale(uint64_t stamp_ns, uint64_t now) const noexcept;
  uint32_t lines_used() const noexcept;
  bool local_holder_dead(uint64_t holder) const;
  bool join_stale(uint64_t now) const;
  // Whether line j may still be competing for the lock (a live host, a live hold,
  // a ticket that is not garbage); false: pass it over.
  bool competing(const layout::HostLine& l, uint64_t now) const noexcept;
  uint64_t effective_lease(const layout::HostLine& l) const noexcept;
  uint64_t fence_ns() const noexcept;  // a holder silent this long fences itself
  enum class Turn { kOurs, kRestart };
  Turn wait_turn(uint32_t j, uint64_t mine);
  bool take_local(layout::HostLine& l);  // tier 1; returns whether it took over from a silent holder
  bool ours(const layout::HostLine& l) const noexcept {
    return l.local.load(std::memory_order_acquire) == token_;
  }
  void start_hold(layout::HostLine& l) noexcept;
  void pause(uint32_t& spins) noexcept;

  layout::Control* ctl_ = nullptr;
  layout::HostLine* lines_ = nullptr;  // ctl_->hosts for the pool-wide lock
  HostLock* identity_ = nullptr;       // a shard's lock: the pool-wide lock
  layout::HostLine* shard_lines_[layout::kMaxLockShards] = {};
  uint32_t nshard_lines_ = 0;
  std::function<void()> keep_alive_;
  uint64_t silent_token_ = 0;
  uint64_t host_id_ = 0, lease_ns_ = 0, token_ = 0;
  uint32_t pid_ = 0;
  std::atomic<uint32_t> line_{layout::kLockHosts};
  std::atomic<uint64_t> last_beat_{0};
  uint64_t acquisitions_ = 0, takeovers_ = 0, skipped_ = 0;
  bool waited_ = false;
  uint64_t renewed_ns_ = 0;  // when this handle last proved, as holder, that it runs
};

}  // namespace pykvshm
