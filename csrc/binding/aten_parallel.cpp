// ATen's threads as the executor of synchronous calls (see core/parallel.h and step_parallel()).
//
// A decode step interleaves our kernels (experts, dense linears) with the framework's (norms, rotary
// embeddings, attention, inductor's fused loops). With two pools, each one's idle threads spin for a
// while after every region, holding the cores the other pool's next region needs: on 2 cores a
// whole OLMoE-shaped decode step ran 30 ms with torch's threads on against 20 ms with torch at one
// thread (benchmarks/bench_decode.py). Running our regions on ATen's team makes them one set of
// threads, with one waiting policy.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <functional>

#include "../core/parallel.h"
#include "../core/runtime.h"

namespace dali_cpu {
namespace {

class AtenParallel final : public Parallel {
 public:
  // The runtime's thread setting (cpu_threads) caps how many of ATen's threads a region uses.
  int num_threads() override { return std::max(1, std::min(global_pool().num_threads(), at::get_num_threads())); }

  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) override {
    if (num_tasks <= 0) return;
    const int threads = static_cast<int>(std::min<int64_t>(num_threads(), num_tasks));
    if (threads == 1 || at::in_parallel_region()) {
      for (int64_t i = 0; i < num_tasks; ++i) task(i);
      last_threads_.store(1, std::memory_order_relaxed);
      last_width_.store(1, std::memory_order_relaxed);
      return;
    }
    // One chunk per thread; inside, tasks are claimed one at a time, so a thread the OS delays
    // leaves its share to the others (as in the pool). at::parallel_for rethrows a task's exception.
    std::atomic<int64_t> next{0};
    std::atomic<int> ran{0};
    std::atomic<int> joined{0};  // OpenMP runs every team member's chunk, scheduled late or not
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      joined.fetch_add(1, std::memory_order_relaxed);
      bool any = false;
      for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) {
        task(i);
        any = true;
      }
      if (any) ran.fetch_add(1, std::memory_order_relaxed);
    });
    last_threads_.store(ran.load(), std::memory_order_relaxed);
    last_width_.store(joined.load(), std::memory_order_relaxed);
  }

  int last_region_threads() override { return last_threads_.load(std::memory_order_relaxed); }
  int last_region_width() override { return last_width_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int> last_threads_{0};
  std::atomic<int> last_width_{0};
};

#if defined(_OPENMP)
// Registered when the library loads; never destroyed (ops may run during interpreter exit). Built without
// OpenMP, at::parallel_for's pragma would run serially: synchronous calls then stay on the pool.
const bool registered = [] {
  register_host_parallel(new AtenParallel());
  return true;
}();
#endif

}  // namespace
}  // namespace dali_cpu
