// The instruction set the kernels of isa_kernels.h run with: the best this CPU has, unless `set_isa` chose another;
// and calls into that set's kernels, overloaded by dtype.
#pragma once

#include <atomic>

#include "isa_kernels.h"

namespace seqfast {

enum Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
inline const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

inline int best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

// The instruction set in use (`set_isa` in the bindings changes it).
inline std::atomic<int> g_isa{best_isa()};

inline IsaKernels isa_kernels() {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case AVX512: return kernels_avx512();
    case AVX2: return kernels_avx2();
    default: return kernels_generic();
  }
}

inline void run_fwd(const IsaKernels& k, int cell, const FwdChunk<float>& a) { k.fwd_f32(cell, a); }
inline void run_fwd(const IsaKernels& k, int cell, const FwdChunk<double>& a) { k.fwd_f64(cell, a); }
inline void run_bwd(const IsaKernels& k, int cell, const BwdChunk<float>& a) { k.bwd_f32(cell, a); }
inline void run_bwd(const IsaKernels& k, int cell, const BwdChunk<double>& a) { k.bwd_f64(cell, a); }

inline void run_gemv(const IsaKernels& kern, bool trans, int64_t n, int64_t k, const float* W, int64_t ldw,
                     const float* x, bool accumulate, float* y) {
  kern.gemv_f32(trans, n, k, W, ldw, x, accumulate, y);
}
inline void run_gemv(const IsaKernels& kern, bool trans, int64_t n, int64_t k, const double* W, int64_t ldw,
                     const double* x, bool accumulate, double* y) {
  kern.gemv_f64(trans, n, k, W, ldw, x, accumulate, y);
}

inline void run_ln_fwd(const IsaKernels& kern, int64_t n, int64_t N, const float* z, const float* gamma,
                       const float* beta, float* y) {
  kern.ln_fwd_f32(n, N, z, gamma, beta, y);
}
inline void run_ln_fwd(const IsaKernels& kern, int64_t n, int64_t N, const double* z, const double* gamma,
                       const double* beta, double* y) {
  kern.ln_fwd_f64(n, N, z, gamma, beta, y);
}
inline void run_ln_bwd(const IsaKernels& kern, int64_t n, int64_t N, const float* dy, const float* z,
                       const float* gamma, float* dz, float* dgamma, float* dbeta) {
  kern.ln_bwd_f32(n, N, dy, z, gamma, dz, dgamma, dbeta);
}
inline void run_ln_bwd(const IsaKernels& kern, int64_t n, int64_t N, const double* dy, const double* z,
                       const double* gamma, double* dz, double* dgamma, double* dbeta) {
  kern.ln_bwd_f64(n, N, dy, z, gamma, dz, dgamma, dbeta);
}

}  // namespace seqfast
