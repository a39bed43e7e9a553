// ATen binding of the CPU expert runtime: tensor checks and unpacking, then the torch-free core.
// The schemas are declared once, in Python (ops/cpu_experts.py); this file only registers the CPU
// kernels of dali::cpu_experts, dali::cpu_experts_submit and dali::cpu_experts_wait.
//
// # T tokens, K top-k, E experts, H hidden, I intermediate, X = 2I (gated) or I
// Narrow ATen headers (not ATen/ATen.h): this file dominates the extension's build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "../core/experts.h"
#include "../core/runtime.h"
#include "aten_dtypes.h"
#include "chunked_gemm.h"
#include "cpu_experts_call.h"

namespace dali_cpu {
namespace {

// Everything one call needs, with the tensors it reads kept alive for as long as a job may run.
struct PreparedCall {
  ExpertWeights layer;
  Routing routing;
  at::Tensor hidden, ids, weights, mask, up, down, up_bias, down_bias, up_scales, down_scales;
  std::vector<float> widened_weights;  // 16-bit routing weights in fp32 (`weights` is then unused)
  at::Tensor out;  // [T, K, H] fp32
};

// The routing weights in fp32 for the call: fp32 ones as they are (contiguous), bf16 and fp16 ones widened here
// by the kernel table (exact) rather than by an ATen conversion per call (a tensor and a dispatch per MoE layer
// of a decode step).
const float* routing_weights_fp32(const at::Tensor& topk_weights, PreparedCall& call) {
  const at::ScalarType dtype = topk_weights.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    call.weights = topk_weights.to(at::kFloat).contiguous();
    return call.weights.data_ptr<float>();
  }
  call.weights = topk_weights.contiguous();
  call.widened_weights.resize(static_cast<size_t>(call.weights.numel()));
  active_kernels().convert(core_dtype(dtype, "dali::cpu_experts", "topk_weights"), call.weights.data_ptr(),
                           call.weights.numel(), call.widened_weights.data());
  return call.widened_weights.data();
}

// ATen's fp32 GEMM (MKL/oneDNN, its own threads) for experts with many tokens; see DenseGemm.
// Up to transposed_gemm_max_rows() rows it computes c^T = b^T . a^T (the weights as the left
// operand, MKL's faster form there) into a per-thread buffer, then copies c^T's transpose into c.
void aten_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, bool b_kn, float* c, int64_t ldc, int64_t m,
               int64_t n, int64_t k) {
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor lhs = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, fp32);
  const at::Tensor rhs = b_kn ? at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, fp32)
                              : at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, fp32).t();
  at::Tensor result = at::from_blob(c, {m, n}, {ldc, 1}, fp32);
  if (m > transposed_gemm_max_rows()) {
    at::mm_out(result, lhs, rhs);
    return;
  }
  // Never destroyed: a thread_local tensor's destructor could run after ATen's at process exit.
  thread_local at::Tensor* buffer = new at::Tensor();
  if (!buffer->defined() || buffer->numel() < m * n) {
    *buffer = at::empty({m * n}, fp32);
    advise_huge_pages(buffer->data_ptr(), buffer->nbytes());
  }
  at::Tensor transposed = buffer->narrow(0, 0, m * n).view({n, m});
  at::mm_out(transposed, rhs.t(), lhs.t());
  result.copy_(transposed.t());
}

// ATen's 16-bit GEMM on the weights as stored (see DenseGemm::fn16): oneDNN's AMX path for bf16. The
// activations are rounded to the weights' dtype and the product comes back in it, as a 16-bit linear's would.
void aten_gemm16(const float* a, int64_t lda, DType b_dtype, const void* b, int64_t ldb, bool b_kn, float* c,
                 int64_t ldc, int64_t m, int64_t n, int64_t k) {
  const at::ScalarType half = b_dtype == DType::kBF16 ? at::kBFloat16 : at::kHalf;
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor lhs = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, fp32).to(half);
  void* w = const_cast<void*>(b);
  const at::Tensor rhs = b_kn ? at::from_blob(w, {k, n}, {ldb, 1}, fp32.dtype(half))
                              : at::from_blob(w, {n, k}, {ldb, 1}, fp32.dtype(half)).t();
  at::from_blob(c, {m, n}, {ldc, 1}, fp32).copy_(at::mm(lhs, rhs));
}

// ATen's bf16 GEMM for a quantized expert with bf16 hidden states (see DenseGemm::fn16_filled): the activations
// rounded to bf16 once, the weight rows dequantized, rounded and multiplied block by block (chunked_gemm.h).
void aten_gemm16_filled(const float* a, int64_t lda, const std::function<void(int64_t, int64_t, BF16*)>& fill,
                        float* c, int64_t ldc, int64_t m, int64_t n, int64_t k) {
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor lhs = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, fp32).to(at::kBFloat16);
  blocked_bf16_gemm(lhs, n, fill, at::from_blob(c, {m, n}, {ldc, 1}, fp32));
}

// at::parallel_for: the element-wise steps between two aten_gemm calls share the GEMM's threads.
void aten_parallel(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i);
  });
}

// Synchronous calls run on step_parallel() (ATen's threads, shared with the rest of the step), async
// jobs on the runtime's own pool: they run beside the caller's thread, which meanwhile drives the GPU.
void run(const PreparedCall& call, Parallel& parallel) {
  run_experts(call.layer, call.routing, call.out.data_ptr<float>(), parallel, active_kernels(),
              DenseGemm{&aten_gemm, dense_gemm_min_tokens(), &aten_parallel, &aten_gemm16, bf16_gemm_min_tokens(),
                        &aten_gemm16_filled, quantized_bf16_gemm_min_rows(call.layer.bits)});
}

DType weight_dtype(const at::Tensor& t, const char* op) { return core_dtype(t.scalar_type(), op, "expert weights"); }

std::string layout_name(bool gated, bool interleaved, bool transposed) {
  std::string name = gated ? (interleaved ? "gated, interleaved" : "gated, concatenated") : "no-gate";
  return transposed ? name + ", transposed" : name;
}

// Weights are read in place, never copied: only the innermost dimension must be contiguous.
// Loads are unaligned, so any element-aligned address (every tensor's) is fine.
void check_in_place_readable(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have unit stride in its last dimension (strides ", t.strides(),
                    "); the kernel reads weights in place without copying them. For a [E, H, X] "
                    "layout pass transposed=True, otherwise call .contiguous() once when loading");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* op,
                 const std::string& layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), " but ", expected,
                    " was expected for layout (", layout, ")");
}

// Quantized experts: bits from the codes' dtype (int8: 8, uint8: 4); 0 without scales.
int code_bits(const at::Tensor& up, const at::Tensor& down, const std::optional<at::Tensor>& up_scales,
              const std::optional<at::Tensor>& down_scales, bool transposed, const char* op) {
  if (!up_scales.has_value() && !down_scales.has_value()) return 0;
  TORCH_CHECK_VALUE(up_scales.has_value() && down_scales.has_value(), op,
                    ": quantized experts need both up_scales and down_scales");
  TORCH_CHECK_TYPE((up.scalar_type() == at::kChar || up.scalar_type() == at::kByte) &&
                       down.scalar_type() == up.scalar_type(),
                   op, ": quantized expert codes must both be int8 or both uint8 (int4), got ", up.scalar_type(),
                   " and ", down.scalar_type());
  TORCH_CHECK_VALUE(!transposed, op, ": quantized experts are stored in row form (transposed=False)");
  return up.scalar_type() == at::kChar ? 8 : 4;
}

// The scales of `rows` quantized rows of `columns` columns each: float16 [E, rows, columns / G]; returns G.
int64_t check_scales(const at::Tensor& scales, int64_t E, int64_t rows, int64_t columns, int bits, const char* name,
                     const char* op) {
  const int64_t groups = scales.dim() == 3 ? scales.size(2) : 0;
  const int64_t group = groups > 0 ? columns / groups : 0;
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.size(0) == E &&
                        scales.size(1) == rows && group > 0 && group * groups == columns && (bits == 8 || group % 2 == 0),
                    op, ": ", name, " must be float16 [", E, ", ", rows, ", ", columns, " / G] for a group size G dividing ",
                    columns, (bits == 4 ? " (even for int4)" : ""), ", got ", scales.scalar_type(), " ", scales.sizes());
  check_in_place_readable(scales, name, op);
  return group;
}

std::shared_ptr<PreparedCall> prepare(const char* op, const at::Tensor& hidden, const at::Tensor& topk_ids,
                                      const at::Tensor& topk_weights, const at::Tensor& up, const at::Tensor& down,
                                      const std::optional<at::Tensor>& up_bias,
                                      const std::optional<at::Tensor>& down_bias,
                                      const std::optional<at::Tensor>& expert_mask, bool gated, bool interleaved,
                                      bool transposed, c10::string_view activation, double alpha, double limit,
                                      const std::optional<at::Tensor>& up_scales,
                                      const std::optional<at::Tensor>& down_scales) {
  auto call = std::make_shared<PreparedCall>();
  ExpertWeights& L = call->layer;
  Routing& R = call->routing;

  // Routing tensors.
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be [T, H], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == hidden.size(0), op,
                    ": topk_ids must be [T, K] with T = ", hidden.size(0), " tokens, got shape ", topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_ids.sizes(), op, ": topk_weights must have the shape of topk_ids ",
                    topk_ids.sizes(), ", got ", topk_weights.sizes());
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, op,
                   ": topk_ids must be int64 or int32, got ", topk_ids.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(topk_weights.scalar_type()), op, ": topk_weights must be floating point, got ",
                   topk_weights.scalar_type());

  // Weights: dtype, then shapes derived from down (which holds both H and I).
  TORCH_CHECK_VALUE(up.dim() == 3 && down.dim() == 3, op, ": expert weights must be 3-D, got up ", up.sizes(),
                    " and down ", down.sizes());
  L.bits = code_bits(up, down, up_scales, down_scales, transposed, op);
  if (L.bits != 0) {
    L.dtype = core_dtype(hidden.scalar_type(), op, "hidden");
  } else {
    L.dtype = weight_dtype(up, op);
    TORCH_CHECK_TYPE(down.scalar_type() == up.scalar_type(), op, ": up is ", up.scalar_type(), " but down is ",
                     down.scalar_type(), "; both expert weights must share one dtype");
    TORCH_CHECK_TYPE(hidden.scalar_type() == up.scalar_type(), op, ": hidden is ", hidden.scalar_type(),
                     " but the expert weights are ", up.scalar_type(), "; they must have the same dtype");
  }
  L.bias_dtype = L.dtype;
  TORCH_CHECK_VALUE(!interleaved || gated, op, ": an interleaved gate/up layout needs gated=True");
  const std::string act_name(activation.data(), activation.size());
  TORCH_CHECK_VALUE(parse_activation(act_name.c_str(), &L.activation), op, ": unknown activation '", act_name,
                    "'; known: silu, gelu, gelu_tanh, relu, relu2, quick_gelu, clamped_swiglu, clamped_silu");
  TORCH_CHECK_VALUE((L.activation != Activation::kClampedSwiglu && L.activation != Activation::kClampedSilu) || gated,
                    op, ": clamped_swiglu and clamped_silu are gated activations (gated=True)");

  const std::string layout = layout_name(gated, interleaved, transposed);
  const int64_t E = up.size(0);
  const int64_t H = transposed ? down.size(2) : down.size(1);
  const int64_t I = (transposed ? down.size(1) : down.size(2)) * (L.bits == 4 ? 2 : 1);
  const int64_t X = gated ? 2 * I : I;
  TORCH_CHECK_VALUE(hidden.size(1) == H, op, ": hidden size ", hidden.size(1), " does not match the experts' ", H,
                    " (down ", down.sizes(), ", layout ", layout, ")");
  // Quantized codes: rows of columns * bits / 8 bytes.
  const auto columns = [&](int64_t n) { return L.bits == 0 ? n : n * L.bits / 8; };
  check_shape(down, transposed ? at::IntArrayRef{E, I, H} : at::IntArrayRef{E, H, columns(I)}, "down", op, layout);
  check_shape(up, transposed ? at::IntArrayRef{E, H, X} : at::IntArrayRef{E, X, columns(H)}, "up", op, layout);
  if (L.bits != 0) {
    L.up_group = check_scales(*up_scales, E, X, H, L.bits, "up_scales", op);
    L.down_group = check_scales(*down_scales, E, H, I, L.bits, "down_scales", op);
  }
  check_in_place_readable(up, "up", op);
  check_in_place_readable(down, "down", op);
  for (const auto& [bias, width, name] :
       {std::tuple{&up_bias, X, "up_bias"}, std::tuple{&down_bias, H, "down_bias"}}) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    TORCH_CHECK_TYPE(b.scalar_type() == hidden.scalar_type(), op, ": ", name, " is ", b.scalar_type(),
                     " but hidden is ", hidden.scalar_type(), "; the expert biases are in hidden's dtype");
    check_shape(b, {E, width}, name, op, layout);
    check_in_place_readable(b, name, op);
  }
  if (expert_mask.has_value()) {
    TORCH_CHECK_TYPE(expert_mask->scalar_type() == at::kBool, op, ": expert_mask must be bool, got ",
                     expert_mask->scalar_type());
    TORCH_CHECK_VALUE(expert_mask->dim() == 1 && expert_mask->size(0) == E, op, ": expert_mask must be [E] = [", E,
                      "], got ", expert_mask->sizes());
  }
  for (const at::Tensor* t : {&hidden, &topk_ids, &topk_weights, &up, &down}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  }
  for (const std::optional<at::Tensor>* t : {&up_bias, &down_bias, &expert_mask, &up_scales, &down_scales}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ",
                      (*t)->device());
  }

  // Small tensors are normalised (copies are cheap); the weights are not.
  call->hidden = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  call->ids = topk_ids.to(at::kLong).contiguous();
  const float* routing_weights = routing_weights_fp32(topk_weights, *call);
  if (expert_mask.has_value()) call->mask = expert_mask->contiguous();
  call->up = up;
  call->down = down;
  if (up_bias.has_value()) call->up_bias = *up_bias;
  if (down_bias.has_value()) call->down_bias = *down_bias;
  if (L.bits != 0) {
    call->up_scales = *up_scales;
    call->down_scales = *down_scales;
  }

  const int64_t* ids = call->ids.data_ptr<int64_t>();
  for (int64_t s = 0, n = call->ids.numel(); s < n; ++s) {
    TORCH_CHECK_INDEX(ids[s] >= 0 && ids[s] < E, op, ": expert id ", ids[s], " (topk_ids.flatten()[", s,
                      "]) is out of range for ", E, " experts");
  }

  L.num_experts = E;
  L.hidden = H;
  L.intermediate = I;
  L.gated = gated;
  L.interleaved = interleaved;
  L.transposed = transposed;
  L.alpha = static_cast<float>(alpha);
  L.limit = static_cast<float>(limit);
  L.up = up.data_ptr();
  L.up_expert_stride = up.stride(0);
  L.up_row_stride = up.stride(1);
  L.down = down.data_ptr();
  L.down_expert_stride = down.stride(0);
  L.down_row_stride = down.stride(1);
  L.up_bias = call->up_bias.defined() ? call->up_bias.data_ptr() : nullptr;
  L.up_bias_stride = call->up_bias.defined() ? call->up_bias.stride(0) : 0;
  L.down_bias = call->down_bias.defined() ? call->down_bias.data_ptr() : nullptr;
  L.down_bias_stride = call->down_bias.defined() ? call->down_bias.stride(0) : 0;
  if (L.bits != 0) {  // int8 / uint8 codes: element strides are byte strides
    L.up_scales = reinterpret_cast<const F16*>(call->up_scales.data_ptr());
    L.up_scales_expert_stride = call->up_scales.stride(0);
    L.up_scales_row_stride = call->up_scales.stride(1);
    L.down_scales = reinterpret_cast<const F16*>(call->down_scales.data_ptr());
    L.down_scales_expert_stride = call->down_scales.stride(0);
    L.down_scales_row_stride = call->down_scales.stride(1);
  }

  R.tokens = hidden.size(0);
  R.top_k = topk_ids.size(1);
  R.hidden_dtype = L.dtype;
  R.hidden = call->hidden.data_ptr();
  R.hidden_stride = call->hidden.stride(0);
  R.ids = ids;
  R.weights = routing_weights;
  R.expert_mask = call->mask.defined() ? call->mask.data_ptr<bool>() : nullptr;

  call->out = at::empty({R.tokens, R.top_k, H}, hidden.options().dtype(at::kFloat));
  advise_huge_pages(call->out.data_ptr(), call->out.nbytes());
  return call;
}


// Handle 0 is the empty job: no slot was selected for the CPU, so there is nothing to run and the
// result is all zeros. It is the only handle that may be waited on more than once.
constexpr int64_t kEmptyJob = 0;

// The tensors a job reads, in schema order; dali::cpu_experts_wait takes them all again, so that a
// compiled graph keeps them live and unchanged until the job is done (see ops/cpu_experts.py).
constexpr const char* kInputNames[] = {"hidden",    "topk_ids",    "topk_weights", "up",        "down",
                                       "up_bias",   "down_bias",   "expert_mask",  "up_scales", "down_scales"};
constexpr size_t kNumInputs = sizeof(kInputNames) / sizeof(kInputNames[0]);

// What the wait compares: the very tensor (data_ptr and shape), or absent for an optional one.
struct InputIdentity {
  bool present = false;
  const void* data = nullptr;
  std::vector<int64_t> sizes;

  explicit InputIdentity(const at::Tensor* t) {
    if (t == nullptr) return;
    present = true;
    data = t->data_ptr();
    sizes = t->sizes().vec();
  }
  bool operator==(const InputIdentity& o) const {
    return present == o.present && data == o.data && sizes == o.sizes;
  }
};

using InputIdentities = std::array<InputIdentity, kNumInputs>;

std::ostream& operator<<(std::ostream& out, const InputIdentity& id) {
  if (!id.present) return out << "absent";
  return out << "(" << id.data << ", " << at::IntArrayRef(id.sizes) << ")";
}

const at::Tensor* present(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

InputIdentities identities(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                           const at::Tensor& up, const at::Tensor& down, const std::optional<at::Tensor>& up_bias,
                           const std::optional<at::Tensor>& down_bias, const std::optional<at::Tensor>& expert_mask,
                           const std::optional<at::Tensor>& up_scales, const std::optional<at::Tensor>& down_scales) {
  return {InputIdentity(&hidden),           InputIdentity(&topk_ids),
          InputIdentity(&topk_weights),     InputIdentity(&up),
          InputIdentity(&down),             InputIdentity(present(up_bias)),
          InputIdentity(present(down_bias)), InputIdentity(present(expert_mask)),
          InputIdentity(present(up_scales)), InputIdentity(present(down_scales))};
}

// What a job hands its waiter: the output, and the inputs the submit was given to check the wait's against.
struct JobResult {
  at::Tensor out;  // [T, K, H] fp32
  InputIdentities inputs;
};

at::Tensor cpu_experts_submit(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& up, const at::Tensor& down, const std::optional<at::Tensor>& up_bias,
                              const std::optional<at::Tensor>& down_bias,
                              const std::optional<at::Tensor>& expert_mask, bool gated, bool interleaved,
                              bool transposed, c10::string_view activation, double alpha, double limit,
                              const std::optional<at::Tensor>& up_scales,
                              const std::optional<at::Tensor>& down_scales) {
  auto call = prepare("dali::cpu_experts_submit", hidden, topk_ids, topk_weights, up, down, up_bias, down_bias,
                      expert_mask, gated, interleaved, transposed, activation, alpha, limit, up_scales, down_scales);
  int64_t handle = kEmptyJob;
  if (any_selected(call->routing)) {
    // The closure owns `call` (and so every input tensor) until the job has run: the caller may drop
    // its references. The payload hands the output to the waiter, with what the wait checks.
    auto result = std::make_shared<JobResult>(JobResult{
        call->out,
        identities(hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask, up_scales, down_scales)});
    handle = global_jobs().submit([call] { run(*call, global_pool()); }, result);
  }
  return at::full({1}, handle, at::TensorOptions().dtype(at::kLong));
}

at::Tensor cpu_experts_wait(const at::Tensor& handle, const at::Tensor& hidden, const at::Tensor& topk_ids,
                            const at::Tensor& topk_weights, const at::Tensor& up, const at::Tensor& down,
                            const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& down_bias,
                            const std::optional<at::Tensor>& expert_mask, const std::optional<at::Tensor>& up_scales,
                            const std::optional<at::Tensor>& down_scales) {
  constexpr const char* op = "dali::cpu_experts_wait";
  TORCH_CHECK_VALUE(handle.scalar_type() == at::kLong && handle.numel() == 1 && handle.device().is_cpu(), op,
                    ": handle must be the int64 [1] CPU tensor returned by dali::cpu_experts_submit, got ",
                    handle.scalar_type(), " ", handle.sizes(), " on ", handle.device());
  TORCH_CHECK_VALUE(hidden.dim() == 2 && topk_ids.dim() == 2 && topk_ids.size(0) == hidden.size(0), op,
                    ": hidden must be [T, H] and topk_ids [T, K], got ", hidden.sizes(), " and ", topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_ids.sizes(), op, ": topk_weights must have the shape of topk_ids ",
                    topk_ids.sizes(), ", got ", topk_weights.sizes());
  const int64_t h = handle.item<int64_t>();
  if (h == kEmptyJob) {
    return at::zeros({hidden.size(0), topk_ids.size(1), hidden.size(1)}, hidden.options().dtype(at::kFloat));
  }
  std::shared_ptr<void> payload;
  try {
    payload = global_jobs().wait(h);
  } catch (const BadHandle& e) {
    TORCH_CHECK_VALUE(false, op, ": ", e.what());
  }
  // The job is consumed either way: a mismatch below is the caller's error, reported once.
  const JobResult& result = *std::static_pointer_cast<JobResult>(payload);
  const InputIdentities given =
      identities(hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask, up_scales, down_scales);
  for (size_t i = 0; i < kNumInputs; ++i) {
    TORCH_CHECK_VALUE(given[i] == result.inputs[i], op, ": ", kInputNames[i],
                      " is not the tensor given to dali::cpu_experts_submit for handle ", h,
                      " ((data_ptr, shape) submitted ", result.inputs[i], ", waited with ", given[i],
                      "); pass the submit's very tensors, so that they stay alive and unchanged until the job has "
                      "read them");
  }
  return result.out;
}

}  // namespace

at::Tensor cpu_experts(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       const at::Tensor& up, const at::Tensor& down, const std::optional<at::Tensor>& up_bias,
                       const std::optional<at::Tensor>& down_bias, const std::optional<at::Tensor>& expert_mask,
                       bool gated, bool interleaved, bool transposed, c10::string_view activation, double alpha,
                       double limit, const std::optional<at::Tensor>& up_scales,
                       const std::optional<at::Tensor>& down_scales) {
  auto call = prepare("dali::cpu_experts", hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask,
                      gated, interleaved, transposed, activation, alpha, limit, up_scales, down_scales);
  run(*call, step_parallel());
  return call->out;
}

}  // namespace dali_cpu

TORCH_LIBRARY_IMPL(dali, CPU, m) {
  m.impl("cpu_experts", &dali_cpu::cpu_experts);
  m.impl("cpu_experts_submit", &dali_cpu::cpu_experts_submit);
  m.impl("cpu_experts_wait", &dali_cpu::cpu_experts_wait);
}
