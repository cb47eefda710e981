#include "threadpool.h"

#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OBF_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define OBF_PAUSE() __asm__ __volatile__("yield")
#else
#define OBF_PAUSE() ((void)0)
#endif

namespace obf {

namespace {
// How long an idle worker (or a waiting caller) spins before it sleeps. Back-to-back GEMM
// calls, as in a training step, then avoid a futex round trip each.
constexpr auto kSpinTime = std::chrono::microseconds(300);
constexpr uint64_t kIndexMask = 0xffffffffull;
}  // namespace

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  stop_ = false;
}

void ThreadPool::resize(int n) {
  if (n < 1) n = 1;
  std::lock_guard<std::mutex> run_lk(run_mu_);
  if (n == size_.load() && (int)workers_.size() == n - 1) return;
  stop_workers();
  size_ = n;
  const uint64_t gen = generation_.load();
  for (int i = 0; i < n - 1; ++i) workers_.emplace_back([this, gen] { worker_loop(gen); });
}

// Claims and runs tasks of `job` until none are left. A claim succeeds only while the
// counter still belongs to this job's generation, so a late worker cannot take tasks of
// a later job with this job's function.
void ThreadPool::work(const Job& job) {
  const uint64_t tag = (job.gen & kIndexMask) << 32;
  uint64_t v = next_.load(std::memory_order_relaxed);
  for (;;) {
    if ((v & ~kIndexMask) != tag) return;
    const int64_t t = (int64_t)(v & kIndexMask);
    if (t >= job.ntasks) return;
    if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
    job.fn(job.ctx, t);
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == job.ntasks) {
      // Last task: wake the caller if it went to sleep.
      std::lock_guard<std::mutex> lk(mu_);
      done_cv_.notify_all();
    }
    v = next_.load(std::memory_order_relaxed);
  }
}

void ThreadPool::worker_loop(uint64_t seen) {
  for (;;) {
    bool have = false;
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0;; ++it) {
      if (generation_.load(std::memory_order_acquire) != seen) {
        have = true;
        break;
      }
      OBF_PAUSE();
      if ((it & 255) == 255 && std::chrono::steady_clock::now() - t0 > kSpinTime) break;
    }
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (!have) {
        ++sleepers_;
        wake_cv_.wait(lk, [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
        --sleepers_;
      }
      if (stop_) return;
      job = job_;  // consistent copy of the current job
    }
    seen = job.gen;
    work(job);
  }
}

void ThreadPool::run(int64_t ntasks, TaskFn fn, void* ctx) {
  if (ntasks <= 0) return;
  std::lock_guard<std::mutex> run_lk(run_mu_);
  if (workers_.empty() || ntasks == 1 || ntasks > (int64_t)kIndexMask) {
    for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
    return;
  }
  Job job;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    job = Job{generation_.load(std::memory_order_relaxed) + 1, fn, ctx, ntasks};
    job_ = job;
    done_.store(0, std::memory_order_relaxed);
    next_.store((job.gen & kIndexMask) << 32, std::memory_order_relaxed);
    generation_.store(job.gen, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) wake_cv_.notify_all();
  work(job);
  // Wait for tasks other threads are still running: spin first, then sleep.
  auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; done_.load(std::memory_order_acquire) != ntasks; ++it) {
    OBF_PAUSE();
    if ((it & 255) == 255 && std::chrono::steady_clock::now() - t0 > kSpinTime) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return done_.load(std::memory_order_acquire) == ntasks; });
      break;
    }
  }
}

}  // namespace obf
