// The products the loops make through torch's BLAS (called directly where torch links one: MKL or OpenBLAS's
// Fortran symbols, weak so that a build without them falls back to at::mm), and the product of a time step.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa_choice.h"

#if defined(__linux__) && defined(__GNUC__)
#define SEQFAST_BLAS 1
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // mkl_set_num_threads_local in mkl.h
}
#else
#define SEQFAST_BLAS 0
#endif

namespace seqfast {

// Keeps MKL single-threaded inside a task of our parallel region (and when the region runs inline).
struct OneBlasThread {
#if SEQFAST_BLAS
  int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
#endif
};

#if SEQFAST_BLAS
inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <typename T>
bool have_blas() {
  return std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}
#endif

// Row-major `C[m, n] = op(A) op(B) + beta C` with leading dimensions; `ta`: A is stored `[k, m]`, `tb`: B is `[n, k]`.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if SEQFAST_BLAS
  if (have_blas<T>()) {
    // Column-major view: C^T = op(B)^T op(A)^T.
    blas(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), T(1), B,
         static_cast<int>(std::max<int64_t>(ldb, 1)), A, static_cast<int>(std::max<int64_t>(lda, 1)), beta, C,
         static_cast<int>(ldc));
    return;
  }
#endif
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    c.copy_(at::mm(a, b));
  } else {
    c.add_(at::mm(a, b));
  }
}

// `gemm` with A not transposed and `beta` 0 or 1 (a time step's, a projection's): a product of one row runs on this
// CPU's own matrix-vector kernel.
template <typename T>
void step_gemm(const IsaKernels& kern, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
               int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 1) return run_gemv(kern, !tb, n, k, B, ldb, A, beta != T(0), C);
  gemm<T>(false, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace seqfast
