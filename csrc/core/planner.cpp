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

#include "planner.h"
#include "runtime.h"

namespace dali_cpu {

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

// prefetch.prefetch_choice after ResidualPredictor.predict, in one call (the prefetch's per-step path):
// counts[e] and mass[e] as numpy's bincount gives them (mass summed in double, in the order of ids), then
// among the predicted experts (ascending) those not cached that the greedy puts on the GPU (every one not
// cached without a cost table), most predicted tokens first, then most routing weight, ties to the lower
// id; at most `count`, written to chosen. Returns how many, or -1 for an id outside [0, E), a workload past
// the table or a NaN weight (the caller then takes the Python path, which raises or interpolates).
int prefetch_choice(int64_t m, const int64_t* ids, const float* weights, int64_t E, const int32_t* slot_of_expert,
                    const double* cpu_table, const double* gpu_table, const double* key_table, int64_t top,
                    int64_t count, int64_t* counts, double* mass, int64_t* chosen) {
  std::fill(counts, counts + E, int64_t{0});
  std::fill(mass, mass + E, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e >= E) return -1;
    ++counts[e];
    if (weights != nullptr) mass[e] += static_cast<double>(weights[i]);
  }
  thread_local std::vector<int64_t> experts, workloads;
  thread_local std::vector<uint8_t> cached, on_gpu;
  experts.clear();
  workloads.clear();
  cached.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) continue;
    if (mass[e] != mass[e]) return -1;  // NaN: no order to rank by
    experts.push_back(e);
    workloads.push_back(counts[e]);
    cached.push_back(slot_of_expert[e] >= 0 ? 1 : 0);
  }
  const int64_t n = static_cast<int64_t>(experts.size());
  on_gpu.assign(n, 1);
  if (cpu_table != nullptr && n > 0 &&
      greedy_plan(n, workloads.data(), cached.data(), cpu_table, gpu_table, key_table, top, count, on_gpu.data()) != 0)
    return -1;
  thread_local std::vector<int64_t> candidates;
  candidates.clear();
  for (int64_t i = 0; i < n; ++i)
    if (on_gpu[i] && !cached[i]) candidates.push_back(experts[i]);
  std::stable_sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) {
    return counts[a] != counts[b] ? counts[a] > counts[b] : mass[a] > mass[b];
  });
  const int64_t taken = std::min<int64_t>(count, static_cast<int64_t>(candidates.size()));
  std::copy(candidates.begin(), candidates.begin() + taken, chosen);
  return static_cast<int>(taken);
}

// HybridLayer's per-step counting (dali_compile/runtime/step_routing.py): the active experts of m routed
// (token, k) ids, ascending (numpy's bincount, then nonzero), into rows [3, E] of `active`: the expert, its
// workload, and 1 if slot_of_expert[e] >= 0 (cached). *hits = how many are cached. Returns n, or -1 for an id
// outside [0, E) (the caller's Python path then raises the error naming it).
int64_t step_routing(int64_t m, const int64_t* ids, int64_t E, const int32_t* slot_of_expert, int64_t* active,
                     int64_t* hits) {
  thread_local std::vector<int64_t> counts;
  counts.assign(E, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e >= E) return -1;
    ++counts[e];
  }
  int64_t n = 0, cached = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) continue;
    const int64_t in_cache = slot_of_expert[e] >= 0 ? 1 : 0;
    active[n] = e;
    active[E + n] = counts[e];
    active[2 * E + n] = in_cache;
    cached += in_cache;
    ++n;
  }
  *hits = cached;
  return n;
}

}  // namespace dali_cpu

extern "C" {

int64_t dali_step_routing(int64_t m, const int64_t* ids, int64_t E, const int32_t* slot_of_expert, int64_t* active,
                          int64_t* hits) {
  if (m < 0 || E < 0) return -1;
  return dali_cpu::call_guarded(int64_t{dali_cpu::kCppException},
                                [=] { return dali_cpu::step_routing(m, ids, E, slot_of_expert, active, hits); });
}

int dali_prefetch_choice(int64_t m, const int64_t* ids, const float* weights, int64_t E, const int32_t* slot_of_expert,
                         const double* cpu_table, const double* gpu_table, const double* key_table, int64_t top,
                         int64_t count, int64_t* counts, double* mass, int64_t* chosen) {
  if (m < 0 || E < 0 || count < 0) return -1;
  return dali_cpu::call_guarded(dali_cpu::kCppException, [=] {
    return dali_cpu::prefetch_choice(m, ids, weights, E, slot_of_expert, cpu_table, gpu_table, key_table, top, count,
                                     counts, mass, chosen);
  });
}

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
