// A persistent pool of worker threads for the CPU expert kernels.
//
// parallel_for(n, task) runs task(0..n-1) on the workers and on the calling thread, and returns
// when every task has finished (rethrowing the first exception a task threw). One parallel region
// runs at a time: concurrent callers (the async job runner, synchronous op calls from several
// Python threads) take turns region by region. Tasks must not call parallel_for themselves.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel.h"

namespace dali_cpu {

class ThreadPool : public Parallel {
 public:
  // num_threads counts the calling thread: a pool of n starts n - 1 workers. Throws (with no
  // thread left running) if they cannot be started.
  explicit ThreadPool(int num_threads);
  ~ThreadPool() override;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() override;
  // Waits for the running region, then restarts the workers. If the threads cannot be started, the
  // pool goes back to its previous size (or to the caller's thread alone) and the error propagates.
  void resize(int num_threads);
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) override;
  // Threads (caller included) that ran at least one task of the latest region: a diagnostic.
  int last_region_threads() override;
  int last_region_width() override;

 private:
  void start_workers(int num_threads);
  void stop_workers();
  // `seen`: the generation current when the worker was created; it joins every later one.
  void worker_loop(uint64_t seen);
  // Claims and runs tasks of the current region until none is left.
  void run_tasks(const std::function<void(int64_t)>* task, int64_t num_tasks);

  std::mutex region_mutex_;  // held by the caller for a whole region (and by resize)
  std::mutex mutex_;         // guards the fields below
  std::condition_variable wake_cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t num_tasks_ = 0;
  int64_t tasks_done_ = 0;
  int active_workers_ = 0;  // workers that joined the current generation and have not left it
  int region_threads_ = 0;
  int region_width_ = 0;
  std::exception_ptr error_;
  std::atomic<int64_t> next_task_{0};
  // Lets idle workers notice a new region without sleeping on the condition variable first.
  std::atomic<uint64_t> published_generation_{0};
};

}  // namespace dali_cpu
