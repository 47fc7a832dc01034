// Errors raised by the core.  Each code maps to one exception class of
// pykvshm.errors (see cpp/bindings/module.cpp); messages name the problem.
#pragma once

#include <stdexcept>
#include <string>

namespace pykvshm {

enum class ErrorCode {
  kPool,            // PoolError: anything else
  kExists,          // PoolExistsError
  kNotFound,        // PoolNotFoundError
  kFull,            // PoolFullError
  kLayoutMismatch,  // LayoutMismatchError: other layout version
  kGeometry,        // GeometryMismatchError: other KV geometry
  kCorrupt,         // CorruptPoolError: foreign, truncated or damaged
  kInitializing,    // PoolInitializingError: creator has not finished
  kInvalidName,     // InvalidNameError
  kInvalidHandle,   // InvalidHandleError: out of range / foreign / not owned
  kStaleHandle,     // StaleHandleError: generation moved on
  kDoubleFree,      // DoubleFreeError
  kMembersFull,     // MembersFullError
  kPlacement,       // PlacementError: NUMA node / huge pages unavailable
  kChecksum,        // ChecksumError: block bytes do not match their checksum
  kClosed,          // PoolClosedError
  kForked,          // ForkedHandleError
  kMemberLost,      // MemberLostError: this handle was declared dead and recovered
  kTimeout,         // TransferTimeoutError: a transfer wait ran out of time
  kAborted,         // TransferAbortedError: the transfer was aborted (by a side, or its producer died)
  kGone,            // TransferGoneError: no such transfer, or its channel was reused
  kReadOnly,        // ReadOnlyPoolError: a change asked of a read-only (monitoring) handle
  kUntrusted,       // UntrustedPoolError: owned by another user, or writable by group/others
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] inline void raise(ErrorCode code, const std::string& what) { throw Error(code, what); }

// The pykvshm.errors class each code is raised as in Python (also used by the C++ tests).
inline const char* error_class_name(ErrorCode c) noexcept {
  switch (c) {
    case ErrorCode::kPool: return "PoolError";
    case ErrorCode::kExists: return "PoolExistsError";
    case ErrorCode::kNotFound: return "PoolNotFoundError";
    case ErrorCode::kFull: return "PoolFullError";
    case ErrorCode::kLayoutMismatch: return "LayoutMismatchError";
    case ErrorCode::kGeometry: return "GeometryMismatchError";
    case ErrorCode::kCorrupt: return "CorruptPoolError";
    case ErrorCode::kInitializing: return "PoolInitializingError";
    case ErrorCode::kInvalidName: return "InvalidNameError";
    case ErrorCode::kInvalidHandle: return "InvalidHandleError";
    case ErrorCode::kStaleHandle: return "StaleHandleError";
    case ErrorCode::kDoubleFree: return "DoubleFreeError";
    case ErrorCode::kMembersFull: return "MembersFullError";
    case ErrorCode::kPlacement: return "PlacementError";
    case ErrorCode::kChecksum: return "ChecksumError";
    case ErrorCode::kClosed: return "PoolClosedError";
    case ErrorCode::kForked: return "ForkedHandleError";
    case ErrorCode::kMemberLost: return "MemberLostError";
    case ErrorCode::kTimeout: return "TransferTimeoutError";
    case ErrorCode::kAborted: return "TransferAbortedError";
    case ErrorCode::kGone: return "TransferGoneError";
    case ErrorCode::kReadOnly: return "ReadOnlyPoolError";
    case ErrorCode::kUntrusted: return "UntrustedPoolError";
  }
  return "PoolError";
}

}  // namespace pykvshm
