// The time loops' scheduler: every step's chunks of hidden units over torch's threads, one parallel region per loop;
// or, where a call's rows split into blocks (`row_block`), each block's steps on one thread, with no wait between.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "blas.h"

namespace seqfast {

inline void spin_pause() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_ia32_pause();
#endif
}

// Multiply-adds per step below which one more thread costs more (waking it, a barrier per step) than it saves,
// counted at float32's cost (`float_macs`).
constexpr int64_t kMinMacsPerThread = int64_t(1) << 16;

// `macs` multiply-adds of `T` at float32's cost: a float64 one fills half the lanes. Splitting by it, a 2-layer
// float64 GRU(200) step at B = 1 (120K multiply-adds a product) runs on two threads, each keeping its chunks of the
// weights in its own L2 from call to call, in 72 us against 181 us on one (together with `project`'s halves).
template <typename T>
constexpr int64_t float_macs(int64_t macs) {
  return macs * int64_t(sizeof(T) / sizeof(float));
}

// Runs `task(k, c)` for every step `k < steps` and chunk `c < nch`, all chunks of a step before any of the next, in
// one `at::parallel_for` over as many of torch's threads as `step_macs` multiply-adds per step repay. A thread first
// runs its own block of chunks, then claims any chunk still unclaimed (so a thread that never starts, e.g. inline in
// a nested region, is never waited for), then waits for the step to complete (spinning briefly, then yielding). A
// thread walks its own block forward on even steps and backward on odd ones, so the weights it read last (still in
// its L2) are the first it reads again. Which thread runs a chunk does not change its result; a task's exception is
// rethrown after the loop.
template <class F>
void run_steps(int64_t steps, int64_t nch, int64_t step_macs, const F& task) {
  struct alignas(64) Claim {
    std::atomic<int64_t> steps{0};  // steps whose chunk has been claimed
  };
  std::vector<Claim> claims(nch);
  alignas(64) std::atomic<int64_t> done{0};
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
  const int64_t repaid = step_macs / kMinMacsPerThread;
  const int64_t nt = std::max<int64_t>(1, std::min({int64_t(at::get_num_threads()), nch, repaid}));
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    OneBlasThread one;
    const int64_t c0 = begin * nch / nt, c1 = end * nch / nt;
    for (int64_t k = 0; k < steps; ++k) {
      auto take = [&](int64_t c) {
        int64_t expect = k;
        if (claims[c].steps.load(std::memory_order_relaxed) != k ||
            !claims[c].steps.compare_exchange_strong(expect, k + 1, std::memory_order_acq_rel))
          return;
        try {
          task(k, c);
        } catch (...) {
          if (!failed.test_and_set()) error = std::current_exception();
        }
        done.fetch_add(1, std::memory_order_acq_rel);
      };
      if (k % 2 == 0) {
        for (int64_t c = c0; c < c1; ++c) take(c);
      } else {
        for (int64_t c = c1 - 1; c >= c0; --c) take(c);
      }
      for (int64_t c = c0 - 1; c >= 0; --c) take(c);
      for (int64_t c = nch - 1; c >= c1; --c) take(c);
      for (int64_t spins = 0; done.load(std::memory_order_acquire) < (k + 1) * nch; ++spins) {
        if (spins < (1 << 11)) {
          spin_pause();
        } else {
          std::this_thread::yield();
        }
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

// A call's strategies, which `seqfast.kernels.cpp` times per machine and shape class (the fastest differs between
// CPUs and shapes). Bit 0 of its integer form runs the recurrent products on BLAS instead of packed panels (`pack`
// false), bit 1 splits the steps by hidden units instead of into row blocks (`blocks` false); 0 is packed panels in
// row blocks wherever they apply.
struct Plan {
  bool pack = true, blocks = true;
  static Plan of(int64_t bits) { return {!(bits & 1), !(bits & 2)}; }
};

// Rows per block of a call whose rows run as independent blocks, or `B` for one block (split by hidden units
// instead). A row's steps depend on no other row's, so a block runs all its steps without waiting for the others,
// and its products keep every hidden unit (full-width tiles). The cost: each block reads all of `w_hh` (`[G*H, P]`
// of `elem_size` bytes) every step, where a chunk of hidden units reads its slice; blocks pay while that is at most
// `kMaxBlockWeightBytesPerRow` per row of a block (measured on AMD Zen 4, 2 threads: LSTM H256 B16 +13-17%, GRU H200
// B20 +50%, LSTM H512 B64 +7-10%; LSTM H384 B16, at 300 KB a row, -7%). Blocks of at most `kMaxBlockRows` rows and
// at least `kMinBlockRows`; at least two, or four when the rows have their own lengths (`ragged`: rows sorted by
// length make the first blocks the longest, and threads that claim blocks in turn balance more of them better). A
// function of the shape and the lengths only, so results do not depend on the thread count.
constexpr int64_t kMinBlockRows = 6, kMaxBlockRows = 64, kMaxBlockWeightBytesPerRow = int64_t(256) << 10;
inline int64_t row_block(int64_t B, int64_t GH, int64_t P, int64_t elem_size, bool ragged) {
  if (B < 2 * kMinBlockRows) return B;
  // four blocks where the weights allow it, else two
  for (const int64_t least : {ragged ? int64_t(4) : int64_t(2), int64_t(2)}) {
    const int64_t blocks = std::max(least, (B + kMaxBlockRows - 1) / kMaxBlockRows);
    const int64_t rows = std::max(kMinBlockRows, (B + blocks - 1) / blocks);
    if (GH * P * elem_size <= kMaxBlockWeightBytesPerRow * rows) return rows;
  }
  return B;
}

// Runs `task(b)` for every block `b < blocks` over as many of torch's threads as `macs` multiply-adds in all repay,
// each thread claiming the next block in order until none is left; a task's exception propagates as
// `at::parallel_for`'s.
template <class F>
void run_blocks(int64_t blocks, int64_t macs, const F& task) {
  const int64_t nt = std::max<int64_t>(1, std::min({int64_t(at::get_num_threads()), blocks, macs / kMinMacsPerThread}));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    OneBlasThread one;
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) task(b);
  });
}

}  // namespace seqfast
