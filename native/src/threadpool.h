// Persistent fork-join thread pool. The calling thread takes part in every job,
// so a pool of size N owns N - 1 worker threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace obf {

class ThreadPool {
 public:
  typedef void (*TaskFn)(void* ctx, int64_t task);

  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Total number of threads (workers + caller) used by run().
  int size() const { return size_.load(std::memory_order_relaxed); }
  void resize(int n);

  // Runs fn(ctx, t) for every t in [0, ntasks) and returns when all have finished.
  // Tasks are claimed dynamically by the caller and the workers, so a worker that is
  // slow to wake (or busy elsewhere) never holds the caller up unless it has already
  // started a task. Calls from different threads are serialised.
  void run(int64_t ntasks, TaskFn fn, void* ctx);

 private:
  struct Job {
    uint64_t gen;
    TaskFn fn;
    void* ctx;
    int64_t ntasks;
  };
  void worker_loop(uint64_t seen);
  void work(const Job& job);
  void stop_workers();

  std::atomic<int> size_{1};
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // serialises run() and resize()

  std::mutex mu_;  // guards job_, stop_, sleepers_
  std::condition_variable wake_cv_;
  std::condition_variable done_cv_;
  Job job_{0, nullptr, nullptr, 0};
  bool stop_ = false;
  int sleepers_ = 0;
  std::atomic<uint64_t> generation_{0};
  // (generation << 32) | index of the next unclaimed task of the current job.
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};  // finished tasks of the current job
};

}  // namespace obf
