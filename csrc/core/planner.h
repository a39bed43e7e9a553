// The per-step decisions of the offload runtime that run in C (called through ctypes from Python): the greedy
// CPU/GPU assignment, the workload-aware cache's window and a layer step's active experts (planner.cpp), and the
// prefetch choice (planner.cpp, prefetch.cpp).
#pragma once

#include <cstdint>

namespace dali_cpu {

// DALI's greedy over n experts (see planner.cpp); 0, or -1 for a workload outside [1, top].
int greedy_plan(int64_t n, const int64_t* workloads, const uint8_t* cached, const double* cpu_table,
                const double* gpu_table, const double* key_table, int64_t top, int64_t max_uncached,
                uint8_t* on_gpu);

// prefetch.prefetch_choice from a routing of m (token, k) pairs (see planner.cpp); how many were chosen, or -1.
int prefetch_choice(int64_t m, const int64_t* ids, const float* weights, int64_t E, const int32_t* slot_of_expert,
                    const double* cpu_table, const double* gpu_table, const double* key_table, int64_t top,
                    int64_t count, int64_t* counts, double* mass, int64_t* chosen);

// The active experts of a layer step, their workloads and cache flags (see planner.cpp); n, or -1 for a bad id.
int64_t step_routing(int64_t m, const int64_t* ids, int64_t E, const int32_t* slot_of_expert, int64_t* active,
                     int64_t* hits);

// WorkloadAware.update on one layer's window state (see planner.cpp); the swaps' count, or -1 for a bad id.
int64_t workload_update(int64_t n, const int64_t* experts, const int64_t* workloads, int64_t* scores, int64_t* uses,
                        int64_t E, int64_t step, int64_t w_size, int64_t u_size, const int64_t* resident, int64_t c,
                        int64_t capacity, int64_t* swaps);

}  // namespace dali_cpu

// The C entry points of these (ctypes, and binding/fast_calls.cpp's CPython module).
extern "C" {
int dali_greedy_plan(int64_t n, const int64_t* workloads, const uint8_t* cached, const double* cpu_table,
                     const double* gpu_table, const double* key_table, int64_t top, int64_t max_uncached,
                     uint8_t* on_gpu);
int dali_prefetch_choice(int64_t m, const int64_t* ids, const float* weights, int64_t E, const int32_t* slot_of_expert,
                         const double* cpu_table, const double* gpu_table, const double* key_table, int64_t top,
                         int64_t count, int64_t* counts, double* mass, int64_t* chosen);
int dali_predict_prefetch(int64_t T, const void* x, int x_dtype, int64_t ldx, const float* residual, const void* w,
                          int w_dtype, const float* bias, int64_t E, int64_t H, int64_t K, int normalize,
                          const int32_t* slot_of_expert, const double* cpu_table, const double* gpu_table,
                          const double* key_table, int64_t top, int64_t count, int64_t* ids, float* weights,
                          int64_t* counts, double* mass, int64_t* chosen);
int64_t dali_workload_update(int64_t n, const int64_t* experts, const int64_t* workloads, int64_t* scores,
                             int64_t* uses, int64_t E, int64_t step, int64_t w_size, int64_t u_size,
                             const int64_t* resident, int64_t c, int64_t capacity, int64_t* swaps);
int64_t dali_decide_workload(const int64_t* context, int64_t n, int64_t step, int64_t max_uncached,
                             const int64_t* resident, int64_t c, int64_t capacity);
int64_t dali_decide_workload_on(const int64_t* context, const int64_t* experts, const int64_t* workloads,
                                const uint8_t* cached, uint8_t* on_gpu, int64_t n, int64_t step, int64_t max_uncached,
                                const int64_t* resident, int64_t c, int64_t capacity);
int64_t dali_step_routing(int64_t m, const int64_t* ids, int64_t E, const int32_t* slot_of_expert, int64_t* active,
                          int64_t* hits);
}  // extern "C"
