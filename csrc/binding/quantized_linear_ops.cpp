// ATen binding of the quantized linear kernel: dali::quantized_linear (schema and formats in
// ops/quantized_linear.py).
//
// # T rows (all leading dimensions of x flattened), N output features, C input features, G group size
//
// As dali::cpu_linear (linear_ops.cpp): up to linear_gemm_min_rows() - 1 rows the runtime's kernel
// reads the codes in place on the step's threads (decode: weight-bound, one read of every byte);
// from that many rows on, chunks of weight rows are dequantized to fp32 and multiplied by ATen's
// fp32 GEMM (compute-bound). With bf16 activations on a CPU with AMX-BF16, from
// quantized_bf16_gemm_min_rows(bits) rows on, blocks of weight rows are dequantized, rounded to bf16 and
// multiplied by ATen's bf16 GEMM instead (blocked_bf16_gemm): the bf16 linear's arithmetic on the
// bf16-rounded weights, as a bf16 model's own linears run there.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../core/quantized_linear.h"
#include "../core/runtime.h"
#include "aten_dtypes.h"
#include "chunked_gemm.h"
#include "decode_output.h"

namespace dali_cpu {
namespace {

constexpr const char* kOp = "dali::quantized_linear";

int64_t in_features(const at::Tensor& qweight, int64_t bits) { return qweight.size(1) * (bits == 4 ? 2 : 1); }

// The same checks, messages and exception types as check_args in ops/quantized_linear.py, plus the
// layout the kernel needs to read the tensors in place.
void check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, kOp, ": bits must be 8 or 4, got ", bits);
  const at::ScalarType code_type = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK_TYPE(qweight.dim() == 2 && qweight.scalar_type() == code_type, kOp, ": a ", bits,
                   "-bit qweight must be a 2-D ", code_type, " tensor, got ", qweight.scalar_type(), " of shape ",
                   qweight.sizes());
  const int64_t N = qweight.size(0), C = in_features(qweight, bits);
  TORCH_CHECK_VALUE(group_size >= 1 && C % group_size == 0 && (bits == 8 || group_size % 2 == 0), kOp,
                    ": group_size ", group_size, " must divide the ", C, " input features",
                    bits == 4 ? " and be even for 4 bits" : "");
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == N &&
                        scales.size(1) == C / group_size,
                    kOp, ": scales must be float16 [N, C / group_size] = [", N, ", ", C / group_size, "], got ",
                    scales.scalar_type(), " ", scales.sizes());
  core_dtype(x.scalar_type(), kOp, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == C, kOp, ": x has shape ", x.sizes(), " but the weight expects ", C,
                    " input features");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N, kOp,
                      ": bias must be [", N, "] in x's dtype ", x.scalar_type(), ", got ", bias->scalar_type(), " ",
                      bias->sizes());
  }
  const bool on_cpu = x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu() &&
                      (!bias.has_value() || bias->device().is_cpu());
  TORCH_CHECK_VALUE(on_cpu, kOp, ": x, qweight, scales and bias must be CPU tensors, got x on ", x.device(),
                    ", qweight on ", qweight.device(), ", scales on ", scales.device());
  // Rows may lie further apart than a row (a slice of a wider matrix); within a row the kernel needs
  // unit stride, as it reads the codes in place.
  TORCH_CHECK_VALUE(qweight.size(1) <= 1 || qweight.stride(1) == 1, kOp, ": qweight must have unit stride in its "
                    "last dimension (strides ", qweight.strides(), "); the kernel reads the codes in place");
  TORCH_CHECK_VALUE(N <= 1 || qweight.stride(0) >= qweight.size(1), kOp, ": qweight rows overlap (strides ",
                    qweight.strides(), " for shape ", qweight.sizes(), ")");
}

QuantizedWeights describe(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& bias, int64_t bits,
                          int64_t group_size, DType dtype) {
  const int64_t N = qweight.size(0);
  const QuantizedRows rows{qweight.data_ptr(), N > 1 ? qweight.stride(0) : qweight.size(1),
                           static_cast<const F16*>(scales.data_ptr()), N > 1 ? scales.stride(0) : scales.size(1),
                           group_size};
  return QuantizedWeights{static_cast<int>(bits), N, in_features(qweight, bits), rows, dtype,
                          bias.defined() ? bias.data_ptr() : nullptr};
}

// Weight rows [n0, n0 + rows) dequantized into dst (on the step's threads): fp32 for a FillWeightRows, rounded to
// bf16 for a FillBf16Rows (dst's type picks dequantize_weight_rows' overload).
auto dequantized_rows(const QuantizedWeights& layer) {
  return [&layer](int64_t n0, int64_t rows, auto* dst) {
    dequantize_weight_rows(layer, n0, rows, dst, layer.in_features, step_parallel(), active_kernels());
  };
}

// Compute-bound sizes: weight rows dequantized chunk by chunk, then ATen's fp32 GEMM.
at::Tensor gemm_quantized_linear(const at::Tensor& x2, const QuantizedWeights& layer,
                                 const std::optional<at::Tensor>& bias) {
  return chunked_fp32_gemm(x2, layer.out_features, dequantized_rows(layer), bias);
}

// Compute-bound sizes with bf16 activations where ATen's bf16 GEMM is fast (AMX): x2 (x, or int4's rounded
// activations, in fp32) rounded to bf16, blocks of dequantized rows rounded to bf16; the bias is added to the
// fp32 widening of the bf16 products, then one rounding to bf16.
at::Tensor bf16_gemm_quantized_linear(const at::Tensor& x2, const QuantizedWeights& layer,
                                      const std::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({x2.size(0), layer.out_features}, x2.options().dtype(at::kFloat));
  blocked_bf16_gemm(x2.to(at::kBFloat16), layer.out_features, dequantized_rows(layer), out);
  if (bias.has_value()) out.add_(*bias);
  return out.to(at::kBFloat16);
}

// x2 [T, C] (rows with unit column stride) as the dense drivers read it.
LinearInput input_of(const at::Tensor& x2) {
  const int64_t T = x2.size(0), C = x2.size(1);
  return LinearInput{T, core_dtype(x2.scalar_type(), kOp, "x"), x2.data_ptr(), T > 1 ? x2.stride(0) : C, C};
}

// Quantized weights multiply activations rounded to int8 per row and group (activation_group, kernels.h;
// round_activations in ops/quantized_linear.py): x widened into xs [T, C] and rounded there (x' = xq * s, what the
// GEMM paths multiply), the codes (what the integer kernels multiply) in `codes`.
void round_activations_into(const LinearInput& x, int64_t group, float* xs, Int8Rows& codes) {
  const KernelTable& kernels = active_kernels();
  widen_rows(x, kernels, xs);
  codes.resize(x.rows, x.features, group);
  codes.round_rows(kernels, xs, 0, x.rows, x.features, group);
}

// x' [T, C] fp32 of x2 [T, C], for the GEMM paths and the autograd kernel.
at::Tensor rounded_activations(const at::Tensor& x2, int64_t group) {
  const at::Tensor x = x2.size(1) <= 1 || x2.stride(1) == 1 ? x2 : x2.contiguous();
  at::Tensor rounded = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  Int8Rows codes;
  round_activations_into(input_of(x), group, rounded.data_ptr<float>(), codes);
  return rounded;
}

// Decode sizes: the streaming kernels on the pool. The activations are widened and rounded to int8 in the
// thread's scratch (not a tensor per call), bf16 results rounded into the output by each task (decode_output.h).
at::Tensor decode_quantized_linear(const at::Tensor& x2, const QuantizedWeights& layer, int64_t group_size,
                                   at::ScalarType dtype) {
  const int64_t T = x2.size(0), N = layer.out_features, C = layer.in_features;
  const int64_t x_group = activation_group(layer.bits, C, group_size);
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor out = at::empty({T, N}, x2.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const Fp32Scratch scratch((bf16 ? T * N : 0) + (x_group > 0 ? T * C : 0));
  float* results = bf16 ? scratch.data() : out.data_ptr<float>();
  const Bf16Output rounded = bf16 ? Bf16Output{static_cast<BF16*>(out.data_ptr()), N} : Bf16Output{};
  LinearInput input = input_of(x2);
  std::optional<Int8Activations> view;
  if (x_group > 0) {
    float* xs = scratch.data() + (bf16 ? T * N : 0);
    thread_local Int8Rows codes;  // decode sizes: kept for the thread's next call
    round_activations_into(input, x_group, xs, codes);
    view = codes.view(C, x_group);
    input = LinearInput{T, DType::kF32, xs, C, C};
  }
  run_quantized_linear(layer, input, results, N, step_parallel(), active_kernels(), view ? &*view : nullptr, rounded);
  return bf16 || dtype == at::kFloat ? out : out.to(dtype);
}

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size) {
  check_args(x, qweight, scales, bias, bits, group_size);
  const int64_t N = qweight.size(0), C = in_features(qweight, bits);
  at::Tensor x2 = x.reshape({-1, C});
  if (C > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  // Scales are small (one per group): a contiguous copy, if ever needed, costs nothing next to the codes.
  const at::Tensor s = scales.size(1) <= 1 || scales.stride(1) == 1 ? scales : scales.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dtype = core_dtype(x.scalar_type(), kOp, "x");
  const QuantizedWeights layer = describe(qweight, s, b, bits, group_size, dtype);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t T = x2.size(0);
  const int64_t bf16_gemm_rows = quantized_bf16_gemm_min_rows(static_cast<int>(bits));
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && bf16_gemm_rows > 0 && T >= bf16_gemm_rows;
  const int64_t gemm_rows = linear_gemm_min_rows();
  if (!bf16_gemm && !(gemm_rows > 0 && T >= gemm_rows)) {
    return decode_quantized_linear(x2, layer, group_size, x.scalar_type()).view(out_shape);
  }
  const int64_t x_group = activation_group(static_cast<int>(bits), C, group_size);
  if (x_group > 0) x2 = rounded_activations(x2, x_group);  // the GEMMs multiply x'
  if (bf16_gemm) return bf16_gemm_quantized_linear(x2, layer, bias).view(out_shape);
  return gemm_quantized_linear(x2, layer, bias).to(x.scalar_type()).view(out_shape);
}

// The whole weight in fp32 [N, C], for the autograd path (a constant: the op has no gradient w.r.t.
// the codes).
at::Tensor dequantized_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  const at::Tensor s = scales.contiguous();
  const QuantizedWeights layer = describe(qweight, s, at::Tensor(), bits, group_size, DType::kF32);
  at::Tensor w = at::empty({layer.out_features, layer.in_features}, scales.options().dtype(at::kFloat));
  dequantize_weight_rows(layer, 0, layer.out_features, w.data_ptr<float>(), layer.in_features, step_parallel(),
                         active_kernels());
  return w;
}

using QuantizedLinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, int64_t, int64_t);

// The op's autograd kernel for CPU tensors, in C++ like cpu_linear_autograd (linear_ops.cpp):
//   - No gradient needed (inference, no_grad): straight down to the kernels below autograd.
//   - x or bias needs one: the same math in differentiable ATen ops on the dequantized weight (fp32
//     accumulation, one rounding), so autograd records it as it records any linear. The codes are
//     integers and carry no gradient; a gradient w.r.t. the scales is not supported (a clear error).
//     The rounding of x to int8 passes the gradient straight through (x + (x' - x).detach()).
at::Tensor quantized_linear_autograd(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& qweight,
                                     const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                                     int64_t group_size) {
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  const bool needs_grad = x.requires_grad() || bias_grad || scales.requires_grad();
  if (!at::GradMode::is_enabled() || !needs_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dali::quantized_linear", "")
                               .typed<QuantizedLinearSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.redispatch(keys & c10::after_autograd_keyset, x, qweight, scales, bias, bits, group_size);
  }
  TORCH_CHECK_VALUE(!scales.requires_grad(), kOp, ": no gradient with respect to scales; detach them (the op "
                    "differentiates through x and bias only)");
  check_args(x, qweight, scales, bias, bits, group_size);
  at::Tensor weight;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    weight = dequantized_weight(qweight, scales, bits, group_size);
  }
  at::Tensor x_float = x.to(at::kFloat);
  const int64_t C = in_features(qweight, bits);
  const int64_t x_group = activation_group(static_cast<int>(bits), C, group_size);
  if (x_group > 0) {
    at::Tensor rounded;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::Tensor x2 = x.detach().reshape({-1, C});
      rounded = rounded_activations(x2, x_group).view(x.sizes());
    }
    x_float = at::add(x_float, at::sub(rounded, x_float.detach()));
  }
  at::Tensor out = at::matmul(x_float, weight.t());
  if (bias.has_value() && bias->defined()) out = at::add(out, bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace dali_cpu

TORCH_LIBRARY_IMPL(dali, CPU, m) { m.impl("quantized_linear", &dali_cpu::quantized_linear); }
TORCH_LIBRARY_IMPL(dali, AutogradCPU, m) {
  m.impl("quantized_linear", TORCH_FN(dali_cpu::quantized_linear_autograd));
}
