// The prefill paths of the bindings (linear_ops.cpp, quantized_linear_ops.cpp, cpu_experts_ops.cpp) for a
// weight the CPU cannot multiply fast as stored (16-bit, int8, int4):
//   - chunked_fp32_gemm: turned into fp32 a chunk of rows at a time (at most 16 MiB, in a buffer the calling
//     thread keeps) and multiplied by ATen's fp32 GEMM;
//   - blocked_bf16_gemm (quantized weights, bf16 activations, CPUs with AMX-BF16): dequantized and rounded to
//     bf16 a block of rows at a time (up to 8 MiB) and multiplied by ATen's bf16 GEMM.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <functional>
#include <optional>

#include "../core/experts.h"  // advise_huge_pages
#include "../core/runtime.h"  // active_kernels

namespace dali_cpu {

// fill(n0, rows, dst) writes weight rows [n0, n0 + rows) as fp32 into dst [rows, C] (contiguous).
using FillWeightRows = std::function<void(int64_t n0, int64_t rows, float* dst)>;

// x2 [T, C] times the N x C weight `fill` produces (+ bias [N]), in x2's dtype.
inline at::Tensor chunked_fp32_gemm(const at::Tensor& x2, int64_t N, const FillWeightRows& fill,
                                    const std::optional<at::Tensor>& bias) {
  constexpr int64_t kChunkFloats = int64_t{4} << 20;  // 16 MiB: bounded memory for any lm_head
  const int64_t T = x2.size(0), C = x2.size(1);
  const at::Tensor x32 = x2.to(at::kFloat);
  at::Tensor out = at::empty({T, N}, x2.options().dtype(at::kFloat));
  const int64_t chunk = std::max<int64_t>(1, std::min(N, kChunkFloats / std::max<int64_t>(1, C)));
  // Never destroyed: a thread_local tensor's destructor could run after ATen's at process exit.
  thread_local at::Tensor* buffer = new at::Tensor();
  if (!buffer->defined() || buffer->numel() < chunk * C) {
    *buffer = at::empty({chunk * C}, x2.options().dtype(at::kFloat));
    advise_huge_pages(buffer->data_ptr(), buffer->nbytes());
  }
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    at::Tensor w32 = buffer->narrow(0, 0, nc * C).view({nc, C});
    fill(n0, nc, w32.data_ptr<float>());
    out.narrow(1, n0, nc).copy_(at::mm(x32, w32.t()));
  }
  if (bias.has_value()) out.add_(*bias);
  return out.to(x2.scalar_type());
}

// fill(n0, rows, dst) writes weight rows [n0, n0 + rows) rounded to bf16 into dst [rows, C] (contiguous), itself
// split over the step's threads.
using FillBf16Rows = std::function<void(int64_t n0, int64_t rows, BF16* dst)>;

// out [T, N] (fp32 or bf16, unit column stride) = x16 [T, C] (bf16) times the N x C weight `fill` produces, on
// ATen's bf16 GEMM (oneDNN's AMX kernels), a block of rows at a time: up to 8 MiB of bf16, a whole expert's
// projection at the shapes of OLMoE and Qwen3 (each block stays in a large L3 between its fill and its product).
// Measured on the 2-vCPU AMX host, int8 experts at 64 tokens each (OLMoE shape, same process, alternating): 1 MiB
// blocks (which stay in L2) took 1.4x the time of 8 MiB ones, int4 1.6x; at 256 tokens about the same. Each
// output element is an fp32 sum of exact products of bf16 values, rounded to bf16 (what a bf16 linear gives) and
// then written into out: what F.linear(x16, weight.bfloat16()) computes.
inline void blocked_bf16_gemm(const at::Tensor& x16, int64_t N, const FillBf16Rows& fill, const at::Tensor& out) {
  constexpr int64_t kBlockElements = int64_t{1} << 22;  // 8 MiB of bf16
  const int64_t C = x16.size(1);
  const int64_t block = std::min(N, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, C)));
  // Never destroyed: a thread_local tensor's destructor could run after ATen's at process exit.
  thread_local at::Tensor* rows16 = new at::Tensor();
  if (!rows16->defined() || rows16->numel() < block * C) {
    *rows16 = at::empty({block * C}, x16.options().dtype(at::kBFloat16));
    advise_huge_pages(rows16->data_ptr(), rows16->nbytes());
  }
  BF16* const w16 = static_cast<BF16*>(rows16->data_ptr());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    fill(n0, nb, w16);
    out.narrow(1, n0, nb).copy_(at::mm(x16, rows16->narrow(0, 0, nb * C).view({nb, C}).t()));
  }
}

}  // namespace dali_cpu
