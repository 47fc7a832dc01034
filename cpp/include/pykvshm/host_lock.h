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
// A HostLock is one process's view; it is not thread-safe (Pool serializes its
// threads with a mutex around it).
#pragma once

#include <atomic>
#include <cstdint>

#include "pykvshm/layout.h"

namespace pykvshm {

class HostLock {
 public:
  void init(layout::Control* ctl, uint64_t host_id, uint64_t lease_ns, uint32_t pid);
  // Finds this host's line, or claims a free (or dead host's) one.  Throws
  // kMembersFull when kLockHosts live hosts hold every line.
  void join();
  // Returns true when it took the host's lock over from a dead local process
  // (whose writes may still sit unflushed in this host's cache).
  bool lock();
  void unlock() noexcept;
  void beat() noexcept;  // refresh this host's heartbeat (any thread, any time after join)
  // Whether some process of host `host_id` beat its line within the lease.
  bool host_beating(uint64_t host_id) const noexcept;

  uint32_t line() const noexcept { return line_.load(std::memory_order_relaxed); }
  uint64_t acquisitions() const noexcept { return acquisitions_; }
  uint64_t takeovers() const noexcept { return takeovers_; }
  uint64_t hosts_skipped() const noexcept { return skipped_; }

 private:
  layout::HostLine& host(uint32_t j) const { return ctl_->hosts[j]; }
  bool stale(uint64_t heartbeat_ns, uint64_t now) const noexcept;
  uint32_t lines_used() const noexcept;
  bool local_holder_dead(uint64_t holder) const;
  bool join_stale(uint64_t now) const;
  void wait_turn(uint32_t j, uint64_t mine);
  void pause(uint32_t& spins) noexcept;

  layout::Control* ctl_ = nullptr;
  uint64_t host_id_ = 0, lease_ns_ = 0, token_ = 0;
  uint32_t pid_ = 0;
  std::atomic<uint32_t> line_{layout::kLockHosts};
  std::atomic<uint64_t> last_beat_{0};
  uint64_t acquisitions_ = 0, takeovers_ = 0, skipped_ = 0;
};

}  // namespace pykvshm
