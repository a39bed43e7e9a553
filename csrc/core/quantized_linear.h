// A linear layer whose weight is int8 or int4 (formats in ops/quantized_linear.py and kernels.h's
// QuantizedRows), at decode sizes on the runtime's pool, the codes read in place.
//
// # T rows (tokens), N output features, C input features, G group size
//
//   out[t, n] = sum_g scale[n, g] * sum_{c in group g} x[t, c] * q[n, c] (+ bias[n])      fp32 accumulation
//
// x [T, C] in `input.dtype`, rows `input.ldx` apart; bias [N] in the same dtype (nullable, contiguous);
// out [T, N] fp32, rows `ldo` apart.
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "kernels.h"
#include "linear.h"  // LinearInput
#include "parallel.h"

namespace dali_cpu {

struct QuantizedWeights {
  int bits;                           // 8 or 4
  int64_t out_features, in_features;  // N, C
  QuantizedRows rows;                 // all N rows (codes, scales, group size)
  DType bias_dtype;
  const void* bias;  // nullable, contiguous
};

// Every output row block is a task on the pool, each reading its block of codes once per group of 3
// rows of x; x is widened to fp32 once per call. Quantized weights multiply int8 activations (activation_group,
// kernels.h): `int8_x`, x rounded by round_to_int8 in that group (required for bits 4; for bits 8, given where
// the activations are rounded, with `input` the rounded x', which dot_rows_quantized multiplies where
// dot_rows_int8 does not take the rows). Inputs must have been validated (shapes, dtypes). `rounded`: as
// run_linear's.
void run_quantized_linear(const QuantizedWeights& layer, const LinearInput& input, float* out, int64_t ldo,
                          Parallel& pool, const KernelTable& kernels, const Int8Activations* int8_x = nullptr,
                          const Bf16Output& rounded = {});

// Weight rows [n0, n0 + rows) in fp32 (or rounded to bf16) into dst [rows, C] (rows `ldd` apart), split over the
// pool: the GEMM paths' weight chunks. No bias.
void dequantize_weight_rows(const QuantizedWeights& layer, int64_t n0, int64_t rows, float* dst, int64_t ldd,
                            Parallel& pool, const KernelTable& kernels);
void dequantize_weight_rows(const QuantizedWeights& layer, int64_t n0, int64_t rows, BF16* dst, int64_t ldd,
                            Parallel& pool, const KernelTable& kernels);

}  // namespace dali_cpu
