// The routed experts of one MoE layer on the CPU, as slot contributions.
//
// # T tokens, K top-k, E experts, H hidden, I intermediate, X = 2I (gated) or I
//
//   out[t, k, :] = weight[t, k] * expert_{ids[t, k]}(hidden[t])      if mask[ids[t, k]]
//                = 0                                                 otherwise
//
// with fp32 accumulation. Weight layouts (strides in elements; the last dimension is contiguous):
//   up   [E, X, H]  (transposed: [E, H, X]); gated rows are [gate; up] or interleaved g0, u0, g1, u1, ...
//   down [E, H, I]  (transposed: [E, I, H])
//   up_bias [E, X], down_bias [E, H] (optional, in bias_dtype: the weight dtype, or the activations' when quantized)
//
// Quantized experts (bits 8 or 4; row form only): up and down hold codes, rows of X or H * bits/8 bytes, with
// float16 scales, one per group of columns (QuantizedRows in kernels.h; formats in csrc/README.md).
#pragma once

#include <cstdint>
#include <functional>

#include "dtypes.h"
#include "kernels.h"
#include "parallel.h"

namespace dali_cpu {

enum class Activation : int { kSilu, kGelu, kGeluTanh, kRelu, kRelu2, kQuickGelu, kClampedSwiglu, kClampedSilu };

// Parses transformers' names (see dali_compile.runtime.layer_spec.ACTIVATIONS); false if unknown.
bool parse_activation(const char* name, Activation* out);

struct ExpertWeights {
  DType dtype;
  int64_t num_experts, hidden, intermediate;  // E, H, I
  bool gated, interleaved, transposed;
  Activation activation;
  float alpha, limit;  // alpha: clamped_swiglu only; limit: clamped_swiglu and clamped_silu
  const void* up;
  int64_t up_expert_stride, up_row_stride;
  const void* down;
  int64_t down_expert_stride, down_row_stride;
  const void* up_bias;  // nullable
  int64_t up_bias_stride;
  const void* down_bias;  // nullable
  int64_t down_bias_stride;
  DType bias_dtype;
  // Quantized experts: bits 8 or 4 (0: weights of `dtype`, and the fields below are unused). Code strides
  // (up_/down_expert_stride, _row_stride) are in bytes then; scale strides in elements.
  int bits = 0;
  const F16* up_scales = nullptr;
  int64_t up_scales_expert_stride = 0, up_scales_row_stride = 0, up_group = 0;
  const F16* down_scales = nullptr;
  int64_t down_scales_expert_stride = 0, down_scales_row_stride = 0, down_group = 0;
};

struct Routing {
  int64_t tokens, top_k;  // T, K
  DType hidden_dtype;
  const void* hidden;  // [T, H], rows `hidden_stride` elements apart, contiguous within a row
  int64_t hidden_stride;
  const int64_t* ids;        // [T, K] contiguous, every id in [0, E)
  const float* weights;      // [T, K] contiguous
  const bool* expert_mask;   // [E] or nullptr (= every expert)
};

// A dense fp32 GEMM from outside the core (the binding supplies ATen's), for experts with many
// tokens, where a full GEMM library beats the streaming kernels:
//   c[m, n] = a[m, k] . b^T   with b [n, k]   (b_kn = false)
//   c[m, n] = a[m, k] . b     with b [k, n]   (b_kn = true)
// Strides in elements. It brings its own threads, so it is called outside the pool's regions.
struct DenseGemm {
  void (*fn)(const float* a, int64_t lda, const float* b, int64_t ldb, bool b_kn, float* c, int64_t ldc, int64_t m,
             int64_t n, int64_t k) = nullptr;
  // fp32 experts with at least this many tokens use fn; <= 0 disables it.
  int64_t min_tokens = 0;
  // Runs task(0) .. task(num_tasks - 1) on fn's threads (nullptr: on the caller), for the
  // element-wise work between the GEMMs.
  void (*parallel)(int64_t num_tasks, const std::function<void(int64_t)>& task) = nullptr;
  // The same product with b in a 16-bit `b_dtype` as stored: a is rounded to b_dtype first, c is the
  // 16-bit product widened (what a 16-bit linear gives). For bf16 experts with at least min_tokens16
  // tokens (<= 0: never), on CPUs whose 16-bit GEMM beats widening the weights (see runtime.cpp).
  void (*fn16)(const float* a, int64_t lda, DType b_dtype, const void* b, int64_t ldb, bool b_kn, float* c,
               int64_t ldc, int64_t m, int64_t n, int64_t k) = nullptr;
  int64_t min_tokens16 = 0;
  // The same 16-bit product for a quantized expert with bf16 hidden states, from min_tokens16_quantized tokens
  // on (the threshold of the call's format, runtime.h quantized_bf16_gemm_min_rows; <= 0: never): b [n, k] is
  // handed over block by block, fill(first_row, rows, dst [rows, k]) writing them dequantized and rounded to bf16;
  // a is rounded to bf16 first, c is the bf16 product widened.
  void (*fn16_filled)(const float* a, int64_t lda, const std::function<void(int64_t, int64_t, BF16*)>& fill,
                      float* c, int64_t ldc, int64_t m, int64_t n, int64_t k) = nullptr;
  int64_t min_tokens16_quantized = 0;
};

// Asks the kernel to back [data, data + bytes) with 2 MiB pages where it can (Linux, transparent
// huge pages in "madvise" mode), before the memory is first touched: a fresh multi-MiB buffer
// otherwise takes a page fault per 4 KiB. A hint only; small buffers and other systems: no-op.
void advise_huge_pages(void* data, int64_t bytes);

// Whether any slot's expert is selected by the mask (false: the output is all zeros).
bool any_selected(const Routing& routing);

// Writes out [T, K, H] fp32 (contiguous). Inputs must have been validated (ids in range, shapes).
void run_experts(const ExpertWeights& layer, const Routing& routing, float* out, Parallel& pool,
                 const KernelTable& kernels, const DenseGemm& gemm = DenseGemm());

}  // namespace dali_cpu
