// dali::cpu_experts's CPU kernel as a C++ function, for the bindings that call it without the
// dispatcher (resident_layers.cpp). Arguments and result as in the schema (ops/cpu_experts.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace dali_cpu {

at::Tensor cpu_experts(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       const at::Tensor& up, const at::Tensor& down, const std::optional<at::Tensor>& up_bias,
                       const std::optional<at::Tensor>& down_bias, const std::optional<at::Tensor>& expert_mask,
                       bool gated, bool interleaved, bool transposed, c10::string_view activation, double alpha,
                       double limit, const std::optional<at::Tensor>& up_scales,
                       const std::optional<at::Tensor>& down_scales);

}  // namespace dali_cpu
