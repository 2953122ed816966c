// Work split over XLA:CPU's intra-op thread pool for the kernels (an FFI handler's Ctx<ffi::ThreadPool>).
//
// ParallelFor(pool, n, item_flops, body) runs body(i) for every i in [0, n), split into contiguous ranges
// (parts) claimed from a shared counter: the calling thread claims ranges itself and parts - 1 pool tasks claim
// the rest. The pool may run a task late, or never, or on the caller's own thread (XLA's contract), so the
// caller takes every range nobody has claimed and then waits only for ranges already being run; a task that
// starts after the call returned finds nothing left and touches nothing but the shared counter. Which thread
// runs a range changes no arithmetic: body(i) must write only its own outputs.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace cna {

// CPUs this process may run on (its affinity mask: a study process pinned to one core gets 1).
inline int64_t UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Work per part at least: a pool task costs a few microseconds to start, ~1 MFLOP ~10 us on one core.
constexpr double kMinPartFlops = 1e6;

// ParallelFor over `n` items of about `item_flops` each: at most one part per usable CPU and per pool thread,
// none below kMinPartFlops.
template <class F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, double item_flops, const F& body) {
  const int64_t threads = std::min<int64_t>(UsableCpus(), std::max<int64_t>(pool.num_threads(), 1));
  const int64_t by_work = static_cast<int64_t>(n * item_flops / kMinPartFlops);
  const int64_t parts = std::max<int64_t>(1, std::min({threads, n, by_work}));
  if (parts == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  // Range r covers [n * r / parts, n * (r + 1) / parts).
  auto run = [shared, n, parts, &body] {
    for (int64_t r; (r = shared->next.fetch_add(1)) < parts;) {
      for (int64_t i = n * r / parts; i < n * (r + 1) / parts; ++i) body(i);
      if (shared->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < parts; ++t) {
    // A copy; a late task finds next >= parts: it claims nothing and never calls body.
    pool.Schedule(decltype(run)(run));
  }
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == parts; });
}

}  // namespace cna
