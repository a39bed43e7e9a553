// run_quantized_linear: as run_linear (linear.cpp), output features split into row blocks, one task
// each, every task streaming its block of codes once per group of 3 rows of x. Quantized weights are
// 2 to 4 times smaller than bf16 ones, so a decode step's projections read 2 to 4 times fewer bytes.
#include "quantized_linear.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace dali_cpu {

namespace {

// The same policy as run_linear's (see linear.cpp for why each constant is what it is).
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kRowAlign = 4;
constexpr int64_t kMaxBlockRows = 64;
constexpr int64_t kReusedBlockBytes = 256 * 1024;
constexpr int64_t kMinParallelBytes = 64 * 1024;
// Dequantized rows per task of the GEMM path: 16 rows of C = 4096 are 256 KiB of fp32.
constexpr int64_t kDequantizeTaskRows = 16;

int64_t code_bytes_per_row(const QuantizedWeights& layer) {
  return layer.bits == 8 ? layer.in_features : layer.in_features / 2;
}

int64_t choose_block(const QuantizedWeights& layer, int64_t rows, int threads) {
  const int64_t n = layer.out_features;
  const int64_t target_tasks = std::max<int64_t>(1, kTasksPerThread * threads);
  int64_t block = (n + target_tasks - 1) / target_tasks;
  block = (block + kRowAlign - 1) / kRowAlign * kRowAlign;
  int64_t max_block = kMaxBlockRows;
  if (rows > 3) {
    const int64_t row_bytes = std::max<int64_t>(1, code_bytes_per_row(layer));
    max_block = std::max(kRowAlign, std::min(max_block, kReusedBlockBytes / row_bytes / kRowAlign * kRowAlign));
  }
  return std::max<int64_t>(1, std::min({block, max_block, n}));
}

float bias_at(DType dtype, const void* bias, int64_t i) {
  switch (dtype) {
    case DType::kBF16:
      return to_float(static_cast<const BF16*>(bias)[i]);
    case DType::kF16:
      return to_float(static_cast<const F16*>(bias)[i]);
    default:
      return static_cast<const float*>(bias)[i];
  }
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
                          Parallel& pool, const KernelTable& kernels) {
  const int64_t T = input.rows, C = layer.in_features, N = layer.out_features;
  if (T == 0 || N == 0) return;
  // x widened to fp32 by the caller's thread: T x C values, a few KiB at decode.
  thread_local std::vector<float> xs;
  const float* x = static_cast<const float*>(input.x);
  int64_t ldx = input.ldx;
  if (input.dtype != DType::kF32) {
    xs.resize(T * C);
    for (int64_t t = 0; t < T; ++t) {
      kernels.convert(input.dtype, static_cast<const char*>(input.x) + t * input.ldx * dtype_size(input.dtype), C,
                      xs.data() + t * C);
    }
    x = xs.data();
    ldx = C;
  }
  const auto dot_rows = layer.bits == 8 ? kernels.dot_rows_int8 : kernels.dot_rows_int4;
  const int64_t block = choose_block(layer, T, pool.num_threads());
  const int64_t blocks = (N + block - 1) / block;
  const std::function<void(int64_t)> body = [&](int64_t task) {
    const int64_t n0 = task * block;
    const int64_t bn = std::min(block, N - n0);
    dot_rows(rows_from(layer, n0), bn, C, x, ldx, T, out + n0, ldo);
    if (layer.bias == nullptr) return;
    for (int64_t t = 0; t < T; ++t) {
      float* row = out + t * ldo + n0;
      for (int64_t i = 0; i < bn; ++i) row[i] += bias_at(layer.bias_dtype, layer.bias, n0 + i);
    }
  };
  if (N * code_bytes_per_row(layer) * T < kMinParallelBytes) {
    for (int64_t task = 0; task < blocks; ++task) body(task);
  } else {
    pool.parallel_for(blocks, body);
  }
}

void dequantize_weight_rows(const QuantizedWeights& layer, int64_t n0, int64_t rows, float* dst, int64_t ldd,
                            Parallel& pool, const KernelTable& kernels) {
  const int64_t tasks = (rows + kDequantizeTaskRows - 1) / kDequantizeTaskRows;
  pool.parallel_for(tasks, [&](int64_t task) {
    const int64_t r0 = task * kDequantizeTaskRows;
    const int64_t count = std::min(kDequantizeTaskRows, rows - r0);
    kernels.dequantize_rows(layer.bits, rows_from(layer, n0 + r0), count, layer.in_features, dst + r0 * ldd, ldd);
  });
}

}  // namespace dali_cpu
