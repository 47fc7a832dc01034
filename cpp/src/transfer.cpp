// Layer-wise transfers: a producer streams a request's KV into pool blocks one
// layer at a time; consumers in other processes wait for each layer on a futex
// in the pool and copy it out while later layers are still being computed.
//
// A channel holds the request's block handles.  Blocks already in the pool are
// pinned by the producer ("cached"); the others are allocated WRITING, filled
// layer by layer, and sealed into the prefix index by finish().  Consumers read
// blocks that are still being written, so every copy is validated afterwards
// (seqlock style): the channel epoch and every block generation must be
// unchanged, else the copy is discarded with an error.  docs/design/transfer.md.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "pykvshm/crc32c.h"
#include "pykvshm/pool.h"
#include "pykvshm/visibility.h"

namespace pykvshm {

using namespace layout;

namespace {

constexpr uint64_t chan_ctl(uint64_t status, uint32_t epoch, uint32_t owner) {
  return (status << 61) | (uint64_t(epoch & 0x1fffffffu) << 32) | (uint64_t(owner & 0xffffu) << 16);
}
constexpr uint64_t chan_status(uint64_t c) { return c >> 61; }
constexpr uint32_t chan_epoch(uint64_t c) { return uint32_t((c >> 32) & 0x1fffffffu); }
constexpr uint32_t chan_owner(uint64_t c) { return uint32_t((c >> 16) & 0xffffu); }

uint64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000ull + uint64_t(ts.tv_nsec);
}

// Sleep until *word != expected, a wake-up, or `ns` passes.  Shared (not
// private) futex: the word lives in a MAP_SHARED mapping of several processes.
void futex_wait(Atomic32& word, uint32_t expected, uint64_t ns) {
  timespec ts{};
  ts.tv_sec = time_t(ns / 1'000'000'000ull);
  ts.tv_nsec = long(ns % 1'000'000'000ull);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

inline uint64_t channel_handle(uint32_t gen, uint64_t index, bool cached) {
  return (uint64_t(gen) << 32) | (cached ? kHandleCached : 0) | (index & 0x7fffffffu);
}
inline uint64_t ch_index(uint64_t h) { return h & 0x7fffffffu; }
inline uint32_t ch_gen(uint64_t h) { return uint32_t(h >> 32); }
inline bool ch_cached(uint64_t h) { return (h & kHandleCached) != 0; }

[[noreturn]] void raise_out_of_order(uint32_t next, uint32_t layer) {
  raise(ErrorCode::kInvalidHandle, "layers must be put in order: layer " + std::to_string(next) + " is next, not layer " +
                                       std::to_string(layer));
}

constexpr uint64_t kLingerNs = 200'000'000ull;  // a finished channel is kept this long before reuse if others are free

}  // namespace

void Pool::wake(Atomic32& word) const noexcept {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

Channel& Pool::owned_channel(TransferRef t, uint64_t status) const {
  if (t.channel >= kTransferChannels) raise(ErrorCode::kInvalidHandle, "transfer channel out of range");
  Channel& ch = channel(t.channel);
  uint64_t c = ch.ctl.load(std::memory_order_acquire);
  if (chan_epoch(c) != t.epoch || chan_owner(c) != slot_ || chan_status(c) != status) {
    if (chan_epoch(c) == t.epoch && chan_status(c) == kChanAborted)
      raise(ErrorCode::kAborted, "the transfer was aborted");
    raise(ErrorCode::kGone, "the transfer is no longer open by this pool handle");
  }
  return ch;
}

Channel& Pool::attached_channel(TransferRef t) const {
  if (t.channel >= kTransferChannels) raise(ErrorCode::kInvalidHandle, "transfer channel out of range");
  Channel& ch = channel(t.channel);  // invalidated in noncoherent mode
  uint64_t c = ch.ctl.load(std::memory_order_acquire);
  if (chan_epoch(c) != t.epoch || chan_status(c) < kChanOpen)
    raise(ErrorCode::kGone, "the transfer's channel was reused: it finished long ago (use acquire() on its keys)");
  return ch;
}

Pool::TransferRef Pool::transfer_open(const uint8_t req_key[16], const uint8_t* keys, size_t n) {
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  if (n == 0) raise(ErrorCode::kInvalidHandle, "a transfer needs at least one block key");
  if (n > transfer_max_)
    raise(ErrorCode::kFull, "a transfer of " + std::to_string(n) + " blocks exceeds this pool's limit of " +
                                std::to_string(transfer_max_) + " blocks per transfer");
  uint64_t r0, r1, f0, f1;
  std::memcpy(&r0, req_key, 8);
  std::memcpy(&r1, req_key + 8, 8);
  std::memcpy(&f0, keys, 8);
  std::memcpy(&f1, keys + 8, 8);
  // One open transfer per request id.
  for (uint32_t c = 0; c < kTransferChannels; ++c) {
    Channel& ch = channel(c);
    uint64_t s = chan_status(ch.ctl.load(std::memory_order_acquire));
    if ((s == kChanFilling || s == kChanOpen) && ch.req_key[0].load(std::memory_order_relaxed) == r0 &&
        ch.req_key[1].load(std::memory_order_relaxed) == r1)
      raise(ErrorCode::kExists, "a transfer for this request id is already open");
  }
  // Claim a free channel; else a finished one past its linger time; else the
  // finished one that ended first.  A consumer of a reused channel gets
  // TransferGoneError (the finished transfer's blocks are in the prefix index).
  const uint64_t now = realtime_ns();
  TransferRef t{};
  bool claimed = false;
  for (int pass = 0; pass < 3 && !claimed; ++pass) {
    uint32_t oldest = kTransferChannels;
    uint64_t oldest_done = UINT64_MAX;
    if (pass == 2) {
      for (uint32_t c = 0; c < kTransferChannels; ++c) {
        Channel& ch = channel(c);
        uint64_t s = chan_status(ch.ctl.load(std::memory_order_acquire));
        uint64_t done = ch.done_ns.load(std::memory_order_relaxed);
        if ((s == kChanDone || s == kChanAborted) && done < oldest_done) {
          oldest = c;
          oldest_done = done;
        }
      }
    }
    for (uint32_t c = 0; c < kTransferChannels && !claimed; ++c) {
      Channel& ch = channel(c);
      uint64_t cur = ch.ctl.load(std::memory_order_acquire);
      uint64_t s = chan_status(cur);
      bool reusable = s == kChanFree;
      if (!reusable && pass >= 1 && (s == kChanDone || s == kChanAborted)) {
        uint64_t done = ch.done_ns.load(std::memory_order_relaxed);
        reusable = pass == 1 ? (now > done && now - done > kLingerNs) : c == oldest;
      }
      if (!reusable) continue;
      uint32_t epoch = chan_epoch(cur) + 1;
      if (ch.ctl.cas(cur, chan_ctl(kChanFilling, epoch, slot_), std::memory_order_acq_rel)) {
        t = {c, epoch & 0x1fffffffu};
        claimed = true;
      }
    }
  }
  if (!claimed)
    raise(ErrorCode::kFull, "all " + std::to_string(kTransferChannels) + " transfer channels are open");
  Channel& ch = channel(t.channel);
  Atomic64* hs = channel_handles(t.channel);
  std::vector<uint64_t> fresh_blocks;
  size_t cached = 0;
  try {
    // Blocks already in the pool are pinned for the consumers; the rest are allocated.
    std::vector<size_t> missing;
    Found f;
    for (size_t i = 0; i < n; ++i) {
      uint64_t k0, k1;
      std::memcpy(&k0, keys + 16 * i, 8);
      std::memcpy(&k1, keys + 16 * i + 8, 8);
      if (lookup(k0, k1, true, &f) && pin(f.index, f.gen, k0, k1)) {
        hs[i].store(channel_handle(f.gen, f.index, true), std::memory_order_relaxed);
        ++cached;
      } else {
        missing.push_back(i);
      }
    }
    fresh_blocks.resize(missing.size());
    if (!missing.empty()) alloc(missing.size(), true, fresh_blocks.data());
    for (size_t j = 0; j < missing.size(); ++j) {
      const size_t i = missing[j];
      const uint64_t bi = word::handle_index(fresh_blocks[j]);
      uint64_t k0, k1;
      std::memcpy(&k0, keys + 16 * i, 8);
      std::memcpy(&k1, keys + 16 * i + 8, 8);
      desc(bi).key[0].store(k0, std::memory_order_relaxed);
      desc(bi).key[1].store(k1, std::memory_order_relaxed);
      desc(bi).crc.store(0, std::memory_order_relaxed);
      flush(&desc(bi), sizeof(BlockDesc));
      hs[i].store(channel_handle(word::handle_gen(fresh_blocks[j]), bi, false), std::memory_order_relaxed);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lk(pin_mu_);
    for (size_t i = 0; i < n; ++i) {
      uint64_t h = hs[i].load(std::memory_order_relaxed);
      if (ch_cached(h)) unpin(ch_index(h));
    }
    uint64_t c = chan_ctl(kChanFilling, t.epoch, slot_);
    ch.ctl.cas(c, chan_ctl(kChanFree, t.epoch, 0), std::memory_order_release);
    flush(&ch.ctl, 8);
    throw;
  }
  ch.req_key[0].store(r0, std::memory_order_relaxed);
  ch.req_key[1].store(r1, std::memory_order_relaxed);
  ch.first_key[0].store(f0, std::memory_order_relaxed);
  ch.first_key[1].store(f1, std::memory_order_relaxed);
  ch.num_blocks.store(uint32_t(n), std::memory_order_relaxed);
  ch.num_layers.store(geo_.num_layers, std::memory_order_relaxed);
  ch.open_ns.store(now, std::memory_order_relaxed);
  ch.done_ns.store(0, std::memory_order_relaxed);
  ch.ready.store(0, std::memory_order_relaxed);
  flush(&ch, sizeof(Channel) + 8 * n);
  // SYNC POINT: channel-open.  Keys and handles happen-before a consumer that sees OPEN.
  uint64_t c = chan_ctl(kChanFilling, t.epoch, slot_);
  ch.ctl.cas(c, chan_ctl(kChanOpen, t.epoch, slot_), std::memory_order_release);
  flush(&ch.ctl, 8);
  Control* ctrl = ctl();
  ctrl->channel_event.seq.fetch_add(1, std::memory_order_seq_cst);
  if (ctrl->channel_event.waiters.load(std::memory_order_seq_cst)) wake(ctrl->channel_event.seq);
  add_counter(kCtrHits, cached);
  add_counter(kCtrMisses, n - cached);
  return t;
}

std::vector<CopySpan> Pool::put_layer_spans(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride,
                                             bool check_order) {
  const uint64_t layer_bytes = geo_.block_bytes / geo_.num_layers;
  std::vector<CopySpan> spans;
  Exclusive ex(this);
  ensure_usable();
  heartbeat();
  Channel& ch = owned_channel(t, kChanOpen);
  const uint32_t ready = ch.ready.load(std::memory_order_acquire);
  if (ready & kReadyAborted) raise(ErrorCode::kAborted, "a consumer aborted the transfer");
  if (layer >= geo_.num_layers)
    raise(ErrorCode::kInvalidHandle, "layer " + std::to_string(layer) + " is out of range for a " +
                                         std::to_string(geo_.num_layers) + "-layer pool");
  if (check_order && layer != (ready & kReadyCount)) raise_out_of_order(ready & kReadyCount, layer);
  const std::vector<uint64_t> handles = channel_handle_list(t, ch);
  spans.reserve(handles.size());
  for (size_t j = 0; j < handles.size(); ++j) {
    const uint64_t h = handles[j];
    if (ch_cached(h)) continue;
    uint8_t* dst = block_data(ch_index(h)) + uint64_t(layer) * layer_bytes;
    // No source (the producer wrote the slot in place) or a source that is the
    // slot itself: nothing to copy, the layer is only marked ready.
    spans.push_back({dst, src ? src + uint64_t(j) * src_stride : dst, layer_bytes});
  }
  return spans;
}

void Pool::mark_layer_put(TransferRef t, uint32_t layer, const CopySpan* spans, size_t n) {
  // The bytes were written (by memcpy, non-temporal stores fenced by the kernel,
  // or the producer in place) outside the lock: the blocks are ours, WRITING.
  uint64_t copied = 0;
  for (size_t j = 0; j < n; ++j) {
    flush(spans[j].dst, spans[j].bytes);
    if (spans[j].dst != spans[j].src) copied += spans[j].bytes;
  }
  Exclusive ex(this);
  ensure_usable();
  Channel& ch = owned_channel(t, kChanOpen);
  // SYNC POINT: layer-ready.  The layer's bytes happen-before a consumer that
  // reads ready > layer with acquire.
  uint32_t expect = layer;
  if (!ch.ready.cas(expect, layer + 1, std::memory_order_seq_cst)) {
    if (expect & kReadyAborted) raise(ErrorCode::kAborted, "a consumer aborted the transfer");
    if ((expect & kReadyCount) != layer) raise_out_of_order(expect & kReadyCount, layer);
    raise(ErrorCode::kCorrupt, "transfer channel changed under its producer");
  }
  flush(&ch.ready, 4);
  add_counter(kCtrBytesIn, copied);
  if (ch.waiters.load(std::memory_order_seq_cst)) wake(ch.ready);
}

void Pool::transfer_mark_layers(TransferRef t, uint32_t first, uint32_t count) {
  if (count == 0) return;
  if (uint64_t(first) + count > geo_.num_layers)
    raise(ErrorCode::kInvalidHandle, "layers " + std::to_string(first) + ".." + std::to_string(first + count - 1) +
                                         " are out of range for a " + std::to_string(geo_.num_layers) + "-layer pool");
  // The slots were written in place: write them back (noncoherent), then one ready
  // update and one wake for the whole range.  A block's layer slots lie back to back,
  // so layer `first`'s slot of each block extends over the whole range.
  const std::vector<CopySpan> spans = put_layer_spans(t, first, nullptr, 0, true);
  for (const CopySpan& s : spans) flush(s.dst, s.bytes * count);
  Exclusive ex(this);
  ensure_usable();
  Channel& ch = owned_channel(t, kChanOpen);
  // SYNC POINT: layer-ready (as in mark_layer_put).
  uint32_t expect = first;
  if (!ch.ready.cas(expect, first + count, std::memory_order_seq_cst)) {
    if (expect & kReadyAborted) raise(ErrorCode::kAborted, "a consumer aborted the transfer");
    raise_out_of_order(expect & kReadyCount, first);
  }
  flush(&ch.ready, 4);
  if (ch.waiters.load(std::memory_order_seq_cst)) wake(ch.ready);
}

void Pool::transfer_put_layer(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride) {
  std::vector<CopySpan> spans = put_layer_spans(t, layer, src, src_stride, true);
  copy_engine().run(spans.data(), spans.size());
  mark_layer_put(t, layer, spans.data(), spans.size());
}

void Pool::transfer_put_layer_async(TransferRef t, uint32_t layer, const uint8_t* src, uint64_t src_stride,
                                    const std::shared_ptr<CopyGroup>& group) {
  // Order is checked when the job runs (earlier layers may still be queued).
  std::vector<CopySpan> spans = put_layer_spans(t, layer, src, src_stride, false);
  auto shared = std::make_shared<std::vector<CopySpan>>(spans);
  copy_engine().submit(group, std::move(spans), [this, t, layer, shared] {
    mark_layer_put(t, layer, shared->data(), shared->size());
  });
}

std::vector<uint64_t> Pool::channel_handle_list(TransferRef t, Channel& ch) const {
  const uint32_t n = ch.num_blocks.load(std::memory_order_relaxed);
  if (n > transfer_max_) raise(ErrorCode::kCorrupt, "transfer channel holds an invalid block count");
  Atomic64* hs = channel_handles(t.channel);
  fresh(hs, 8ull * n);
  std::vector<uint64_t> handles(n);
  for (uint32_t j = 0; j < n; ++j) {
    handles[j] = hs[j].load(std::memory_order_relaxed);
    if (ch_index(handles[j]) >= nblocks_) raise(ErrorCode::kCorrupt, "transfer channel names a block outside the pool");
  }
  return handles;
}

std::vector<uint8_t*> Pool::transfer_slots(TransferRef t, uint32_t layer, bool writable) {
  const uint64_t layer_bytes = geo_.block_bytes / geo_.num_layers;
  if (layer >= geo_.num_layers) raise(ErrorCode::kInvalidHandle, "layer " + std::to_string(layer) + " is out of range");
  Exclusive ex(this);
  ensure_usable();
  Channel& ch = writable ? owned_channel(t, kChanOpen) : attached_channel(t);
  const std::vector<uint64_t> handles = channel_handle_list(t, ch);
  std::vector<uint8_t*> out(handles.size());
  for (size_t j = 0; j < handles.size(); ++j) {
    const uint64_t h = handles[j];
    // A producer gets no slot of a cached block: it is sealed and shared.
    out[j] = (writable && ch_cached(h)) ? nullptr : block_data(ch_index(h)) + uint64_t(layer) * layer_bytes;
  }
  return out;
}

void Pool::transfer_validate(TransferRef t, uint32_t layer) {
  ensure_usable();
  Channel& ch = attached_channel(t);
  const std::vector<uint64_t> handles = channel_handle_list(t, ch);
  const auto n = uint32_t(handles.size());
  check_not_reused(t, ch, handles.data(), n, ("its layer " + std::to_string(layer) + " was read in place").c_str());
  const uint64_t layer_bytes = geo_.block_bytes / geo_.num_layers;
  add_counter(kCtrBytesOut, uint64_t(n) * layer_bytes);
}

void Pool::transfer_finish(TransferRef t) {
  Exclusive ex(this);
  ensure_usable();
  Channel& ch = owned_channel(t, kChanOpen);
  uint32_t ready = ch.ready.load(std::memory_order_acquire);
  if (ready & kReadyAborted) raise(ErrorCode::kAborted, "a consumer aborted the transfer");
  if ((ready & kReadyCount) != geo_.num_layers)
    raise(ErrorCode::kInvalidHandle, "finish: only " + std::to_string(ready & kReadyCount) + " of " +
                                         std::to_string(geo_.num_layers) + " layers were put");
  const uint32_t n = ch.num_blocks.load(std::memory_order_relaxed);
  Atomic64* hs = channel_handles(t.channel);
  uint64_t sealed = 0;
  for (uint32_t j = 0; j < n; ++j) {
    uint64_t h = hs[j].load(std::memory_order_relaxed);
    if (ch_cached(h)) continue;
    const uint64_t i = ch_index(h);
    const uint32_t g = ch_gen(h);
    const uint64_t k0 = desc(i).key[0].load(std::memory_order_relaxed);
    const uint64_t k1 = desc(i).key[1].load(std::memory_order_relaxed);
    if (checksums_) desc(i).crc.store(crc32c(block_data(i), geo_.block_bytes), std::memory_order_relaxed);
    flush(&desc(i), sizeof(BlockDesc));
    if (insert(k0, k1, i, g) == Insert::kInserted) {
      uint64_t s = word::state(g, kWriting, slot_);
      // SYNC POINT: block-seal (as in commit()).
      if (!state(i).cas(s, word::state(g, kSealed, 0), std::memory_order_release))
        raise(ErrorCode::kCorrupt, "transfer finish: block " + std::to_string(i) + " changed state under its writer");
      flush(&state(i), 8);
      ++sealed;
    } else {
      // Someone stored this key meanwhile: our copy is redundant.  Its generation
      // does not change, so consumers still reading it see valid bytes.
      uint64_t s = word::state(g, kWriting, slot_);
      write_back_block(i);
      if (state(i).cas(s, word::state(g, kFree, 0), std::memory_order_release)) {
        flush(&state(i), 8);
        hint_word(shards_.block_shard(i)).fetch_add(1, std::memory_order_relaxed);
      }
      add_counter(kCtrDuplicates, 1);
    }
  }
  add_counter(kCtrPublished, sealed);
  ch.done_ns.store(realtime_ns(), std::memory_order_relaxed);
  ch.ready.fetch_or(kReadyDone, std::memory_order_release);
  uint64_t c = chan_ctl(kChanOpen, t.epoch, slot_);
  ch.ctl.cas(c, chan_ctl(kChanDone, t.epoch, slot_), std::memory_order_release);
  flush(&ch, sizeof(Channel));
  wake(ch.ready);
  std::lock_guard<std::mutex> lk(pin_mu_);
  for (uint32_t j = 0; j < n; ++j) {
    uint64_t h = hs[j].load(std::memory_order_relaxed);
    if (ch_cached(h)) unpin(ch_index(h));
  }
}

void Pool::transfer_abort(TransferRef t) {
  Exclusive ex(this);
  ensure_usable();
  if (t.channel >= kTransferChannels) raise(ErrorCode::kInvalidHandle, "transfer channel out of range");
  Channel& ch = channel(t.channel);
  uint64_t c = ch.ctl.load(std::memory_order_acquire);
  if (chan_epoch(c) != t.epoch) return;  // long gone
  if (chan_owner(c) != slot_ || (chan_status(c) != kChanOpen && chan_status(c) != kChanFilling)) {
    // A consumer (or a producer whose transfer already ended): raise the flag the producer checks.
    if (chan_status(c) == kChanOpen) {
      ch.ready.fetch_or(kReadyAborted, std::memory_order_acq_rel);
      flush(&ch.ready, 4);
      wake(ch.ready);
    }
    return;
  }
  const uint32_t n = ch.num_blocks.load(std::memory_order_relaxed);
  Atomic64* hs = channel_handles(t.channel);
  // Mark aborted first so consumers stop; then free what we wrote.
  ch.ready.fetch_or(kReadyAborted, std::memory_order_acq_rel);
  ch.done_ns.store(realtime_ns(), std::memory_order_relaxed);
  ch.ctl.cas(c, chan_ctl(kChanAborted, t.epoch, slot_), std::memory_order_acq_rel);
  flush(&ch, sizeof(Channel));
  wake(ch.ready);
  std::lock_guard<std::mutex> lk(pin_mu_);
  for (uint32_t j = 0; j < n; ++j) {
    uint64_t h = hs[j].load(std::memory_order_relaxed);
    const uint64_t i = ch_index(h);
    if (i >= nblocks_) continue;
    if (ch_cached(h)) {
      unpin(i);
      continue;
    }
    uint64_t s = word::state(ch_gen(h), kWriting, slot_);
    write_back_block(i);
    if (state(i).cas(s, word::state(ch_gen(h), kFree, 0), std::memory_order_release)) {
      flush(&state(i), 8);
      hint_word(shards_.block_shard(i)).fetch_add(1, std::memory_order_relaxed);
    }
  }
}

void Pool::abort_channels_of(const std::vector<bool>& mask) {
  // Recovery of dead producers (and close()): their open transfers can never
  // finish.  Mark them aborted and wake the consumers; the blocks and pins are
  // reclaimed by the member recovery itself.
  for (uint32_t c = 0; c < kTransferChannels; ++c) {
    Channel& ch = channel(c);
    uint64_t cur = ch.ctl.load(std::memory_order_acquire);
    uint64_t s = chan_status(cur);
    if (s != kChanOpen && s != kChanFilling) continue;
    uint32_t o = chan_owner(cur);
    if (o >= max_members_ || !mask[o]) continue;
    ch.ready.fetch_or(kReadyAborted, std::memory_order_acq_rel);
    ch.done_ns.store(realtime_ns(), std::memory_order_relaxed);
    ch.ctl.cas(cur, chan_ctl(kChanAborted, chan_epoch(cur), o), std::memory_order_acq_rel);
    flush(&ch, sizeof(Channel));
    wake(ch.ready);
  }
}

Pool::TransferRef Pool::transfer_attach(const uint8_t req_key[16], const uint8_t* first_key, uint32_t n,
                                         uint64_t timeout_ns) {
  ensure_usable();
  uint64_t r0 = 0, r1 = 0, f0 = 0, f1 = 0;
  if (req_key) {
    std::memcpy(&r0, req_key, 8);
    std::memcpy(&r1, req_key + 8, 8);
  }
  if (first_key) {
    std::memcpy(&f0, first_key, 8);
    std::memcpy(&f1, first_key + 8, 8);
  }
  const uint64_t deadline = monotonic_ns() + timeout_ns;
  Control* ctrl = ctl();
  for (;;) {
    uint32_t seq = ctrl->channel_event.seq.load(std::memory_order_acquire);
    // The newest matching channel wins (two requests may share their first block).
    TransferRef best{};
    uint64_t best_open = 0;
    bool found = false;
    for (uint32_t c = 0; c < kTransferChannels; ++c) {
      Channel& ch = channel(c);  // invalidated in noncoherent mode: this scan takes no lock
      uint64_t cur = ch.ctl.load(std::memory_order_acquire);
      if (chan_status(cur) < kChanOpen) continue;
      bool match = req_key ? (ch.req_key[0].load(std::memory_order_relaxed) == r0 &&
                              ch.req_key[1].load(std::memory_order_relaxed) == r1)
                           : (ch.first_key[0].load(std::memory_order_relaxed) == f0 &&
                              ch.first_key[1].load(std::memory_order_relaxed) == f1 &&
                              ch.num_blocks.load(std::memory_order_relaxed) == n);
      uint64_t opened = ch.open_ns.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (ch.ctl.load(std::memory_order_relaxed) != cur || !match) continue;
      if (!found || opened > best_open) {
        best = {c, chan_epoch(cur)};
        best_open = opened;
        found = true;
      }
    }
    if (found) return best;
    if (calls_.is_shut()) raise(ErrorCode::kClosed, "the pool handle was closed while waiting for a transfer");
    uint64_t now = monotonic_ns();
    if (now >= deadline) raise(ErrorCode::kGone, "no transfer with that request id or keys appeared in time");
    uint64_t slice = std::min<uint64_t>(deadline - now, 50'000'000ull);
    if (coherence_ == Coherence::kNoncoherent) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    ctrl->channel_event.waiters.fetch_add(1, std::memory_order_seq_cst);
    if (ctrl->channel_event.seq.load(std::memory_order_seq_cst) == seq) futex_wait(ctrl->channel_event.seq, seq, slice);
    ctrl->channel_event.waiters.fetch_sub(1, std::memory_order_relaxed);
    heartbeat();
  }
}

Pool::TransferInfo Pool::transfer_info(TransferRef t) const {
  Exclusive ex(this);
  ensure_open();
  Channel& ch = attached_channel(t);
  TransferInfo info;
  info.num_blocks = ch.num_blocks.load(std::memory_order_relaxed);
  info.num_layers = ch.num_layers.load(std::memory_order_relaxed);
  info.ready = ch.ready.load(std::memory_order_acquire);
  info.status = chan_status(ch.ctl.load(std::memory_order_acquire));
  if (info.num_blocks > transfer_max_) raise(ErrorCode::kCorrupt, "transfer channel holds an invalid block count");
  Atomic64* hs = channel_handles(t.channel);
  fresh(hs, 8ull * info.num_blocks);
  for (uint32_t j = 0; j < info.num_blocks; ++j)
    if (ch_cached(hs[j].load(std::memory_order_relaxed))) ++info.cached;
  return info;
}

void Pool::transfer_wait(TransferRef t, uint32_t layer, uint64_t timeout_ns) {
  ensure_usable();
  const uint64_t deadline = monotonic_ns() + timeout_ns;
  uint64_t backoff_us = 20;
  uint64_t last_liveness = monotonic_ns();
  for (;;) {
    Channel& ch = attached_channel(t);
    uint32_t v = ch.ready.load(std::memory_order_acquire);
    if (v & kReadyAborted) raise(ErrorCode::kAborted, "the transfer was aborted");
    if ((v & kReadyCount) > layer || (v & kReadyDone)) return;
    if (calls_.is_shut()) raise(ErrorCode::kClosed, "the pool handle was closed while waiting for a transfer");
    uint64_t now = monotonic_ns();
    if (now >= deadline)
      raise(ErrorCode::kTimeout, "timed out waiting for layer " + std::to_string(layer) + " (" +
                                     std::to_string(v & kReadyCount) + " layers ready)");
    // A producer that died cannot wake us: check its liveness now and then and
    // recover it, which aborts the channel.
    if (now - last_liveness > 100'000'000ull) {
      last_liveness = now;
      uint64_t c = ch.ctl.load(std::memory_order_acquire);
      uint32_t o = chan_owner(c);
      {
        Exclusive ex(this);
        if (o < max_members_ && member_dead(o, member(o)->ctl.load(std::memory_order_acquire))) do_recover();
      }
      heartbeat();
      continue;
    }
    uint64_t slice = std::min<uint64_t>(deadline - now, 100'000'000ull);
    if (coherence_ == Coherence::kNoncoherent) {
      // No cross-host futex: poll with a bounded backoff.
      std::this_thread::sleep_for(std::chrono::microseconds(std::min<uint64_t>(backoff_us, slice / 1000 + 1)));
      backoff_us = std::min<uint64_t>(backoff_us * 2, 1000);
      continue;
    }
    // A layer is often only microseconds away (the producer is copying it): spin briefly
    // before sleeping, so a handoff does not pay a futex wake-up and a reschedule per layer.
    {
      const uint64_t spin_until = monotonic_ns() + 20'000;
      bool moved = false;
      while (monotonic_ns() < spin_until) {
        if (ch.ready.load(std::memory_order_acquire) != v) {
          moved = true;
          break;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
      if (moved) continue;
    }
    ch.waiters.fetch_add(1, std::memory_order_seq_cst);
    if (ch.ready.load(std::memory_order_seq_cst) == v) futex_wait(ch.ready, v, slice);
    ch.waiters.fetch_sub(1, std::memory_order_relaxed);
  }
}

void Pool::transfer_copy_layer(TransferRef t, uint32_t layer, uint8_t* dst, uint64_t dst_stride) {
  ensure_usable();
  if (layer >= geo_.num_layers) raise(ErrorCode::kInvalidHandle, "layer " + std::to_string(layer) + " is out of range");
  Channel& ch = attached_channel(t);
  uint32_t v = ch.ready.load(std::memory_order_acquire);
  if (v & kReadyAborted) raise(ErrorCode::kAborted, "the transfer was aborted");
  if ((v & kReadyCount) <= layer && !(v & kReadyDone))
    raise(ErrorCode::kInvalidHandle, "layer " + std::to_string(layer) + " is not ready yet; wait for it first");
  const uint64_t layer_bytes = geo_.block_bytes / geo_.num_layers;
  // No lock: the handles, the bytes and the generations are read after
  // invalidating them, and the generations validate the copy (seqlock style).
  const std::vector<uint64_t> handles = channel_handle_list(t, ch);
  const auto n = uint32_t(handles.size());
  std::vector<CopySpan> spans(n);
  for (uint32_t j = 0; j < n; ++j) {
    const uint8_t* src = block_data(ch_index(handles[j])) + uint64_t(layer) * layer_bytes;
    fresh(src, layer_bytes);
    spans[j] = {dst + uint64_t(j) * dst_stride, src, layer_bytes};
  }
  copy_engine().run(spans.data(), spans.size());
  check_not_reused(t, ch, handles.data(), n, "it was read");
  add_counter(kCtrBytesOut, uint64_t(n) * layer_bytes);
}

void Pool::check_not_reused(TransferRef t, Channel& ch, const uint64_t* handles, uint32_t n, const char* when) const {
  // Seqlock-style validation: a block's generation changes only when it is reallocated, so an
  // unchanged generation (and channel epoch) means the bytes read were never rewritten.
  std::atomic_thread_fence(std::memory_order_acquire);
  for (uint32_t j = 0; j < n; ++j) {
    if (word::gen(state(ch_index(handles[j])).load(std::memory_order_relaxed)) != ch_gen(handles[j]))
      raise(ch.ready.load(std::memory_order_relaxed) & kReadyAborted ? ErrorCode::kAborted : ErrorCode::kGone,
            "block " + std::to_string(j) + " of the transfer was reused while " + when +
                " (the transfer ended; use acquire() on its keys)");
  }
  attached_channel(t);
}

}  // namespace pykvshm
