// DALI's greedy CPU/GPU assignment of one MoE layer's active experts, for the per-step hot path.
//
// The same algorithm as dali_compile/runtime/planner.py's greedy_plan (which documents it and stays
// the reference): experts visited by |t_gpu - t_cpu| descending, ties in the order given; each goes
// to the GPU if T_gpu + g_i <= T_cpu + c_i and, when uncached, a staging slot is left. Costs come
// from the cost model's tables (indexed by workload; gpu and key rows are [uncached | cached]), and
// the comparisons are the same double additions in the same order, so the choice is bit-identical
// to the Python loop. Called through ctypes: a Python call costs about 25 us of numpy overhead per
// layer step, this about 3 us.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "runtime.h"

namespace dali_cpu {
namespace {

int greedy_plan(int64_t n, const int64_t* workloads, const uint8_t* cached, const double* cpu_table,
                const double* gpu_table, const double* key_table, int64_t top, int64_t max_uncached,
                uint8_t* on_gpu) {
  thread_local std::vector<int64_t> order;
  thread_local std::vector<int64_t> index;
  order.resize(n);
  index.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (workloads[i] < 1 || workloads[i] > top) return -1;
    index[i] = workloads[i] + (cached[i] ? top + 1 : 0);
  }
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return key_table[index[a]] > key_table[index[b]]; });
  double cpu_total = 0.0, gpu_total = 0.0;
  int64_t copies_left = max_uncached;
  for (int64_t i : order) {
    const double c = cpu_table[workloads[i]], g = gpu_table[index[i]];
    if ((cached[i] || copies_left > 0) && gpu_total + g <= cpu_total + c) {
      on_gpu[i] = 1;
      gpu_total += g;
      if (!cached[i]) --copies_left;
    } else {
      on_gpu[i] = 0;
      cpu_total += c;
    }
  }
  return 0;
}

}  // namespace
}  // namespace dali_cpu

extern "C" {

// on_gpu[i] = 1 for experts placed on the GPU. Returns 0, or -1 if a workload is outside [1, top] or
// n < 0, or -99 if the scratch vectors could not be allocated (the caller then uses the Python path,
// which interpolates; an exception must not unwind into ctypes).
int dali_greedy_plan(int64_t n, const int64_t* workloads, const uint8_t* cached, const double* cpu_table,
                     const double* gpu_table, const double* key_table, int64_t top, int64_t max_uncached,
                     uint8_t* on_gpu) {
  if (n < 0) return -1;
  return dali_cpu::call_guarded(dali_cpu::kCppException, [=] {
    return dali_cpu::greedy_plan(n, workloads, cached, cpu_table, gpu_table, key_table, top, max_uncached, on_gpu);
  });
}

}  // extern "C"
