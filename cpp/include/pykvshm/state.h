// Encoding of the words that live in shared memory: block states, index entries,
// member control words.  Pure functions, no memory access.
#pragma once

#include <cstdint>

#include "pykvshm/layout.h"

namespace pykvshm::word {

// ---- block state: gen:32 | kind:3 | ref:1 | owner:28 ----
inline constexpr uint64_t kOwnerMask = (1ull << 28) - 1;
inline constexpr uint64_t kRefBit = 1ull << 28;

constexpr uint64_t state(uint32_t gen, uint64_t kind, uint64_t owner, bool ref = false) {
  return (uint64_t(gen) << 32) | ((kind & 7u) << 29) | (ref ? kRefBit : 0) | (owner & kOwnerMask);
}
constexpr uint32_t gen(uint64_t s) { return uint32_t(s >> 32); }
// Generations never wrap: a block freed at this generation is retired (never
// claimed again), so no (generation, index) handle is ever issued twice and a
// stale handle can never match a reused block (allocator.md).
inline constexpr uint32_t kGenLast = 0xffffffffu;
constexpr uint64_t kind(uint64_t s) { return (s >> 29) & 7u; }
constexpr bool ref(uint64_t s) { return (s & kRefBit) != 0; }
constexpr uint64_t owner(uint64_t s) { return s & kOwnerMask; }

// ---- block handle given to users: gen:32 | index:32 ----
constexpr uint64_t handle(uint32_t gen, uint64_t index) { return (uint64_t(gen) << 32) | (index & 0xffffffffu); }
constexpr uint32_t handle_gen(uint64_t h) { return uint32_t(h >> 32); }
constexpr uint64_t handle_index(uint64_t h) { return h & 0xffffffffu; }

// ---- index entry: 1 | fingerprint:15 | gen:20 | index:28 ----
inline constexpr uint64_t kEntryLive = 1ull << 63;
constexpr uint64_t entry(uint16_t fp, uint32_t gen, uint64_t index) {
  return kEntryLive | (uint64_t(fp & 0x7fffu) << 48) | (uint64_t(gen & 0xfffffu) << 28) | (index & kOwnerMask);
}
constexpr bool entry_live(uint64_t e) { return (e & kEntryLive) != 0; }
constexpr uint16_t entry_fp(uint64_t e) { return uint16_t((e >> 48) & 0x7fffu); }
constexpr uint32_t entry_gen(uint64_t e) { return uint32_t((e >> 28) & 0xfffffu); }
constexpr uint64_t entry_index(uint64_t e) { return e & kOwnerMask; }
constexpr bool entry_gen_matches(uint64_t e, uint32_t block_gen) { return entry_gen(e) == (block_gen & 0xfffffu); }

// ---- member ctl: status:2 | epoch:30 | payload:32 ----
constexpr uint64_t member(uint64_t status, uint32_t epoch, uint32_t payload) {
  return (status << 62) | (uint64_t(epoch & 0x3fffffffu) << 32) | payload;
}
constexpr uint64_t member_status(uint64_t c) { return c >> 62; }
constexpr uint32_t member_epoch(uint64_t c) { return uint32_t((c >> 32) & 0x3fffffffu); }
constexpr uint32_t member_payload(uint64_t c) { return uint32_t(c); }
constexpr uint32_t recoverer(uint32_t slot, uint32_t epoch) { return (slot << 16) | (epoch & 0xffffu); }
constexpr uint32_t recoverer_slot(uint32_t p) { return p >> 16; }
constexpr uint32_t recoverer_epoch(uint32_t p) { return p & 0xffffu; }

// ---- pins (recovery.md, "Pins") ----
// Descriptor pin word: count:16 | tag slot:16 | tag seq:32.  The tag names the
// last pin or unpin that changed the count (member slot, that member's op
// sequence number, never 0); seq 0 = no tag.
constexpr uint64_t pins(uint32_t count, uint32_t slot, uint32_t seq) {
  return (uint64_t(count & 0xffffu) << 48) | (uint64_t(slot & 0xffffu) << 32) | seq;
}
constexpr uint32_t pins_count(uint64_t p) { return uint32_t(p >> 48); }
constexpr uint32_t pins_slot(uint64_t p) { return uint32_t((p >> 32) & 0xffffu); }
constexpr uint32_t pins_seq(uint64_t p) { return uint32_t(p); }

// Pin journal (MemberSlot::pin_op): seq:32 | op:2 | landed:1 | record position:29.
// Written by the member (or its recoverer) before its count change; `landed` is
// set by whoever replaces that change's tag in the descriptor.
enum PinOp : uint64_t { kPinOpNone = 0, kPinOpPin = 1, kPinOpUnpin = 2 };
inline constexpr uint64_t kJournalLanded = 1ull << 29;
inline constexpr uint64_t kJournalPosMask = (1ull << 29) - 1;
constexpr uint64_t journal(uint32_t seq, uint64_t op, uint64_t pos, bool landed = false) {
  return (uint64_t(seq) << 32) | ((op & 3u) << 30) | (landed ? kJournalLanded : 0) | (pos & kJournalPosMask);
}
constexpr uint32_t journal_seq(uint64_t j) { return uint32_t(j >> 32); }
constexpr uint64_t journal_op(uint64_t j) { return (j >> 30) & 3u; }
constexpr bool journal_landed(uint64_t j) { return (j & kJournalLanded) != 0; }
constexpr uint64_t journal_pos(uint64_t j) { return j & kJournalPosMask; }

// Pin record: 0 = free, else live:1 | held:1 | 0:18 | slot:16 | block index:28.
// held = counted in the block's pin count for certain; a record not held is the
// one its member's journal names (counted iff that journal entry landed).
inline constexpr uint64_t kRecLive = 1ull << 63;
inline constexpr uint64_t kRecHeld = 1ull << 62;
constexpr uint64_t pin_rec(uint32_t slot, uint64_t index, bool held) {
  return kRecLive | (held ? kRecHeld : 0) | (uint64_t(slot & 0xffffu) << 28) | (index & kOwnerMask);
}
constexpr bool rec_live(uint64_t r) { return (r & kRecLive) != 0; }
constexpr bool rec_held(uint64_t r) { return (r & kRecHeld) != 0; }
constexpr uint32_t rec_slot(uint64_t r) { return uint32_t((r >> 28) & 0xffffu); }
constexpr uint64_t rec_index(uint64_t r) { return r & kOwnerMask; }
constexpr bool rec_valid(uint64_t r) { return r == 0 || (rec_live(r) && ((r >> 44) & 0x3ffffu) == 0); }

// ---- keys: hashing a 16-byte key into a table position and a fingerprint ----
constexpr uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27; x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
constexpr uint64_t key_hash(uint64_t k0, uint64_t k1) { return mix64(k0 ^ mix64(k1 + 0x9e3779b97f4a7c15ull)); }
constexpr uint16_t key_fp(uint64_t h) { return uint16_t((h >> 49) & 0x7fffu); }

}  // namespace pykvshm::word
