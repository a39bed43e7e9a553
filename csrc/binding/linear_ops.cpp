// ATen binding of the dense linear kernel: dali::cpu_linear (schema in ops/cpu_linear.py).
//
// # T rows (all leading dimensions of x flattened), N output features, C input features
//
// Up to linear_gemm_min_rows() - 1 rows the runtime's kernel reads the weight in place on the pool
// (decode: weight-bound, one read of every byte). From that many rows on the matmul is compute-bound
// and goes to ATen's fp32 GEMM (MKL): fp32 weights directly, 16-bit ones widened to fp32 chunk by
// chunk first (a CPU without native bf16/fp16 dot products runs the 16-bit GEMM far slower). On a CPU
// with AMX-BF16, bf16 weights go to ATen's bf16 GEMM as stored from linear_bf16_gemm_min_rows() rows on.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/add.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "aten_dtypes.h"
#include "chunked_gemm.h"
#include "decode_output.h"
#include "../core/linear.h"
#include "../core/runtime.h"

namespace dali_cpu {
namespace {

constexpr const char* kOp = "dali::cpu_linear";

DType to_dtype(at::ScalarType t) { return core_dtype(t, kOp, "weight"); }

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, ": weight must be 2-D [N, C], got shape ", weight.sizes());
  to_dtype(weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least one dimension");
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), kOp, ": x is ", x.scalar_type(), " but weight is ",
                   weight.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), kOp, ": x has ", x.size(-1), " features but weight ",
                    weight.sizes(), " expects ", weight.size(1));
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), kOp, ": x and weight must be CPU tensors, got ",
                    x.device(), " and ", weight.device());
  TORCH_CHECK_VALUE(weight.size(1) <= 1 || weight.stride(1) == 1, kOp, ": weight must have unit stride in its last "
                    "dimension (strides ", weight.strides(), "); the kernel reads weights in place without copying");
  TORCH_CHECK_VALUE(weight.size(0) <= 1 || weight.stride(0) >= weight.size(1), kOp, ": weight rows overlap (strides ",
                    weight.strides(), " for shape ", weight.sizes(), ")");
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), kOp, ": bias is ", bias->scalar_type(),
                   " but weight is ", weight.scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": bias must be [N] = [",
                    weight.size(0), "], got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->device().is_cpu(), kOp, ": bias must be a CPU tensor, got ", bias->device());
}

// Compute-bound sizes: ATen's fp32 GEMM, 16-bit weights widened chunk by chunk (chunked_gemm.h).
at::Tensor gemm_linear(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (weight.scalar_type() == at::kFloat) return at::linear(x2, weight, bias);
  const int64_t C = weight.size(1);
  return chunked_fp32_gemm(x2, weight.size(0), [&](int64_t n0, int64_t rows, float* dst) {
    at::from_blob(dst, {rows, C}, x2.options().dtype(at::kFloat)).copy_(weight.narrow(0, n0, rows));
  }, bias);
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_args(x, weight, bias);
  const int64_t N = weight.size(0), C = weight.size(1);
  at::Tensor x2 = x.reshape({-1, C});
  if (C > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t T = x2.size(0);
  const int64_t bf16_gemm_rows = linear_bf16_gemm_min_rows();
  if (weight.scalar_type() == at::kBFloat16 && bf16_gemm_rows > 0 && T >= bf16_gemm_rows) {
    return at::linear(x2, weight, bias).view(out_shape);  // oneDNN's AMX GEMM: see runtime.cpp
  }
  const int64_t gemm_rows = linear_gemm_min_rows();
  if (gemm_rows > 0 && T >= gemm_rows) return gemm_linear(x2, weight, bias).view(out_shape);

  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  LinearWeights layer{to_dtype(weight.scalar_type()), N, C, weight.data_ptr(), weight.size(0) > 1 ? weight.stride(0) : C,
                      b.defined() ? b.data_ptr() : nullptr};
  LinearInput input{T, layer.dtype, x2.data_ptr(), T > 1 ? x2.stride(0) : C, C};
  if (x.scalar_type() == at::kBFloat16) {  // fp32 results in scratch, each row block rounded into out by its task
    at::Tensor out = at::empty({T, N}, x.options());
    const Fp32Scratch results(T * N);
    run_linear(layer, input, results.data(), N, step_parallel(), active_kernels(),
               Bf16Output{static_cast<BF16*>(out.data_ptr()), N});
    return out.view(out_shape);
  }
  at::Tensor out = at::empty({T, N}, x.options().dtype(at::kFloat));
  run_linear(layer, input, out.data_ptr<float>(), N, step_parallel(), active_kernels());
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_shape);
}

using CpuLinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

bool any_requires_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad());
}

// The op's autograd kernel for CPU tensors, in C++: a decode step calls the op hundreds of times, and
// the Python autograd kernel (ops/cpu_linear.py, still the one for other devices and for the reference
// path before this library loads) cost about 30 us a call even when nothing needs a gradient.
//   - No gradient needed (inference, no_grad): straight down to the kernels below autograd, modes
//     such as FakeTensor and functionalization included.
//   - A gradient needed: the same math in differentiable ATen ops (fp32 accumulation, one rounding),
//     so autograd records it as it records any linear.
at::Tensor cpu_linear_autograd(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, weight, bias)) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("dali::cpu_linear", "").typed<CpuLinearSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.redispatch(keys & c10::after_autograd_keyset, x, weight, bias);
  }
  check_args(x, weight, bias);
  at::Tensor out = at::matmul(x.to(at::kFloat), weight.to(at::kFloat).t());
  if (bias.has_value() && bias->defined()) out = at::add(out, bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace dali_cpu

TORCH_LIBRARY_IMPL(dali, CPU, m) { m.impl("cpu_linear", &dali_cpu::cpu_linear); }
TORCH_LIBRARY_IMPL(dali, AutogradCPU, m) { m.impl("cpu_linear", TORCH_FN(dali_cpu::cpu_linear_autograd)); }
