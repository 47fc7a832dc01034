// What the C++ test files share: the small geometry and EXPECT_CODE.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>

#include "pykvshm/errors.h"
#include "pykvshm/pool.h"

namespace pykvshm::testing {

// 2 layers x 2 kv heads x head_dim 8 x 4 tokens x fp16 = 512-byte blocks.
inline const GeometryIn kSmall{2, 2, 8, 4, 1, 2};
inline constexpr uint64_t kBlockBytes = 512;

inline const char* code_name(ErrorCode c) { return error_class_name(c); }

}  // namespace pykvshm::testing

// Runs `stmt`, which must throw pykvshm::Error with `code`.
#define EXPECT_CODE(stmt, want)                                                                        \
  do {                                                                                                 \
    try {                                                                                              \
      stmt;                                                                                            \
      ADD_FAILURE() << #stmt << " did not throw; expected " << ::pykvshm::testing::code_name(want);    \
    } catch (const ::pykvshm::Error& e_) {                                                             \
      EXPECT_EQ(e_.code(), want) << #stmt << " threw " << ::pykvshm::testing::code_name(e_.code())     \
                                 << ": " << e_.what();                                                 \
    }                                                                                                  \
  } while (0)
