#include "pykvshm/copy_engine.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#define PYKVSHM_HAVE_SSE2 1
#endif

namespace pykvshm {

void stream_copy(void* dst_v, const void* src_v, size_t bytes) {
#ifdef PYKVSHM_HAVE_SSE2
  auto* dst = static_cast<uint8_t*>(dst_v);
  auto* src = static_cast<const uint8_t*>(src_v);
  if (bytes < 256) {
    std::memcpy(dst, src, bytes);
    return;
  }
  // Head: bring the destination to a 16-byte boundary.
  const size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  bytes -= head;
  size_t blocks = bytes / 64;
  while (blocks--) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
    src += 64;
    dst += 64;
  }
  std::memcpy(dst, src, bytes % 64);
  // Non-temporal stores are weakly ordered: fence them before anything that
  // publishes the bytes (a release store of a ready flag or a state word).
  _mm_sfence();
#else
  std::memcpy(dst_v, src_v, bytes);
#endif
}

CopyKernel resolve_kernel(CopyKernel k, uint64_t total_bytes) {
  if (k != CopyKernel::kAuto) return k;
  return total_bytes >= kStreamThreshold ? CopyKernel::kStream : CopyKernel::kMemcpy;
}

const char* kernel_name(CopyKernel k) {
  switch (k) {
    case CopyKernel::kAuto: return "auto";
    case CopyKernel::kMemcpy: return "memcpy";
    case CopyKernel::kStream: return "stream";
  }
  return "?";
}

static uint64_t total_of(const CopySpan* s, size_t n) {
  uint64_t t = 0;
  for (size_t i = 0; i < n; ++i) t += s[i].bytes;
  return t;
}

static void copy_resolved(const CopySpan* s, size_t n, CopyKernel k) {
  if (k == CopyKernel::kStream) {
    for (size_t i = 0; i < n; ++i)
      if (s[i].dst != s[i].src) stream_copy(s[i].dst, s[i].src, s[i].bytes);
  } else {
    for (size_t i = 0; i < n; ++i)
      if (s[i].dst != s[i].src && s[i].bytes) std::memcpy(s[i].dst, s[i].src, s[i].bytes);
  }
}

void copy_spans(const CopySpan* spans, size_t n, CopyKernel kernel) {
  copy_resolved(spans, n, resolve_kernel(kernel, total_of(spans, n)));
}

// ---- CopyGroup ----

void CopyGroup::wait() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return pending_ == 0; });
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

bool CopyGroup::idle() {
  std::lock_guard<std::mutex> lk(mu_);
  return pending_ == 0;
}

bool CopyGroup::failed() {
  std::lock_guard<std::mutex> lk(mu_);
  return error_ != nullptr;
}

uint64_t CopyGroup::pending() {
  std::lock_guard<std::mutex> lk(mu_);
  return pending_;
}

// ---- CopyEngine ----

CopyEngine::CopyEngine(unsigned threads, CopyKernel kernel) : threads_(threads ? threads : 1), kernel_(kernel) {}

CopyEngine::~CopyEngine() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
    stopping_ = true;
  }
  cv_.notify_all();
  if (dispatcher_.joinable()) dispatcher_.join();
  {
    std::lock_guard<std::mutex> lk(part_mu_);
    ++part_seq_;  // wakes the helpers; stopping_ makes them leave
  }
  part_cv_.notify_all();
  for (auto& t : helpers_)
    if (t.joinable()) t.join();
}

void CopyEngine::start_locked() {
  if (running_) return;
  running_ = true;
  dispatcher_ = std::thread([this] { dispatcher(); });
  for (unsigned i = 1; i < threads_; ++i) helpers_.emplace_back([this, i] { helper(i); });
}

void CopyEngine::submit(const std::shared_ptr<CopyGroup>& group, std::vector<CopySpan> spans,
                        std::function<void()> then) {
  {
    std::lock_guard<std::mutex> g(group->mu_);
    ++group->pending_;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    start_locked();
    queue_.push_back(Job{group, std::move(spans), std::move(then)});
  }
  cv_.notify_one();
}

void CopyEngine::dispatcher() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    bool skip;
    {
      std::lock_guard<std::mutex> g(job.group->mu_);
      skip = job.group->error_ != nullptr;
    }
    std::exception_ptr err;
    uint64_t bytes = 0;
    if (!skip) {
      try {
        bytes = total_of(job.spans.data(), job.spans.size());
        parallel_copy(job.spans.data(), job.spans.size(), resolve_kernel(kernel_, bytes));
        if (job.then) job.then();
      } catch (...) {
        err = std::current_exception();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);  // counted before the group hears of it
      ++jobs_done_;
      bytes_done_ += bytes;
    }
    {
      std::lock_guard<std::mutex> g(job.group->mu_);
      if (err && !job.group->error_) job.group->error_ = err;
      --job.group->pending_;
    }
    job.group->cv_.notify_all();
    job = Job{};  // drop the group and the completion's captures before reporting idle
    {
      std::lock_guard<std::mutex> lk(mu_);
      busy_ = false;
    }
    idle_cv_.notify_all();
  }
}

void CopyEngine::run(const CopySpan* spans, size_t n) {
  const CopyKernel k = resolve_kernel(kernel_, total_of(spans, n));
  if (threads_ > 1) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      start_locked();
    }
    parallel_copy(spans, n, k);
  } else {
    copy_resolved(spans, n, k);
  }
}

void CopyEngine::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  idle_cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

uint64_t CopyEngine::jobs_done() const {
  std::lock_guard<std::mutex> lk(mu_);
  return jobs_done_;
}

uint64_t CopyEngine::bytes_done() const {
  std::lock_guard<std::mutex> lk(mu_);
  return bytes_done_;
}

void CopyEngine::parallel_copy(const CopySpan* spans, size_t n, CopyKernel k) {
  const uint64_t total = total_of(spans, n);
  // Splitting pays only for large batches; below 1 MiB per thread one thread copies.
  if (threads_ == 1 || total < (uint64_t(threads_) << 20)) {
    copy_resolved(spans, n, k);
    return;
  }
  std::lock_guard<std::mutex> one(par_mu_);
  // Cut the batch into threads_ parts of about equal bytes, splitting spans at 4 KiB boundaries.
  std::vector<std::vector<CopySpan>> parts(threads_);
  const uint64_t share = (total / threads_ + 4095) & ~uint64_t(4095);
  unsigned p = 0;
  uint64_t in_part = 0;
  for (size_t i = 0; i < n; ++i) {
    CopySpan s = spans[i];
    while (s.bytes) {
      uint64_t room = p + 1 == threads_ ? s.bytes : share - in_part;
      uint64_t take = std::min(room, s.bytes);
      parts[p].push_back({s.dst, s.src, take});
      s.dst += take;
      s.src += take;
      s.bytes -= take;
      in_part += take;
      if (in_part >= share && p + 1 < threads_) {
        ++p;
        in_part = 0;
      }
    }
  }
  {
    std::lock_guard<std::mutex> lk(part_mu_);
    parts_ = std::move(parts);
    part_kernel_ = k;
    parts_left_ = threads_ - 1;
    ++part_seq_;
  }
  part_cv_.notify_all();
  copy_resolved(parts_[0].data(), parts_[0].size(), k);
  std::unique_lock<std::mutex> lk(part_mu_);
  part_done_cv_.wait(lk, [&] { return parts_left_ == 0; });
}

void CopyEngine::helper(unsigned id) {
  uint64_t seen = 0;
  for (;;) {
    std::vector<CopySpan>* mine;
    CopyKernel k;
    {
      std::unique_lock<std::mutex> lk(part_mu_);
      part_cv_.wait(lk, [&] { return part_seq_ != seen; });
      seen = part_seq_;
      {
        std::lock_guard<std::mutex> s(mu_);
        if (stopping_) return;
      }
      mine = &parts_[id];
      k = part_kernel_;
    }
    copy_resolved(mine->data(), mine->size(), k);
    {
      std::lock_guard<std::mutex> lk(part_mu_);
      --parts_left_;
    }
    part_done_cv_.notify_all();
  }
}

}  // namespace pykvshm
