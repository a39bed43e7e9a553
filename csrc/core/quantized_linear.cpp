// run_quantized_linear: as run_linear (linear.cpp), output features split into row blocks, one task
// each, every task streaming its block of codes once per group of 3 rows of x. Quantized weights are
// 2 to 4 times smaller than bf16 ones, so a decode step's projections read 2 to 4 times fewer bytes.
#include "quantized_linear.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace dali_cpu {

namespace {

// Dequantized rows per task of the GEMM path: 16 rows of C = 4096 are 256 KiB of fp32.
constexpr int64_t kDequantizeTaskRows = 16;

int64_t code_bytes_per_row(const QuantizedWeights& layer) {
  return layer.bits == 8 ? layer.in_features : layer.in_features / 2;
}

// The rows [n0, ...) of a layer's weights.
QuantizedRows rows_from(const QuantizedWeights& layer, int64_t n0) {
  QuantizedRows rows = layer.rows;
  rows.codes = static_cast<const uint8_t*>(rows.codes) + n0 * rows.ld;
  rows.scales += n0 * rows.lds;
  return rows;
}

}  // namespace

void run_quantized_linear(const QuantizedWeights& layer, const LinearInput& input, float* out, int64_t ldo,
                          Parallel& pool, const KernelTable& kernels, const Int8Activations* int8_x,
                          const Bf16Output& rounded) {
  run_row_blocks(layer.out_features, code_bytes_per_row(layer), input, layer.bias_dtype, layer.bias, out, ldo, pool,
                 kernels, [&](int64_t n0, int64_t rows, const float* x, int64_t ldx) {
                   dot_rows_quantized_weights(kernels, layer.bits, rows_from(layer, n0), rows, layer.in_features,
                                              int8_x, 0, x, ldx, input.rows, out + n0, ldo);
                 }, rounded);
}

template <class Out>
void dequantize_weight_rows_as(const QuantizedWeights& layer, int64_t n0, int64_t rows, Out* dst, int64_t ldd,
                               Parallel& pool, const KernelTable& kernels) {
  const int64_t tasks = (rows + kDequantizeTaskRows - 1) / kDequantizeTaskRows;
  pool.parallel_for(tasks, [&](int64_t task) {
    const int64_t r0 = task * kDequantizeTaskRows;
    const int64_t count = std::min(kDequantizeTaskRows, rows - r0);
    dequantize_rows_into(kernels, layer.bits, rows_from(layer, n0 + r0), count, layer.in_features, dst + r0 * ldd,
                         ldd);
  });
}

void dequantize_weight_rows(const QuantizedWeights& layer, int64_t n0, int64_t rows, float* dst, int64_t ldd,
                            Parallel& pool, const KernelTable& kernels) {
  dequantize_weight_rows_as(layer, n0, rows, dst, ldd, pool, kernels);
}

void dequantize_weight_rows(const QuantizedWeights& layer, int64_t n0, int64_t rows, BF16* dst, int64_t ldd,
                            Parallel& pool, const KernelTable& kernels) {
  dequantize_weight_rows_as(layer, n0, rows, dst, ldd, pool, kernels);
}

}  // namespace dali_cpu
