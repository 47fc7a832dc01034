// The copy engine: every byte of KV that crosses the pool boundary goes through here.
//
// A copy is a batch of spans (destination, source, length): a gather or a scatter
// between pool blocks and an engine's (strided, paged) buffers, in one call without
// the GIL.  Two kernels:
//   - memcpy:  glibc's, right for small spans and for data read again soon;
//   - stream:  non-temporal stores (no read-for-ownership of the destination, no
//              cache pollution), right for large batches; glibc only switches to them
//              for a *single* call above ~3/4 of the last-level cache, which a batch
//              of 64 KiB..2 MiB spans never is.
// `kAuto` picks by the batch's total size (see kStreamThreshold; chosen by
// bench/copy_kernels.py, figures in docs/benchmarks.md).
//
// Asynchronous copies run on the engine's worker threads in submission order;
// each belongs to a CopyGroup that the submitter waits on (and that carries the
// first error).  A job may have a completion action (e.g. "mark layer l ready")
// that runs on the worker after its bytes are copied, still in order, so a
// producer's layers become visible in order without its own thread copying.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pykvshm {

struct CopySpan {
  uint8_t* dst;
  const uint8_t* src;
  uint64_t bytes;
};

enum class CopyKernel : uint32_t { kAuto = 0, kMemcpy = 1, kStream = 2 };

// Batches of at least this many bytes use the streaming kernel under kAuto.
inline constexpr uint64_t kStreamThreshold = 16ull << 10;

// Copies every span on the calling thread with `kernel` (kAuto resolved by total size).
void copy_spans(const CopySpan* spans, size_t n, CopyKernel kernel);
// One span with non-temporal stores (any alignment; ends with a store fence).
void stream_copy(void* dst, const void* src, size_t bytes);
CopyKernel resolve_kernel(CopyKernel k, uint64_t total_bytes);
const char* kernel_name(CopyKernel k);

// Completion of a set of asynchronous jobs, waited on by whoever submitted them.
class CopyGroup {
 public:
  // Blocks until every job submitted with this group has run; then rethrows the
  // first error one of them raised (once: the error is cleared by the rethrow).
  void wait();
  bool idle();             // no job pending (does not wait, does not rethrow)
  bool failed();           // a job raised (the error is still held)
  uint64_t pending();

 private:
  friend class CopyEngine;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t pending_ = 0;
  std::exception_ptr error_;
};

class CopyEngine {
 public:
  // `threads` workers split each job's spans between them (1 = one worker; the
  // machine's memory bandwidth, not the core count, is the usual limit).
  explicit CopyEngine(unsigned threads = 1, CopyKernel kernel = CopyKernel::kAuto);
  ~CopyEngine();  // waits for every job, then stops the workers
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Queues `spans` (copied after every earlier job) and then `then` (on the worker;
  // an exception from it, or a skipped job, becomes the group's error).  A job of
  // a group that already failed is skipped, and so is its `then`.
  void submit(const std::shared_ptr<CopyGroup>& group, std::vector<CopySpan> spans,
              std::function<void()> then = {});
  // Synchronous: the calling thread copies, helped by the workers when threads > 1.
  void run(const CopySpan* spans, size_t n);
  void drain();  // waits until every queued job has run

  unsigned threads() const { return threads_; }
  CopyKernel kernel() const { return kernel_; }
  uint64_t jobs_done() const;
  uint64_t bytes_done() const;

 private:
  struct Job {
    std::shared_ptr<CopyGroup> group;
    std::vector<CopySpan> spans;
    std::function<void()> then;
  };
  void start_locked();
  void dispatcher();
  void helper(unsigned id);
  void parallel_copy(const CopySpan* spans, size_t n, CopyKernel k);

  const unsigned threads_;
  const CopyKernel kernel_;
  mutable std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<Job> queue_;
  bool running_ = false, stopping_ = false, busy_ = false;
  uint64_t jobs_done_ = 0, bytes_done_ = 0;
  std::thread dispatcher_;

  // Helpers for splitting one batch over several threads (threads_ > 1).
  std::mutex par_mu_;  // one parallel batch at a time
  std::mutex part_mu_;
  std::condition_variable part_cv_, part_done_cv_;
  uint64_t part_seq_ = 0;
  unsigned parts_left_ = 0;
  std::vector<std::vector<CopySpan>> parts_;
  CopyKernel part_kernel_ = CopyKernel::kMemcpy;
  std::vector<std::thread> helpers_;
};

}  // namespace pykvshm
