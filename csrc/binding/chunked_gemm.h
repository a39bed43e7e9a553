// The prefill path of the dense bindings (linear_ops.cpp, quantized_linear_ops.cpp): a weight the
// CPU cannot multiply fast as stored (16-bit, int8, int4) is turned into fp32 a chunk of rows at a
// time (at most 16 MiB, in a buffer the calling thread keeps) and multiplied by ATen's fp32 GEMM.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <functional>
#include <optional>

#include "../core/experts.h"  // advise_huge_pages

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

}  // namespace dali_cpu
