// Asynchronous jobs behind dali::cpu_experts_submit / dali::cpu_experts_wait.
//
// submit() queues a closure and returns a handle at once; one runner thread executes the queue in
// order (each job parallelises itself on the ThreadPool). wait(handle) blocks until that job is
// done and hands back its payload, exactly once: waiting on an unknown handle or a second time is
// an error. The payload is whatever the submitter needs back (output buffer, inputs kept alive).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>

namespace dali_cpu {

// wait() on a handle that was never issued, or was already waited on.
class BadHandle : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class JobQueue {
 public:
  using Work = std::function<void()>;

  // first_handle > 1 in a forked child: the parent's handles stay recognisable (see wait()).
  explicit JobQueue(int64_t first_handle = 1) : first_handle_(first_handle), next_handle_(first_handle) {}
  ~JobQueue();
  JobQueue(const JobQueue&) = delete;
  JobQueue& operator=(const JobQueue&) = delete;

  // Handles are positive and never reused within a process.
  int64_t submit(Work work, std::shared_ptr<void> payload);
  // Blocks until the job is done; rethrows the exception the job threw, if any.
  std::shared_ptr<void> wait(int64_t handle);
  // Jobs submitted and not yet waited on (finished or not).
  int64_t outstanding();
  // The next handle, read without the mutex: only for a fork child's handler, where the thread that
  // may have held the mutex does not exist (and no other thread does).
  int64_t next_handle_in_fork_child() const { return next_handle_; }

 private:
  struct Job {
    Work work;
    std::shared_ptr<void> payload;
    bool done = false;
    std::exception_ptr error;
  };
  void runner_loop();

  std::mutex mutex_;
  std::condition_variable queued_cv_;
  std::condition_variable done_cv_;
  std::unordered_map<int64_t, std::shared_ptr<Job>> jobs_;
  std::deque<int64_t> queue_;
  const int64_t first_handle_;
  int64_t next_handle_;
  bool stopping_ = false;
  std::thread runner_;  // started by the first submit
};

}  // namespace dali_cpu
