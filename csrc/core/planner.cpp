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

// WorkloadAware.update (dali_compile/runtime/cache_replacement.py, the reference) on one layer's window state,
// int64 [E] each: scores (tokens in the current window) and uses (last step + 1; 0: never). Every id is checked
// before anything is written. Returns how many swaps were written to swaps (expert, victim pairs, victim -1 for
// a free slot; room for u_size pairs), or -1 for an id outside [0, E).
int64_t workload_update(int64_t n, const int64_t* experts, const int64_t* workloads, int64_t* scores, int64_t* uses,
                        int64_t E, int64_t step, int64_t w_size, int64_t u_size, const int64_t* resident, int64_t c,
                        int64_t capacity, int64_t* swaps) {
  for (int64_t i = 0; i < n; ++i)
    if (experts[i] < 0 || experts[i] >= E) return -1;
  for (int64_t i = 0; i < c; ++i)
    if (resident[i] < 0 || resident[i] >= E) return -1;
  for (int64_t i = 0; i < n; ++i) {
    scores[experts[i]] += workloads[i];
    uses[experts[i]] = step + 1;
  }
  if ((step + 1) % w_size != 0) return 0;
  thread_local std::vector<uint8_t> cached;
  thread_local std::vector<int64_t> incoming, outgoing;
  cached.assign(E, 0);
  outgoing.clear();
  for (int64_t i = 0; i < c; ++i)
    if (!cached[resident[i]]) {
      cached[resident[i]] = 1;
      outgoing.push_back(resident[i]);  // the distinct cached experts (the reference's set)
    }
  incoming.clear();
  for (int64_t e = 0; e < E; ++e)
    if (!cached[e] && scores[e] > 0) incoming.push_back(e);
  // The reference's orders: incoming by (-score, -use, e), outgoing by (score, use, e); both total (e is unique).
  std::sort(incoming.begin(), incoming.end(), [&](int64_t a, int64_t b) {
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    if (uses[a] != uses[b]) return uses[a] > uses[b];
    return a < b;
  });
  if (static_cast<int64_t>(incoming.size()) > u_size) incoming.resize(u_size);
  const int64_t free = std::max<int64_t>(capacity - static_cast<int64_t>(outgoing.size()), 0);
  const int64_t victims = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(incoming.size()) - free, 0),
                                            static_cast<int64_t>(outgoing.size()));
  std::partial_sort(outgoing.begin(), outgoing.begin() + victims, outgoing.end(), [&](int64_t a, int64_t b) {
    if (scores[a] != scores[b]) return scores[a] < scores[b];
    if (uses[a] != uses[b]) return uses[a] < uses[b];
    return a < b;
  });
  int64_t taken = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(incoming.size()) && k < free + victims; ++k) {
    const int64_t expert = incoming[k], victim = k < free ? -1 : outgoing[k - free];
    if (victim >= 0 && scores[expert] <= scores[victim]) break;  // scores only worsen from here
    swaps[2 * taken] = expert;
    swaps[2 * taken + 1] = victim;
    ++taken;
  }
  std::fill(scores, scores + E, int64_t{0});  // the window ends
  return taken;
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

int64_t dali_workload_update(int64_t n, const int64_t* experts, const int64_t* workloads, int64_t* scores,
                             int64_t* uses, int64_t E, int64_t step, int64_t w_size, int64_t u_size,
                             const int64_t* resident, int64_t c, int64_t capacity, int64_t* swaps) {
  if (n < 0 || c < 0 || E < 0 || w_size < 1 || u_size < 0) return -1;
  return dali_cpu::call_guarded(int64_t{dali_cpu::kCppException}, [=] {
    return dali_cpu::workload_update(n, experts, workloads, scores, uses, E, step, w_size, u_size, resident, c,
                                     capacity, swaps);
  });
}

// DaliPolicy.decide with the workload-aware cache in one call (policies.py): the greedy's on_gpu, then
// workload_update. The arguments that stay the same from step to step come in `context` (int64 [14], made once
// per layer by cache_replacement._NativeWindows: ctypes converts each argument at ~0.25 us): the cost table's
// cpu, gpu and key addresses and top; the experts, workloads, cached (bool) and on_gpu (bool) buffers; the
// layer's scores and uses and their size E; w_size, u_size; the swaps buffer. -1 where the greedy does not
// apply (a workload outside [1, top]) or an id is outside [0, E): nothing was written to the window state then,
// and the caller takes the Python path. dali_decide_workload_on takes the step's arrays and on_gpu by pointer
// instead of the context's buffers (binding/fast_calls.cpp reads them from the numpy arrays themselves).
int64_t dali_decide_workload_on(const int64_t* context, const int64_t* experts, const int64_t* workloads,
                                const uint8_t* cached, uint8_t* on_gpu, int64_t n, int64_t step, int64_t max_uncached,
                                const int64_t* resident, int64_t c, int64_t capacity) {
  auto address = [&](int k) { return reinterpret_cast<void*>(static_cast<intptr_t>(context[k])); };
  auto* scores = static_cast<int64_t*>(address(8));
  auto* uses = static_cast<int64_t*>(address(9));
  auto* swaps = static_cast<int64_t*>(address(13));
  const int64_t top = context[3], E = context[10], w_size = context[11], u_size = context[12];
  if (n < 0 || c < 0 || E < 0 || w_size < 1 || u_size < 0) return -1;
  return dali_cpu::call_guarded(int64_t{dali_cpu::kCppException}, [=]() -> int64_t {
    if (dali_cpu::greedy_plan(n, workloads, cached, static_cast<const double*>(address(0)),
                              static_cast<const double*>(address(1)), static_cast<const double*>(address(2)), top,
                              max_uncached, on_gpu) != 0)
      return -1;
    return dali_cpu::workload_update(n, experts, workloads, scores, uses, E, step, w_size, u_size, resident, c,
                                     capacity, swaps);
  });
}

int64_t dali_decide_workload(const int64_t* context, int64_t n, int64_t step, int64_t max_uncached,
                             const int64_t* resident, int64_t c, int64_t capacity) {
  auto buffer = [&](int k) { return reinterpret_cast<int64_t*>(static_cast<intptr_t>(context[k])); };
  return dali_decide_workload_on(context, buffer(4), buffer(5), reinterpret_cast<const uint8_t*>(buffer(6)),
                                 reinterpret_cast<uint8_t*>(buffer(7)), n, step, max_uncached, resident, c, capacity);
}

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
