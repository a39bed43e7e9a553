// run_linear: output features split into row blocks, one task each, every task streaming its block
// of weight rows once per group of 3 rows of x (dot_rows), so a decode step's projections read each
// weight byte once, on every thread of the pool.
#include "linear.h"

#include "stream_blocks.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace dali_cpu {

namespace {

// Tasks per thread: enough to balance threads that the OS or a busy neighbour slows down.
constexpr int64_t kTasksPerThread = 4;
// Row blocks are multiples of dot_rows' 4-row tile: about kStreamBlockBytes of weights (stream_blocks.h: long
// enough runs for the prefetchers, short enough to balance), and at least this many rows.
constexpr int64_t kRowAlign = 4;
constexpr int64_t kMaxBlockRows = 64;
// With more than 3 rows of x, a block is read again for every 3 rows: keep it within L2 then.
constexpr int64_t kReusedBlockBytes = 256 * 1024;
// Below this much work (weight bytes times rows) the call runs on the caller's thread alone: a
// parallel region's start and end barrier cost tens of microseconds when another thread has gone
// to sleep, more than reading 64 KiB takes.
constexpr int64_t kMinParallelBytes = 64 * 1024;

int64_t choose_block(int64_t n, int64_t row_bytes, int64_t rows, int threads) {
  const int64_t target_tasks = std::max<int64_t>(1, kTasksPerThread * threads);
  int64_t block = (n + target_tasks - 1) / target_tasks;
  block = (block + kRowAlign - 1) / kRowAlign * kRowAlign;
  int64_t max_block = stream_block_units(row_bytes, kRowAlign, kMaxBlockRows);
  if (rows > 3) {
    max_block = std::max(kRowAlign, std::min(max_block, kReusedBlockBytes / std::max<int64_t>(1, row_bytes) /
                                                            kRowAlign * kRowAlign));
  }
  return std::max<int64_t>(1, std::min({block, max_block, n}));
}

}  // namespace

void widen_rows(const LinearInput& input, const KernelTable& kernels, float* dst) {
  const int64_t C = input.features, row_bytes = input.ldx * dtype_size(input.dtype);
  for (int64_t t = 0; t < input.rows; ++t) {
    kernels.convert(input.dtype, static_cast<const char*>(input.x) + t * row_bytes, C, dst + t * C);
  }
}

void run_row_blocks(int64_t out_features, int64_t row_bytes, const LinearInput& input, DType bias_dtype,
                    const void* bias, float* out, int64_t ldo, Parallel& pool, const KernelTable& kernels,
                    const RowBlockDot& dot, const Bf16Output& rounded) {
  const int64_t T = input.rows, N = out_features;
  if (T == 0 || N == 0) return;
  // x widened to fp32 by the caller's thread: T x C values, a few KiB at decode.
  thread_local std::vector<float> xs;
  const float* x = static_cast<const float*>(input.x);
  int64_t ldx = input.ldx;
  if (input.dtype != DType::kF32) {
    xs.resize(T * input.features);
    widen_rows(input, kernels, xs.data());
    x = xs.data();
    ldx = input.features;
  }
  const int64_t block = choose_block(N, row_bytes, T, pool.num_threads());
  const int64_t blocks = (N + block - 1) / block;
  const std::function<void(int64_t)> body = [&](int64_t task) {
    const int64_t n0 = task * block;
    const int64_t bn = std::min(block, N - n0);
    dot(n0, bn, x, ldx);
    if (bias != nullptr) {
      for (int64_t t = 0; t < T; ++t) {
        float* row = out + t * ldo + n0;
        for (int64_t i = 0; i < bn; ++i) row[i] += element(bias_dtype, bias, n0 + i);
      }
    }
    if (rounded.data == nullptr) return;
    for (int64_t t = 0; t < T; ++t) kernels.round_to_bf16(out + t * ldo + n0, bn, rounded.data + t * rounded.ld + n0);
  };
  if (N * row_bytes * T < kMinParallelBytes) {
    for (int64_t task = 0; task < blocks; ++task) body(task);
  } else {
    pool.parallel_for(blocks, body);
  }
}

void run_linear(const LinearWeights& layer, const LinearInput& input, float* out, int64_t ldo, Parallel& pool,
                const KernelTable& kernels, const Bf16Output& rounded) {
  const int64_t wsize = dtype_size(layer.dtype);
  const bool exact_bf16 = input.dtype == DType::kBF16;
  run_row_blocks(layer.out_features, layer.in_features * wsize, input, layer.dtype, layer.bias, out, ldo, pool,
                 kernels, [&](int64_t n0, int64_t rows, const float* x, int64_t ldx) {
                   const void* w = static_cast<const char*>(layer.weight) + n0 * layer.ldw * wsize;
                   kernels.dot_rows(layer.dtype, w, layer.ldw, rows, layer.in_features, x, ldx, input.rows,
                                    exact_bf16, out + n0, ldo);
                 }, rounded);
}

}  // namespace dali_cpu
