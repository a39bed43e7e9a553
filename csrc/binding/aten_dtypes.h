// at::ScalarType -> the core's DType, for every binding of the runtime.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "../core/dtypes.h"

namespace dali_cpu {

// float32, bfloat16 or float16; anything else is a TypeError naming the op and the tensor (`what`).
inline DType core_dtype(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kHalf:
      return DType::kF16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace dali_cpu
