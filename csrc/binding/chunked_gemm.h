// The prefill paths of the bindings (linear_ops.cpp, quantized_linear_ops.cpp, cpu_experts_ops.cpp) for a
// weight the CPU cannot multiply fast as stored (16-bit, int8, int4):
//   - chunked_fp32_gemm: turned into fp32 a chunk of rows at a time (at most 16 MiB, in a buffer the calling
//     thread keeps) and multiplied by ATen's fp32 GEMM;
//   - blocked_bf16_gemm (quantized weights, bf16 activations, CPUs with AMX-BF16): dequantized a block of
//     rows at a time into buffers that stay in L2, rounded to bf16 and multiplied by ATen's bf16 GEMM.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <vector>

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

// out [T, N] (fp32 or bf16, unit column stride) = x16 [T, C] (bf16) times the N x C weight `fill` produces as
// fp32, on ATen's bf16 GEMM (oneDNN's AMX kernels). The weight is made a block of rows at a time (about 1 MiB
// of bf16, which stays in L2; a whole int8 OLMoE expert in fp32 would be 25 MB written and read back), in one
// parallel region per block: each thread fills one row at a time into its own fp32 scratch, which stays in
// L1, and rounds it into the block (KernelTable::round_to_bf16, as c10::BFloat16 rounds). Measured on the AMX
// host: a region per step of each block (fill, round, multiply) cost more than the GEMM itself at 32 tokens,
// and filling 16 rows before rounding them was about 10% slower than one. Each output element is an fp32 sum
// of exact products of bf16 values, rounded to bf16 (what a bf16 linear gives) and then written into out:
// what F.linear(x16, weight.bfloat16()) computes. `fill` runs inside the region: its own parallel loops must
// run inline there (at::parallel_for and step_parallel() do).
inline void blocked_bf16_gemm(const at::Tensor& x16, int64_t N, const FillWeightRows& fill, const at::Tensor& out) {
  constexpr int64_t kRowsPerTask = 16;
  constexpr int64_t kBlockElements = int64_t{1} << 19;  // 1 MiB of bf16
  const int64_t C = x16.size(1);
  const int64_t block = std::min(N, std::max<int64_t>(kRowsPerTask, kBlockElements / std::max<int64_t>(1, C) /
                                                                         kRowsPerTask * kRowsPerTask));
  // Never destroyed: a thread_local tensor's destructor could run after ATen's at process exit.
  thread_local at::Tensor* rows16 = new at::Tensor();
  if (!rows16->defined() || rows16->numel() < block * C) {
    *rows16 = at::empty({block * C}, x16.options().dtype(at::kBFloat16));
  }
  c10::BFloat16* const w16 = rows16->data_ptr<c10::BFloat16>();
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    at::parallel_for(0, (nb + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scratch;  // one row: it stays in L1 between the fill and the rounding
      scratch.resize(C);
      const KernelTable& kernels = active_kernels();
      for (int64_t r = begin * kRowsPerTask; r < std::min(nb, end * kRowsPerTask); ++r) {
        fill(n0 + r, 1, scratch.data());
        kernels.round_to_bf16(scratch.data(), C, reinterpret_cast<BF16*>(w16 + r * C));
      }
    });
    out.narrow(1, n0, nb).copy_(at::mm(x16, rows16->narrow(0, 0, nb * C).view({nb, C}).t()));
  }
}

}  // namespace dali_cpu
