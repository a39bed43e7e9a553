// Residual prefetch's per-step path in one call (dali_compile/runtime/fused_router.py): the next
// layer's router applied to this layer's gate input plus the residual vector, then the prefetch choice from
// that routing (planner.cpp). Python checks that the router computes the form below by comparing the module's
// output with the form's on a probe input, and calls the module itself for any other router. The form:
// p = softmax(x W^T + b) in fp32 (b optional), the top k of p, divided by their sum when `normalize`
// (Mixtral, Qwen2/3-MoE, OLMoE; and GPT-OSS's softmax over its top-k logits, which is the same).
// Logits are fp32 dots of the weights' dtype with x (+ residual) widened to fp32: they may differ from the
// module's (which rounds to its dtype) in the last bits, which can only reorder experts whose
// probabilities tie to those bits. A prediction only ever costs time, never changes results.
// The Python path through the module took ~50 us per layer step in a decode loop (seven ATen ops, the
// numpy choice); this ~10.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "dtypes.h"
#include "kernels.h"
#include "planner.h"
#include "runtime.h"

namespace dali_cpu {
namespace {

// ids [T, K] and weights [T, K] (fp32) of the router on x [T, H] (rows ldx apart) plus residual [H] (or none).
void route(int64_t T, const void* x, DType x_dtype, int64_t ldx, const float* residual, const void* w, DType w_dtype,
           const float* bias, int64_t E, int64_t H, int64_t K, bool normalize, int64_t* ids,
           float* weights) {
  const KernelTable& kernels = active_kernels();
  thread_local std::vector<float> row, scores;
  thread_local std::vector<int64_t> order;
  row.resize(H);
  scores.resize(E);
  order.resize(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < H; ++j) row[j] = element(x_dtype, x, t * ldx + j) + (residual ? residual[j] : 0.0f);
    kernels.dot_rows(w_dtype, w, H, E, H, row.data(), H, 1, false, scores.data(), E);
    if (bias != nullptr)
      for (int64_t e = 0; e < E; ++e) scores[e] += bias[e];
    const float top = *std::max_element(scores.begin(), scores.end());
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += scores[e] = std::exp(scores[e] - top);
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t a, int64_t b) {
      return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
    });
    int64_t* row_ids = ids + t * K;
    float* row_weights = weights + t * K;
    for (int64_t k = 0; k < K; ++k) {
      row_ids[k] = order[k];
      row_weights[k] = scores[order[k]];
    }
    if (normalize) {
      float chosen_sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) chosen_sum += row_weights[k];
      for (int64_t k = 0; k < K; ++k) row_weights[k] /= chosen_sum;
    }
  }
}

}  // namespace
}  // namespace dali_cpu

extern "C" {

// The routing into ids [T, K] / weights [T, K] and the prefetch choice into counts [E], mass [E] and
// chosen [count]. Returns how many experts were chosen, or -1 (bad arguments, an out-of-table workload or
// NaN scores: the caller takes the Python path), or -99 (an exception inside; the caller does the same).
int dali_predict_prefetch(int64_t T, const void* x, int x_dtype, int64_t ldx, const float* residual, const void* w,
                          int w_dtype, const float* bias, int64_t E, int64_t H, int64_t K, int normalize,
                          const int32_t* slot_of_expert, const double* cpu_table, const double* gpu_table,
                          const double* key_table, int64_t top, int64_t count, int64_t* ids, float* weights,
                          int64_t* counts, double* mass, int64_t* chosen) {
  if (T < 0 || E < 1 || H < 1 || K < 1 || K > E || count < 0 || ldx < H || x_dtype < 0 || x_dtype > 2 ||
      w_dtype < 0 || w_dtype > 2)
    return -1;
  return dali_cpu::call_guarded(dali_cpu::kCppException, [=] {
    dali_cpu::route(T, x, static_cast<dali_cpu::DType>(x_dtype), ldx, residual, w, static_cast<dali_cpu::DType>(w_dtype),
                    bias, E, H, K, normalize != 0, ids, weights);
    return dali_cpu::prefetch_choice(T * K, ids, weights, E, slot_of_expert, cpu_table, gpu_table, key_table, top,
                                     count, counts, mass, chosen);
  });
}

}  // extern "C"
