// A dense linear layer at decode sizes on the runtime's pool: the weight-bound matmuls of a step
// (attention projections, routers, shared experts, dense MLPs, lm_head), weights read in place.
//
// # T rows (tokens), N output features, C input features
//
//   out[t, n] = sum_c x[t, c] * w[n, c] (+ bias[n])      fp32 accumulation
//
// w [N, C] in its own dtype, rows `ldw` elements apart, contiguous within a row; bias [N] in the
// weight dtype (nullable); x [T, C] in `x_dtype`, rows `ldx` apart; out [T, N] fp32, rows `ldo` apart.
#pragma once

#include <cstdint>
#include <functional>

#include "dtypes.h"
#include "kernels.h"
#include "parallel.h"

namespace dali_cpu {

struct LinearWeights {
  DType dtype;
  int64_t out_features, in_features;  // N, C
  const void* weight;
  int64_t ldw;
  const void* bias;  // nullable, contiguous
};

struct LinearInput {
  int64_t rows;  // T
  DType dtype;
  const void* x;
  int64_t ldx;
  int64_t features;  // C
};

// x's T rows widened to fp32 into dst [T, C] (contiguous): what every dense driver multiplies.
void widen_rows(const LinearInput& input, const KernelTable& kernels, float* dst);

// Optionally, the outputs rounded to bf16 as well (to nearest even, as torch rounds): dst[t * ld + n] =
// bf16(out[t * ldo + n]), each row block by the task that computed it, while it is still in cache. A bf16
// model's decode step then gets its output in its dtype without a second pass (an ATen conversion per call
// cost a few microseconds of dispatch and allocation, a few dozen calls per step). data null: fp32 only.
struct Bf16Output {
  BF16* data = nullptr;
  int64_t ld = 0;
};

// The decode-size driver of every dense kernel (this file's and quantized_linear.h's): x widened to fp32
// once per call (per-thread scratch), N output features split into row blocks of `row_bytes` weight
// bytes per row, one task each on the pool (or the caller alone below a few dozen KiB of work), bias in
// `bias_dtype` (nullable) added in fp32, then the block rounded into `rounded` (if given).
// dot(n0, rows, x, ldx) writes out[:, n0 .. n0 + rows).
using RowBlockDot = std::function<void(int64_t n0, int64_t rows, const float* x, int64_t ldx)>;
void run_row_blocks(int64_t out_features, int64_t row_bytes, const LinearInput& input, DType bias_dtype,
                    const void* bias, float* out, int64_t ldo, Parallel& pool, const KernelTable& kernels,
                    const RowBlockDot& dot, const Bf16Output& rounded = {});

// Every output row block is a task on the pool; x is widened to fp32 once per call (per thread
// scratch). Inputs must have been validated (shapes, dtypes).
void run_linear(const LinearWeights& layer, const LinearInput& input, float* out, int64_t ldo, Parallel& pool,
                const KernelTable& kernels, const Bf16Output& rounded = {});

}  // namespace dali_cpu
