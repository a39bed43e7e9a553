// Attention of a few query rows over a KV cache read in place: the attention of a decode step.
//
// # B batch, Hq query heads, Hk key/value heads (Hq a multiple of Hk: grouped-query attention), L query
// # rows, S cached positions, D head dim
//
//   out[b, h, l, :] = sum_s softmax_s(q[b, h, l, :] . k[b, g, s, :]) v[b, g, s, :]      g = h / (Hq / Hk)
//
// An optional boolean mask says which positions each query row sees (a static cache's unfilled tail, padding);
// a row that sees no position gives zeros, as ATen's CPU attention does. At decode the
// cache is the only large operand, so the kernel reads each cached key and value once: the query rows of
// one key/value head share every row of k and v (the kernels' multi-token dot and axpy). Positions are
// split into chunks whose partial softmaxes are merged afterwards (the running-max rescaling of
// flash-decoding), so a few heads still give every thread work.
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "kernels.h"
#include "parallel.h"

namespace dali_cpu {

struct CachedHeads {
  const void* data;  // k or v in the cache's dtype, unit stride within a position's row of D
  int64_t batch_stride, head_stride, position_stride;  // in elements
};

// mask[b, l, s] (true: row l of batch b sees position s), shared by every head; strides in elements, 0 for a
// broadcast dimension.
struct PositionMask {
  const bool* data;  // nullptr: every position is seen
  int64_t batch_stride, row_stride, position_stride;
};

struct DecodeAttention {
  int64_t batch, q_heads, kv_heads, q_rows, positions, head_dim;  // B Hq Hk L S D
  DType dtype;                                                     // of k and v
  const float* q;  // fp32 [B, Hq, L, D] contiguous, the softmax scale already applied
  CachedHeads k, v;
  PositionMask mask;
  float* out;  // fp32 [B, Hq, L, D] contiguous
};

// Inputs must have been validated (shapes, S >= 1, Hq % Hk == 0, the mask's shape).
void run_decode_attention(const DecodeAttention& a, Parallel& pool, const KernelTable& kernels);

}  // namespace dali_cpu
