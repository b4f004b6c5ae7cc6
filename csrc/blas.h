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
void sgemv_(const char*, const int*, const int*, const float*, const float*, const int*, const float*, const int*,
            const float*, float*, const int*) __attribute__((weak));
void dgemv_(const char*, const int*, const int*, const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*) __attribute__((weak));
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
inline void blas_gemv(char trans, int m, int n, float alpha, const float* a, int lda, const float* x, int incx,
                      float beta, float* y) {
  const int one = 1;
  sgemv_(&trans, &m, &n, &alpha, a, &lda, x, &incx, &beta, y, &one);
}
inline void blas_gemv(char trans, int m, int n, double alpha, const double* a, int lda, const double* x, int incx,
                      double beta, double* y) {
  const int one = 1;
  dgemv_(&trans, &m, &n, &alpha, a, &lda, x, &incx, &beta, y, &one);
}
template <typename T>
bool have_blas() {
  return std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}
template <typename T>
bool have_gemv() {
  return std::is_same<T, float>::value ? sgemv_ != nullptr : dgemv_ != nullptr;
}
#endif

// Row-major `C[m, n] = op(A) op(B) + beta C` with leading dimensions; `ta`: A is stored `[k, m]`, `tb`: B is `[n, k]`.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if SEQFAST_BLAS
  if (m == 1 && k > 0 && have_gemv<T>()) {
    // one row (an input projection of one step and row): BLAS's matrix-vector product, the one at::addmm makes
    const int K = static_cast<int>(k), N = static_cast<int>(n), ld = static_cast<int>(std::max<int64_t>(ldb, 1));
    const int inc = static_cast<int>(ta ? std::max<int64_t>(lda, 1) : 1);
    if (tb) {
      blas_gemv('T', K, N, T(1), B, ld, A, inc, beta, C);
    } else {
      blas_gemv('N', N, K, T(1), B, ld, A, inc, beta, C);
    }
    return;
  }
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

// `gemm` of a time loop (A not transposed, `beta` 0 or 1): a product of one row runs on this CPU's own kernel.
template <typename T>
void step_gemm(const IsaKernels& kern, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
               int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 1) return run_gemv(kern, !tb, n, k, B, ldb, A, beta != T(0), C);
  gemm<T>(false, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace seqfast
