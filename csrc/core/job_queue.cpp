#include "job_queue.h"

#include <string>
#include <utility>

namespace dali_cpu {

JobQueue::~JobQueue() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  queued_cv_.notify_all();
  if (runner_.joinable()) runner_.join();
}

int64_t JobQueue::submit(Work work, std::shared_ptr<void> payload) {
  auto job = std::make_shared<Job>();
  job->work = std::move(work);
  job->payload = std::move(payload);
  int64_t handle;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    handle = next_handle_++;
    jobs_.emplace(handle, std::move(job));
    queue_.push_back(handle);
    if (!runner_.joinable()) runner_ = std::thread([this] { runner_loop(); });
  }
  queued_cv_.notify_one();
  return handle;
}

std::shared_ptr<void> JobQueue::wait(int64_t handle) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto it = jobs_.find(handle);
  if (it == jobs_.end()) {
    if (handle > 0 && handle < first_handle_) {
      throw BadHandle("handle " + std::to_string(handle) +
                      " was submitted before this process was forked: its job belongs to the parent process");
    }
    if (handle > 0 && handle < next_handle_) {
      throw BadHandle("handle " + std::to_string(handle) + " was already waited on (each job is waited exactly once)");
    }
    throw BadHandle("unknown handle " + std::to_string(handle) + " (not returned by dali::cpu_experts_submit)");
  }
  std::shared_ptr<Job> job = it->second;
  done_cv_.wait(lock, [&] { return job->done; });
  // Two threads may wait on the same handle: only the first one gets the result.
  if (jobs_.erase(handle) == 0) {
    throw BadHandle("handle " + std::to_string(handle) + " was already waited on (each job is waited exactly once)");
  }
  lock.unlock();
  if (job->error) std::rethrow_exception(job->error);
  return std::move(job->payload);
}

int64_t JobQueue::outstanding() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(jobs_.size());
}

void JobQueue::runner_loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queued_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = jobs_.at(queue_.front());
      queue_.pop_front();
    }
    try {
      job->work();
    } catch (...) {
      job->error = std::current_exception();
    }
    // The closure may hold the last references to its inputs: release them before reporting done.
    job->work = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job->done = true;
    }
    done_cv_.notify_all();
  }
}

}  // namespace dali_cpu
