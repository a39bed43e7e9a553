// The two matrix micro-kernels every expert projection reduces to, one table per ISA.
//
// # n tokens of one expert, rows/cols of one weight block, len = reduction length
//
// All pointers are element pointers of the given DType; strides are in elements. Only the
// innermost dimension must be contiguous, and loads are unaligned, so any tensor whose
// last dimension has unit stride can be read in place.
#pragma once

#include <cstdint>
#include <vector>

#include "dtypes.h"
#include "isa.h"

namespace dali_cpu {

// A block of quantized weight rows in the formats of ops/quantized_linear.py (`len` columns a row):
//   int8: codes int8 [rows, len], w[r, j] = code[r, j] * scale[r, j / group]
//   int4: codes uint8 [rows, len / 2]; within each group starting at column c0, byte c0 / 2 + i holds
//         column c0 + i in its low nibble and column c0 + group / 2 + i in its high nibble, as q + 8.
struct QuantizedRows {
  const void* codes;
  int64_t ld;          // bytes between rows of codes (unit stride within a row)
  const F16* scales;   // [rows, len / group]
  int64_t lds;         // elements between rows of scales
  int64_t group;       // G: divides len (even for int4)
};

// Activations rounded to int8 for quantized weights (round_activations in ops/quantized_linear.py): per token and
// group of G columns (int4: the weight's groups; int8: kInt8ActivationGroup), s = max |x| / 127 (fp32) and
// xq = clamp(round_half_even(x / s), -127, 127). Each token's `len` bytes follow int4 codes' byte order, so a run
// of int4 code bytes meets its activations in one load: first low[j] = xq of the column in code byte j's low
// nibble, then high[j] = of its high nibble (j < len/2). (The int8 kernel puts a run's halves back in order.)
struct Int8Activations {
  const int8_t* q;       // [n, len]
  const float* scale;    // [n, len / G]: s
  const float* offset;   // [n, len / G]: 8 * s * sum(xq): what the codes' +8 adds to each group's dot
  int64_t len, group;    // columns, G
};

struct KernelTable {
  Isa isa;
  // Row form, for weights stored [out, in] (the reduction is contiguous, ideal for streaming):
  //   out[t * ldo + r] = sum_j x[t * ldx + j] * w[r * ldw + j]      r < rows, t < n, j < len
  // x_exact_bf16: every x value is exactly representable in bf16 (x came from bf16 hidden states),
  // which lets the AVX-512 BF16 path use vdpbf16ps without rounding x.
  void (*dot_rows)(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t len, const float* x,
                   int64_t ldx, int64_t n, bool x_exact_bf16, float* out, int64_t ldo);
  // Column form, for weights stored [in, out] (transposed layouts): accumulate whole rows (axpy) so
  // every read is contiguous:
  //   out[t * ldo + c] = sum_r x[t * ldx + r] * w[r * ldw + c]      c < cols, t < n, r < rows
  void (*axpy_rows)(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t cols, const float* x,
                    int64_t ldx, int64_t n, float* out, int64_t ldo);
  // dst[i] = float(src[i]) for i < count.
  void (*convert)(DType stype, const void* src, int64_t count, float* dst);
  // out[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g * (1 / (1 + exp(-g))): the gated
  // activation of most MoE models, vectorised (a scalar exp per element costs ~5% of a large
  // fp32 expert whose GEMMs run elsewhere). out may alias gate or up.
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // x[i] = exp(x[i] - shift) for i < n, in place; returns their sum: a softmax row (shift = its maximum).
  // Vectorised as silu_mul (within an ulp of std::exp on the AVX paths).
  float (*exp_shifted)(float* x, int64_t n, float shift);
  // dot_rows over quantized weights, read in place: fp32 dots of x with each group's codes, times the
  // group's scale, summed in fp32:
  //   out[t * ldo + r] = sum_g scale[r, g] * sum_{j in group g} x[t * ldx + j] * q[r, j]
  // bits 8 or 4, as dequantize_rows.
  void (*dot_rows_quantized)(int bits, const QuantizedRows& w, int64_t rows, int64_t len, const float* x, int64_t ldx,
                             int64_t n, float* out, int64_t ldo);
  // dst[r * ldd + j] = w[r, j] in fp32 (exact: a code times an fp16 scale fits an fp32), bits 8 or 4.
  void (*dequantize_rows)(int bits, const QuantizedRows& w, int64_t rows, int64_t len, float* dst, int64_t ldd);
  // int4 weights times int8 activations (tokens first .. first + n - 1 of x), the products summed in integers
  // per group and scaled once: out[t * ldo + r] = sum_g scale[r, g] * s[t, g] * sum_{j in g} q[r, j] * xq[t, j].
  // Any even group size (w.group == x.group).
  void (*dot_rows_int4)(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first, int64_t n,
                        float* out, int64_t ldo);
  // round_to_int8 (below), vectorised where the ISA has a version; every version gives the same bits.
  void (*round_to_int8)(const float* x, int64_t ldx, int64_t n, int64_t len, int64_t group, int8_t* q, float* scale,
                        float* offset, float* rounded);
  // dst[i] = src[i] rounded to bf16, to nearest even (a NaN: the quiet NaN 0x7FC0), as c10::BFloat16 rounds
  // (to_bf16): a linear's fp32 sums written as its bf16 output (linear.cpp).
  void (*round_to_bf16)(const float* src, int64_t n, BF16* dst);
  // dequantize_rows then round_to_bf16, in one pass (the same bits, no fp32 rows in between): the bf16 GEMM's
  // weight blocks.
  void (*dequantize_rows_bf16)(int bits, const QuantizedRows& w, int64_t rows, int64_t len, BF16* dst, int64_t ldd);
  // int8 weights with one scale per row times int8 activations rounded in groups of kInt8ActivationGroup
  // (x.group), products summed in integers: out[t * ldo + r] = scale[r] * sum_g s[t, g] * sum_{j in g} q[r, j] *
  // xq[t, j]. Only where the ISA has a version (AVX-512 VNNI) and for rows of a multiple of 64 columns
  // (takes_int8_kernel); otherwise dot_rows_quantized multiplies the rounded activations x' in fp32.
  void (*dot_rows_int8)(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first, int64_t n,
                        float* out, int64_t ldo) = nullptr;
};

// int8 weights multiply activations rounded to int8 in groups of this many columns (round_activations in
// ops/quantized_linear.py), when it divides the row; int4 weights, in their own groups.
constexpr int64_t kInt8ActivationGroup = 32;

// KernelTable::dequantize_rows (fp32 rows) or dequantize_rows_bf16 (bf16 rows), by the destination's type.
inline void dequantize_rows_into(const KernelTable& kernels, int bits, const QuantizedRows& w, int64_t rows,
                                 int64_t len, float* dst, int64_t ldd) {
  kernels.dequantize_rows(bits, w, rows, len, dst, ldd);
}
inline void dequantize_rows_into(const KernelTable& kernels, int bits, const QuantizedRows& w, int64_t rows,
                                 int64_t len, BF16* dst, int64_t ldd) {
  kernels.dequantize_rows_bf16(bits, w, rows, len, dst, ldd);
}

// The group the activations of a quantized projection of `columns` inputs are rounded in, or 0 where they
// multiply as they are (int8 rows not a multiple of kInt8ActivationGroup): activation_group in
// ops/quantized_linear.py.
inline int64_t activation_group(int bits, int64_t columns, int64_t weight_group) {
  if (bits == 4) return weight_group;
  return columns % kInt8ActivationGroup == 0 ? kInt8ActivationGroup : 0;
}

// Whether dot_rows_int8 takes these int8 rows of `len` columns (else dot_rows_quantized on x').
inline bool takes_int8_kernel(const KernelTable& kernels, const QuantizedRows& w, int64_t len) {
  return kernels.dot_rows_int8 != nullptr && w.group == len && len % 64 == 0;
}

// `rows` quantized weight rows of `len` columns times n tokens' activations, by the kernel that takes them: int4,
// dot_rows_int4 on the codes xq (tokens first .. first + n - 1); int8, dot_rows_int8 on xq where it takes the rows,
// else dot_rows_quantized on x (those tokens' rows, ldx apart: x' where the activations were rounded, x as it is
// where they were not, and then xq is null).
inline void dot_rows_quantized_weights(const KernelTable& kernels, int bits, const QuantizedRows& w, int64_t rows,
                                       int64_t len, const Int8Activations* xq, int64_t first, const float* x,
                                       int64_t ldx, int64_t n, float* out, int64_t ldo) {
  if (bits == 4) {
    kernels.dot_rows_int4(w, rows, *xq, first, n, out, ldo);
  } else if (xq != nullptr && takes_int8_kernel(kernels, w, len)) {
    kernels.dot_rows_int8(w, rows, *xq, first, n, out, ldo);
  } else {
    kernels.dot_rows_quantized(bits, w, rows, len, x, ldx, n, out, ldo);
  }
}

// Rounds x [n, len] (rows ldx apart) to int8 per token and group into q [n, len], scale and offset [n, len / G]
// (the arrays Int8Activations points to), and writes x' = xq * s to rounded [n, len] (may be x itself, ldx apart).
// The scalar version (the portable and AVX2 tables'); call it through KernelTable::round_to_int8.
void round_to_int8(const float* x, int64_t ldx, int64_t n, int64_t len, int64_t group, int8_t* q, float* scale,
                   float* offset, float* rounded);

// The layout every round_to_int8 writes, walked once for all of them: for each token and group,
// round_group(xg, rounded_g, low, high) rounds the group's G values, writes the codes of its first G / 2 columns to
// low and the rest to high (the weight codes' nibble order) and x' to rounded_g, and returns {s, sum of the codes}.
struct RoundedGroup {
  float scale;
  int32_t code_sum;
};
template <class RoundGroup>
inline void round_groups_to_int8(const float* x, int64_t ldx, int64_t n, int64_t len, int64_t group, int8_t* q,
                                 float* scale, float* offset, float* rounded, RoundGroup&& round_group) {
  const int64_t half = group / 2, groups = len / group;
  for (int64_t t = 0; t < n; ++t) {
    int8_t* low = q + t * len;
    int8_t* high = low + len / 2;
    for (int64_t g = 0; g < groups; ++g) {
      const RoundedGroup r = round_group(x + t * ldx + g * group, rounded + t * ldx + g * group, low + g * half,
                                         high + g * half);
      scale[t * groups + g] = r.scale;
      offset[t * groups + g] = 8.0f * r.scale * static_cast<float>(r.code_sum);
    }
  }
}

// Owned int8 activations of `rows` rows (codes, scales and offsets as Int8Activations describes them): what an int4
// call rounds its inputs into (run_experts' slots, dali::quantized_linear's rows).
struct Int8Rows {
  std::vector<int8_t> q;
  std::vector<float> scale, offset;

  void resize(int64_t rows, int64_t len, int64_t group) {
    q.resize(rows * len);
    scale.resize(rows * (len / group));
    offset.resize(rows * (len / group));
  }
  Int8Activations view(int64_t len, int64_t group) const {
    return Int8Activations{q.data(), scale.data(), offset.data(), len, group};
  }
  // Rounds rows [first, first + n) of x [*, len] in place and keeps their codes.
  void round_rows(const KernelTable& kernels, float* x, int64_t first, int64_t n, int64_t len, int64_t group) {
    const int64_t groups = len / group;
    kernels.round_to_int8(x + first * len, len, n, len, group, q.data() + first * len, scale.data() + first * groups,
                          offset.data() + first * groups, x + first * len);
  }
};

// The scalar dot_rows_int4 (the portable table's), and the AVX2 one (group sizes that are multiples of 32 and rows
// of a multiple of 64 columns; others go to the scalar one), also the AVX-512 table's; nullptr where the build has
// no x86-64 path.
void dot_rows_int4_scalar(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first, int64_t n,
                          float* out, int64_t ldo);
// A kernel of quantized codes times int8 activations: KernelTable::dot_rows_int4's and dot_rows_int8's type.
using DotRowsByInt8 = void (*)(const QuantizedRows&, int64_t, const Int8Activations&, int64_t, int64_t, float*,
                               int64_t);
DotRowsByInt8 dot_rows_int4_avx2();
// The AVX-512 VNNI version (kernels_avx512_vnni.cpp), sending widths it does not take to `fallback`; only on
// a CPU with AVX-512 VNNI (cpu_has_avx512_vnni). Not x86-64: `fallback` itself.
DotRowsByInt8 dot_rows_int4_avx512_vnni(DotRowsByInt8 fallback);
// KernelTable::dot_rows_int8 with AVX-512 VNNI (kernels_avx512_vnni.cpp); nullptr where the build has no x86-64 path.
DotRowsByInt8 dot_rows_int8_avx512_vnni();

const KernelTable& portable_kernels();
// nullptr where the build's target architecture has no such path (e.g. not x86-64).
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace dali_cpu
