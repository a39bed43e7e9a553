#include "thread_pool.h"

#include <algorithm>
#include <chrono>

namespace dali_cpu {

namespace {

// A decode step runs two regions back to back (up, then down projection), and a decode loop one
// layer after another, typically well under a millisecond apart: a worker that spins this long
// before sleeping joins the next region at once. Waking a sleeping worker costs a futex call and,
// on a virtual machine whose idle vCPU the host has descheduled, up to milliseconds (measured:
// a 3 ms decode step after 10 ms idle ran on one thread in 1 call out of 3).
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(1000);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  try {
    start_workers(num_threads);
  } catch (...) {
    stop_workers();  // a std::thread destroyed while joinable would terminate the process
    throw;
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

int ThreadPool::num_threads() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int>(workers_.size()) + 1;
}

void ThreadPool::resize(int num_threads) {
  std::lock_guard<std::mutex> region(region_mutex_);
  const int before = static_cast<int>(workers_.size()) + 1;  // workers_ changes only under region_mutex_
  stop_workers();
  try {
    start_workers(num_threads);
  } catch (...) {
    // Thread creation failed part way (a system limit): back to the previous size, or at worst to
    // the caller's thread alone, so the pool stays usable; the caller still gets the error.
    stop_workers();
    try {
      start_workers(before);
    } catch (...) {
      stop_workers();
    }
    throw;
  }
}

void ThreadPool::start_workers(int num_threads) {
  std::lock_guard<std::mutex> lock(mutex_);
  stopping_ = false;
  // The starting generation is taken here, not when the thread first runs: a region published
  // before the new thread gets scheduled must still count as new to it.
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, seen = generation_] { worker_loop(seen); });
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
  std::lock_guard<std::mutex> lock(mutex_);
  workers_.clear();
}

int ThreadPool::last_region_threads() {
  std::lock_guard<std::mutex> lock(mutex_);
  return region_threads_;
}

int ThreadPool::last_region_width() {
  std::lock_guard<std::mutex> lock(mutex_);
  return region_width_;
}

void ThreadPool::run_tasks(const std::function<void(int64_t)>* task, int64_t num_tasks) {
  int64_t finished = 0;
  std::exception_ptr error;
  for (int64_t i = next_task_.fetch_add(1); i < num_tasks; i = next_task_.fetch_add(1)) {
    try {
      (*task)(i);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
    ++finished;
  }
  if (finished == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  ++region_threads_;
  tasks_done_ += finished;
  if (error && !error_) error_ = error;
  if (tasks_done_ == num_tasks_) done_cv_.notify_all();
}

void ThreadPool::worker_loop(uint64_t seen) {
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
    while (published_generation_.load(std::memory_order_acquire) == seen &&
           std::chrono::steady_clock::now() < spin_until) {
      for (int i = 0; i < 64; ++i) cpu_relax();
    }
    const std::function<void(int64_t)>* task = nullptr;
    int64_t num_tasks = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      // Joining under the lock: the next region cannot reset next_task_ until we have left.
      seen = generation_;
      task = task_;
      num_tasks = num_tasks_;
      ++active_workers_;
    }
    run_tasks(task, num_tasks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_workers_ == 0) done_cv_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  std::lock_guard<std::mutex> region(region_mutex_);
  bool has_workers;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    has_workers = !workers_.empty();
    // A worker still leaving the previous region may be about to claim a task index.
    done_cv_.wait(lock, [&] { return active_workers_ == 0; });
    task_ = &task;
    num_tasks_ = num_tasks;
    tasks_done_ = 0;
    region_threads_ = 0;
    region_width_ = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(workers_.size()) + 1, num_tasks));
    error_ = nullptr;
    next_task_.store(0);
    ++generation_;
    published_generation_.store(generation_, std::memory_order_release);
  }
  if (has_workers && num_tasks > 1) wake_cv_.notify_all();
  run_tasks(&task, num_tasks);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return tasks_done_ == num_tasks_; });
    error = error_;
    error_ = nullptr;
    task_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace dali_cpu
