// Where a call's parallel regions run. The kernels only need "run task(0..n-1) on some threads and
// return when all are done"; who owns the threads is the caller's choice:
//   - the runtime's own ThreadPool, for async jobs that run beside the caller (dali::cpu_experts_submit);
//   - the host framework's threads (ATen's OpenMP team, supplied by the binding), for calls made on
//     the step's own thread, so our kernels and the framework's kernels share one set of threads
//     instead of two pools spinning against each other on the same cores.
#pragma once

#include <cstdint>
#include <functional>

namespace dali_cpu {

class Parallel {
 public:
  virtual ~Parallel() = default;
  // Threads a region may use (the caller's included).
  virtual int num_threads() = 0;
  // Runs task(0) .. task(num_tasks - 1) and returns when all have finished, rethrowing the first
  // exception a task threw. Tasks must not start regions themselves.
  virtual void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) = 0;
  // Threads (caller included) that ran at least one task of the latest region: a diagnostic that
  // depends on the OS scheduler (on a busy host one thread may claim every task before another wakes).
  virtual int last_region_threads() = 0;
  // Threads the latest region was split across: min(num_threads(), num_tasks) as the executor
  // offered it. Deterministic, so tests check the thread budget and the partitioning with it.
  virtual int last_region_width() = 0;
};

}  // namespace dali_cpu
