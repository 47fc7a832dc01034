#include "pykvshm/host_lock.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <thread>

#include "pykvshm/errors.h"
#include "pykvshm/pool.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

using namespace layout;

namespace {

// Fischer's delay: a claimant of the join line re-reads it this long after
// writing it back.  Safe when no claimant takes longer than this between
// reading the line free and its write reaching the device (coherence.md).
constexpr uint64_t kJoinSettleNs = 20'000'000ull;
constexpr uint64_t kBeatEveryNs = 50'000'000ull;
// A holder writes its hold stamp back at most this often while it makes progress.
constexpr uint64_t kRenewEveryNs = 20'000'000ull;
// A lease a holder declares is honoured up to this long (a larger value in the
// pool is garbage, and must not make anyone wait longer).
constexpr uint64_t kMaxHoldLeaseNs = 60'000'000'000ull;
// Tickets grow by one per contended acquisition: a ticket this large is garbage
// (taking max + 1 of it could wrap to 0, "not competing").
constexpr uint64_t kMaxTicket = 1ull << 62;

// Everything a host line says fits in its first 64 bytes (one cache line).
void fresh(const void* p) noexcept { visibility::invalidate_range(p, 64); }
void publish(const void* p) noexcept { visibility::flush_range(p, 64); }

// A host line's bakery words, as a newly claimed line starts (its identity words aside).
void clear_bakery(HostLine& l) noexcept {
  l.ticket.store(0, std::memory_order_relaxed);
  l.choosing.store(0, std::memory_order_relaxed);
  l.local.store(0, std::memory_order_relaxed);
  l.hold_ns.store(0, std::memory_order_relaxed);
  l.hold_lease_ns.store(0, std::memory_order_relaxed);
}

uint64_t monotonic_ns() noexcept {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

// Older than `lease`, or in the future by more than `lease` (clocks agree far
// better than a lease: such a stamp is corrupt, and must not hold anyone up).
bool stale_by(uint64_t stamp, uint64_t now, uint64_t lease) noexcept {
  return now >= stamp ? now - stamp > lease : stamp - now > lease;
}

}  // namespace

void HostLock::init(Control* ctl, uint64_t host_id, uint64_t lease_ns, uint32_t pid) {
  ctl_ = ctl;
  lines_ = ctl->hosts;
  host_id_ = host_id;
  lease_ns_ = lease_ns;
  pid_ = pid;
  std::random_device rd;
  uint32_t t = 0;
  while (t == 0) t = rd();
  token_ = (uint64_t(pid) << 32) | t;
}

void HostLock::init_shard(HostLock* identity, HostLine* lines) {
  ctl_ = identity->ctl_;
  lines_ = lines;
  identity_ = identity;
  host_id_ = identity->host_id_;
  lease_ns_ = identity->lease_ns_;
  pid_ = identity->pid_;
  token_ = identity->token_;  // one holder identity per handle: the same pid and random token
  identity->add_shard_lines(lines);
}

uint32_t HostLock::lines_used() const noexcept {
  fresh(&ctl_->join);
  return uint32_t(std::min<uint64_t>(ctl_->join.lines_used.load(std::memory_order_seq_cst), kLockHosts));
}

bool HostLock::stale(uint64_t stamp, uint64_t now) const noexcept { return stale_by(stamp, now, lease_ns_); }

// A holder is given the longer of the waiter's lease and the one it declared
// (capped), so a waiter with a short lease never passes over a holder that has
// not yet fenced itself at half of its own.
uint64_t HostLock::effective_lease(const HostLine& l) const noexcept {
  return std::max(lease_ns_, std::min(l.hold_lease_ns.load(std::memory_order_relaxed), kMaxHoldLeaseNs));
}

uint64_t HostLock::fence_ns() const noexcept { return std::min(lease_ns_, kMaxHoldLeaseNs) / 2; }

bool HostLock::competing(const HostLine& l, uint64_t now) const noexcept {
  if (l.ticket.load(std::memory_order_seq_cst) >= kMaxTicket) return false;  // garbage
  // Its hold, not its host's heartbeat, decides: another process of a stopped
  // holder's host keeps the host line beating.
  return !stale_by(l.hold_ns.load(std::memory_order_relaxed), now, effective_lease(l));
}

bool HostLock::local_holder_dead(uint64_t holder) const {
  const uint32_t pid = uint32_t(holder >> 32);
  if (pid == pid_) return false;  // another handle of this process: alive
  uint64_t st = 0;
  return process_state(pid, &st) == ProcState::kGone;
}

bool HostLock::join_stale(uint64_t now) const {
  const JoinLine& j = ctl_->join;
  if (j.host_id.load(std::memory_order_relaxed) == host_id_) {
    uint64_t st = 0;
    if (process_state(uint32_t(j.pid.load(std::memory_order_relaxed)), &st) == ProcState::kGone) return true;
  }
  return stale(j.since_ns.load(std::memory_order_relaxed), now);
}

void HostLock::pause(uint32_t& spins) noexcept {
  ++spins;
  if (spins < 64) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  } else if (spins < 256) {
    sched_yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(spins < 1024 ? 10 : 50));
  }
  if ((spins & 63) == 0) {
    beat();  // a waiter must not look dead to other hosts
    if (keep_alive_) keep_alive_();
  }
}

void HostLock::beat() noexcept {
  if (identity_) {
    identity_->beat();
    return;
  }
  const uint32_t me = line();
  if (me >= kLockHosts) return;
  const uint64_t now = realtime_ns();
  const uint64_t last = last_beat_.load(std::memory_order_relaxed);
  if (now >= last && now - last < kBeatEveryNs) return;
  last_beat_.store(now, std::memory_order_relaxed);
  host(me).heartbeat_ns.store(now, std::memory_order_relaxed);
  publish(&host(me));
}

bool HostLock::host_beating(uint64_t host_id) const noexcept {
  const uint64_t now = realtime_ns();
  for (uint32_t j = 0, used = lines_used(); j < used; ++j) {
    fresh(&host(j));
    if (host(j).host_id.load(std::memory_order_acquire) == host_id)
      return !stale(host(j).heartbeat_ns.load(std::memory_order_relaxed), now);
  }
  return false;
}

void HostLock::join() {
  if (identity_) {
    identity_->join();
    return;
  }
  JoinLine& jl = ctl_->join;
  for (uint32_t spins = 0;;) {
    // Already ours (another process of this host joined before)?
    for (uint32_t j = 0; j < kLockHosts; ++j) {
      fresh(&host(j));
      if (host(j).host_id.load(std::memory_order_acquire) == host_id_) {
        line_.store(j, std::memory_order_relaxed);
        beat();
        return;
      }
    }
    // Claim the join line.  Among processes of one host the CAS decides; among
    // hosts Fischer's delay does: wait, re-read, and only the last writer wins.
    fresh(&jl);
    uint64_t owner = jl.owner.load(std::memory_order_acquire);
    const uint64_t now = realtime_ns();
    if (owner != 0 && !join_stale(now)) {
      pause(spins);
      continue;
    }
    if (!jl.owner.cas(owner, token_, std::memory_order_acq_rel)) continue;
    jl.since_ns.store(now, std::memory_order_relaxed);
    jl.host_id.store(host_id_, std::memory_order_relaxed);
    jl.pid.store(pid_, std::memory_order_relaxed);
    publish(&jl);
    std::this_thread::sleep_for(std::chrono::nanoseconds(kJoinSettleNs));
    fresh(&jl);
    if (jl.owner.load(std::memory_order_acquire) != token_) continue;
    // Ours alone: take a free line, else the line of a host that stopped beating.
    uint32_t pick = kLockHosts;
    bool found_mine = false;
    const uint64_t t = realtime_ns();
    for (uint32_t j = 0; j < kLockHosts; ++j) {
      fresh(&host(j));
      const uint64_t h = host(j).host_id.load(std::memory_order_acquire);
      if (h == host_id_) {
        pick = j;
        found_mine = true;
        break;
      }
      if (pick == kLockHosts && (h == 0 || stale(host(j).heartbeat_ns.load(std::memory_order_relaxed), t))) pick = j;
    }
    if (pick < kLockHosts && !found_mine) {
      HostLine& l = host(pick);
      clear_bakery(l);
      l.heartbeat_ns.store(t, std::memory_order_relaxed);
      // The line's bakery words in every lock shard belong to the new host now.
      for (uint32_t k = 0; k < nshard_lines_; ++k) {
        clear_bakery(shard_lines_[k][pick]);
        publish(&shard_lines_[k][pick]);
      }
      l.host_id.store(host_id_, std::memory_order_release);
      publish(&l);
      if (jl.lines_used.load(std::memory_order_relaxed) < pick + 1) jl.lines_used.store(pick + 1, std::memory_order_seq_cst);
    }
    uint64_t expect = token_;
    jl.owner.cas(expect, 0, std::memory_order_release);
    publish(&jl);
    if (pick == kLockHosts)
      raise(ErrorCode::kMembersFull, "all " + std::to_string(kLockHosts) +
                                         " host lines of the pool's noncoherent lock are held by live hosts");
    line_.store(pick, std::memory_order_relaxed);
    last_beat_.store(0, std::memory_order_relaxed);
    beat();
    return;
  }
}

HostLock::Turn HostLock::wait_turn(uint32_t j, uint64_t mine) {
  const uint32_t me = line();
  for (uint32_t spins = 0;; pause(spins)) {
    // A waiter silent for half its lease may have been passed over: take a new ticket.
    if (!renew()) return Turn::kRestart;
    fresh(&host(j));
    if (host(j).host_id.load(std::memory_order_acquire) == 0) return Turn::kOurs;
    HostLine& l = bak(j);
    if (&l != &host(j)) fresh(&l);
    const uint32_t c = l.choosing.load(std::memory_order_seq_cst);
    const uint64_t t = l.ticket.load(std::memory_order_seq_cst);
    if (t == 0 && c == 0) return Turn::kOurs;
    if (!competing(l, realtime_ns())) {
      ++skipped_;  // a dead, stopped or corrupt line: whatever it holds, it no longer competes
      return Turn::kOurs;
    }
    if (!c && (t == 0 || t > mine || (t == mine && j > me))) return Turn::kOurs;
    waited_ = true;  // line j is choosing, or holds an earlier ticket
  }
}

void HostLock::start_hold(HostLine& l) noexcept {
  const uint64_t now = realtime_ns();
  renewed_ns_ = now;
  if (!ours(l)) return;
  l.hold_lease_ns.store(std::min(lease_ns_, kMaxHoldLeaseNs), std::memory_order_relaxed);
  l.hold_ns.store(now, std::memory_order_release);
  publish(&l);
}

bool HostLock::renew() noexcept {
  const uint32_t me = line();
  if (me >= kLockHosts) return false;
  HostLine& l = bak(me);
  if (!ours(l)) return false;  // another process of this host took the lock over
  const uint64_t now = realtime_ns();
  if (now >= renewed_ns_ && now - renewed_ns_ > fence_ns()) return false;  // silent too long: maybe passed over
  if (now < renewed_ns_ || now - renewed_ns_ >= kRenewEveryNs) {
    renewed_ns_ = now;
    l.hold_ns.store(now, std::memory_order_release);
    publish(&l);
  }
  return true;
}

bool HostLock::take_local(HostLine& l) {
  uint64_t seen = 0, seen_since = 0;
  for (uint32_t spins = 0;; pause(spins)) {
    uint64_t cur = l.local.load(std::memory_order_acquire);
    if (cur == 0) {
      if (l.local.cas(cur, token_, std::memory_order_acq_rel)) return false;
      continue;
    }
    if (cur == token_) return false;
    waited_ = true;
    const uint64_t mono = monotonic_ns();
    if (cur != seen) {
      seen = cur;
      seen_since = mono;
    }
    if ((spins & 15) != 15) continue;
    // Taken over: a holder whose process is gone, or one that has held the
    // same word for a lease (by our own observation) without renewing its hold
    // (stopped, hung, or a corrupt word naming some live process).
    const uint64_t lease = effective_lease(l);
    const bool silent = mono - seen_since > lease && stale_by(l.hold_ns.load(std::memory_order_acquire), realtime_ns(), lease);
    // A holder this handle already found silent for a lease (on another of its lock
    // words, in this same acquisition) is not waited for again.
    const bool known_silent = identity_ && cur == silent_token();
    if ((silent || known_silent || local_holder_dead(cur)) && l.local.cas(cur, token_, std::memory_order_acq_rel)) {
      if (silent && !identity_) silent_token_ = cur;
      ++takeovers_;
      return true;
    }
  }
}

bool HostLock::lock() {
  bool took_over = false;
  waited_ = false;
  for (;;) {
    uint32_t me = line();
    // Our line may have been taken by another host if this host was silent past
    // the lease (then it was declared dead): join again.
    if (me >= kLockHosts || (fresh(&host(me)), host(me).host_id.load(std::memory_order_acquire) != host_id_)) {
      join();
      me = line();
    }
    HostLine& l = bak(me);
    // Tier 1: one process of this host at a time.
    if (take_local(l)) took_over = true;
    start_hold(l);
    // Tier 2: the bakery among hosts (seq_cst: the bakery needs every store to be
    // ordered before the loads that follow it; on x86 invalidate_range fences too).
    // Only lines ever claimed take part.  A host that claims a line after our
    // first look is seen by the second (after our doorway), as the bakery needs.
    // Every write to our line is made only while `local` is still ours.
    while (ours(l)) {
      l.choosing.store(1, std::memory_order_seq_cst);
      publish(&l);
      uint64_t top = 0;
      const uint64_t now = realtime_ns();
      for (uint32_t j = 0, used = lines_used(); j < used; ++j) {
        if (j == me) continue;
        fresh(&host(j));
        if (host(j).host_id.load(std::memory_order_acquire) == 0) continue;
        HostLine& o = bak(j);
        fresh(&o);
        const uint64_t t = o.ticket.load(std::memory_order_seq_cst);
        if (t != 0 && competing(o, now)) top = std::max(top, t);
      }
      if (!ours(l)) break;
      const uint64_t mine = top + 1;
      l.ticket.store(mine, std::memory_order_seq_cst);
      publish(&l);
      l.choosing.store(0, std::memory_order_seq_cst);
      publish(&l);
      bool restart = false;
      for (uint32_t j = 0, used = lines_used(); j < used && !restart; ++j)
        if (j != me) restart = wait_turn(j, mine) == Turn::kRestart;
      if (!restart && renew()) {
        ++acquisitions_;
        return took_over;
      }
      // We were silent for half a lease while waiting (stopped?): the others may
      // have passed our ticket over.  Withdraw it and queue again.
      if (!ours(l)) break;
      l.ticket.store(0, std::memory_order_seq_cst);
      publish(&l);
      start_hold(l);
    }
    // Another process of this host took `local` over while we were silent.
  }
}

void HostLock::unlock() noexcept {
  const uint32_t me = line();
  if (me >= kLockHosts) return;
  HostLine& l = bak(me);
  if (!ours(l)) return;  // taken over meanwhile: the line is someone else's now
  l.ticket.store(0, std::memory_order_seq_cst);
  publish(&l);
  uint64_t cur = token_;
  l.local.cas(cur, 0, std::memory_order_release);
}

}  // namespace pykvshm
