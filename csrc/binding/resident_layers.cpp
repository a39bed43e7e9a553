// dali::moe_hybrid without Python for layers whose experts all live in host memory.
//
// The op's CPU kernel is Python (ops/moe_hybrid.py): it resolves the integer layer handle in the
// layer registry, sends an offloaded layer to its hybrid runtime and words every error. That costs
// about 120 us a call, 6 ms a token for a 48-layer model at decode. Here, the Python kernel publishes
// each layer it found resident (registered, no runtime attached, no per-thread redirect) into a table
// of weak tensor references; later calls of that layer are served from the table by this kernel,
// registered for AutogradCPU so it runs before the Python one, with the same arithmetic
// (dali::cpu_experts, then the sum over k in fp32, rounded once to hidden's dtype: sum_over_k).
//
// Anything else goes down to the Python kernel, unchanged:
//   - a handle not in the table: the registry forgets the whole table whenever a layer is dropped,
//     rebound, attached to or detached from a runtime (ops/moe_hybrid.py), and publishes under its lock;
//   - while any thread is inside a registry redirect (another model instance behind the same graph);
//   - tensors freed since publication (weak references), inputs the Python kernel would refuse (it
//     raises the error a user should see), an id out of range (the Python kernel names the layer);
//   - FakeTensor or any other mode or key between autograd and the CPU kernel, and gradients (the
//     Python kernel warns that the op has none).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>

#include "../core/runtime.h"
#include "cpu_experts_call.h"
#include "decode_output.h"

namespace dali_cpu {
namespace {

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl>;

struct ResidentLayer {
  // biases: empty when the layer has none; scales: empty unless the experts are quantized
  std::optional<WeakTensor> up, down, up_bias, down_bias, up_scales, down_scales;
  at::ScalarType dtype = at::kFloat;  // of the activations the layer takes (LayerSpec.dtype)
  bool gated = false, interleaved = false, transposed = false;
  std::string activation;
  double alpha = 0.0, limit = 0.0;
};

std::shared_mutex g_mutex;
std::unordered_map<int64_t, ResidentLayer> g_layers;
// Registry redirects active in the process (any thread): published layers are not used meanwhile.
std::atomic<int> g_redirects{0};

WeakTensor weak_from_impl(std::intptr_t impl) {
  // `impl` is Tensor._cdata of a tensor the caller keeps alive for the duration of the call.
  auto strong = c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(reinterpret_cast<c10::TensorImpl*>(impl));
  return WeakTensor(strong);
}

std::optional<at::Tensor> lock(const std::optional<WeakTensor>& weak) {
  if (!weak.has_value()) return std::nullopt;
  auto strong = weak->lock();
  if (!strong) return std::nullopt;
  return at::Tensor(std::move(strong));
}

bool floating(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()); }

// Every check of the Python kernel (check_routing_shapes, check_against_layer) as a yes/no: the fast
// path only runs inputs the Python kernel would accept.
bool accepted(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& up,
              at::ScalarType dtype) {
  if (hidden.dim() != 2 || ids.dim() != 2 || weights.sizes() != ids.sizes()) return false;
  if (ids.size(0) != hidden.size(0) || !floating(hidden) || !floating(weights)) return false;
  if (ids.scalar_type() != at::kLong && ids.scalar_type() != at::kInt) return false;
  if (!hidden.device().is_cpu() || !ids.device().is_cpu() || !weights.device().is_cpu()) return false;
  if (hidden.scalar_type() != dtype || !up.device().is_cpu()) return false;
  return true;
}

// out[t] = the sum over k of contributions[t, k] ([T, K, H] fp32) as at::sum(contributions, {1}) adds them (its
// order: the Python kernel's), rounded once to `dtype`: the fp32 sum goes to scratch instead of a tensor of its
// own, and is rounded into out without an ATen conversion (decode_output.h).
at::Tensor sum_over_k(const at::Tensor& contributions, at::ScalarType dtype) {
  const int64_t T = contributions.size(0), H = contributions.size(2);
  if (dtype == at::kFloat) return at::sum(contributions, {1});
  const Fp32Scratch scratch(T * H);
  at::Tensor summed = at::from_blob(scratch.data(), {T, H}, contributions.options());
  at::sum_out(summed, contributions, {1});
  at::Tensor out = at::empty({T, H}, contributions.options().dtype(dtype));
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t element = out.element_size();
  const KernelTable& kernels = active_kernels();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, H));  // rows of ~32K values
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    store_rounded(scratch.data() + t0 * H, (t1 - t0) * H, dst + t0 * H * element, dtype, kernels);
  });
  return out;
}

std::optional<at::Tensor> serve(int64_t handle, const at::Tensor& hidden, const at::Tensor& ids,
                                const at::Tensor& weights) {
  ResidentLayer layer;
  {
    std::shared_lock<std::shared_mutex> read(g_mutex);
    auto it = g_layers.find(handle);
    if (it == g_layers.end()) return std::nullopt;
    layer = it->second;
  }
  auto up = lock(layer.up), down = lock(layer.down);
  if (!up || !down) return std::nullopt;
  std::optional<at::Tensor> up_bias, down_bias;
  if (layer.up_bias.has_value() && !(up_bias = lock(layer.up_bias))) return std::nullopt;
  if (layer.down_bias.has_value() && !(down_bias = lock(layer.down_bias))) return std::nullopt;
  std::optional<at::Tensor> up_scales, down_scales;
  if (layer.up_scales.has_value() && !(up_scales = lock(layer.up_scales))) return std::nullopt;
  if (layer.down_scales.has_value() && !(down_scales = lock(layer.down_scales))) return std::nullopt;
  if (!accepted(hidden, ids, weights, *up, layer.dtype)) return std::nullopt;
  // The hidden size: down's output rows (row form [E, H, I]; transposed [E, I, H]).
  const int64_t hidden_size = layer.transposed ? down->size(2) : down->size(1);
  if (hidden.size(1) != hidden_size) return std::nullopt;
  at::Tensor contributions;
  try {
    contributions = cpu_experts(hidden, ids, weights, *up, *down, up_bias, down_bias, std::nullopt, layer.gated,
                                layer.interleaved, layer.transposed, layer.activation, layer.alpha, layer.limit,
                                up_scales, down_scales);
  } catch (const c10::IndexError&) {
    return std::nullopt;  // an id out of range: the Python kernel raises it naming the layer
  }
  return sum_over_k(contributions, hidden.scalar_type());
}

using MoeHybridSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

at::Tensor moe_hybrid_resident(c10::DispatchKeySet keys, const at::Tensor& hidden, const at::Tensor& ids,
                               const at::Tensor& weights, int64_t layer) {
  const c10::DispatchKeySet below = keys & c10::after_autograd_keyset;
  const bool plain_cpu = below.highestPriorityTypeId() == c10::DispatchKey::CPU;
  const bool needs_grad = at::GradMode::is_enabled() && (hidden.requires_grad() || weights.requires_grad());
  if (plain_cpu && !needs_grad && g_redirects.load(std::memory_order_acquire) == 0) {
    if (auto out = serve(layer, hidden, ids, weights)) return *out;
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dali::moe_hybrid", "").typed<MoeHybridSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(below, hidden, ids, weights, layer);
}

}  // namespace
}  // namespace dali_cpu

TORCH_LIBRARY_IMPL(dali, AutogradCPU, m) {
  m.impl("moe_hybrid", TORCH_FN(dali_cpu::moe_hybrid_resident));
}

extern "C" {

// Publishes layer `handle` (Tensor._cdata of each tensor; 0 for an absent bias or scale) taking activations
// of `dtype` ("float32", "bfloat16" or "float16"). 0 on success.
int dali_cpu_resident_publish(int64_t handle, std::intptr_t up, std::intptr_t down, std::intptr_t up_bias,
                              std::intptr_t down_bias, std::intptr_t up_scales, std::intptr_t down_scales,
                              const char* dtype, int gated, int interleaved, int transposed, const char* activation,
                              double alpha, double limit) {
  return dali_cpu::call_guarded(dali_cpu::kCppException, [&] {
    dali_cpu::ResidentLayer layer;
    const std::string dtype_name(dtype);
    TORCH_CHECK_VALUE(dtype_name == "float32" || dtype_name == "bfloat16" || dtype_name == "float16",
                      "dali_cpu_resident_publish: unknown dtype ", dtype_name);
    layer.dtype = dtype_name == "float32" ? at::kFloat : dtype_name == "bfloat16" ? at::kBFloat16 : at::kHalf;
    layer.up = dali_cpu::weak_from_impl(up);
    layer.down = dali_cpu::weak_from_impl(down);
    if (up_bias != 0) layer.up_bias = dali_cpu::weak_from_impl(up_bias);
    if (down_bias != 0) layer.down_bias = dali_cpu::weak_from_impl(down_bias);
    if (up_scales != 0) layer.up_scales = dali_cpu::weak_from_impl(up_scales);
    if (down_scales != 0) layer.down_scales = dali_cpu::weak_from_impl(down_scales);
    layer.gated = gated != 0;
    layer.interleaved = interleaved != 0;
    layer.transposed = transposed != 0;
    layer.activation = activation;
    layer.alpha = alpha;
    layer.limit = limit;
    std::unique_lock<std::shared_mutex> write(dali_cpu::g_mutex);
    dali_cpu::g_layers[handle] = std::move(layer);
    return 0;
  });
}

// Forgets every published layer (the next call of each goes through the registry again).
void dali_cpu_resident_forget() {
  std::unique_lock<std::shared_mutex> write(dali_cpu::g_mutex);
  dali_cpu::g_layers.clear();
}

// How many registry redirects are active in the process (0: published layers are served).
void dali_cpu_resident_pause(int redirects) { dali_cpu::g_redirects.store(redirects, std::memory_order_release); }

int dali_cpu_resident_count() {
  std::shared_lock<std::shared_mutex> read(dali_cpu::g_mutex);
  return static_cast<int>(dali_cpu::g_layers.size());
}

}  // extern "C"
