// The fused time loops and their Python bindings. A step is split into fixed chunks of hidden units: a chunk runs its
// slice of the recurrent GEMM and then the cell math on the slice while it is in cache. The whole loop is one parallel
// region in which each thread keeps its own chunks (so their weights stay in its cache) and waits for the other
// threads only at the end of a step. Chunks do not depend on the thread count, so results are bitwise the same for
// any `torch.set_num_threads`. Rows are visited in length order (longest first), so the rows still running at a step
// are a prefix and the GEMMs shrink as sequences end.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <limits>
#include <cstdlib>
#include <exception>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "isa_kernels.h"

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
namespace {

enum Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

int best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

std::atomic<int> g_isa{best_isa()};

IsaKernels isa_kernels() {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case AVX512: return kernels_avx512();
    case AVX2: return kernels_avx2();
    default: return kernels_generic();
  }
}

void run_fwd(const IsaKernels& k, int cell, const FwdChunk<float>& a) { k.fwd_f32(cell, a); }
void run_fwd(const IsaKernels& k, int cell, const FwdChunk<double>& a) { k.fwd_f64(cell, a); }
void run_bwd(const IsaKernels& k, int cell, const BwdChunk<float>& a) { k.bwd_f32(cell, a); }
void run_bwd(const IsaKernels& k, int cell, const BwdChunk<double>& a) { k.bwd_f64(cell, a); }

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
void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
          float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
          double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas_gemv(char trans, int m, int n, float alpha, const float* a, int lda, const float* x, int incx, float beta,
               float* y) {
  const int one = 1;
  sgemv_(&trans, &m, &n, &alpha, a, &lda, x, &incx, &beta, y, &one);
}
void blas_gemv(char trans, int m, int n, double alpha, const double* a, int lda, const double* x, int incx,
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

void run_gemv(const IsaKernels& kern, bool trans, int64_t n, int64_t k, const float* W, int64_t ldw, const float* x,
              bool accumulate, float* y) {
  kern.gemv_f32(trans, n, k, W, ldw, x, accumulate, y);
}
void run_gemv(const IsaKernels& kern, bool trans, int64_t n, int64_t k, const double* W, int64_t ldw, const double* x,
              bool accumulate, double* y) {
  kern.gemv_f64(trans, n, k, W, ldw, x, accumulate, y);
}

// `gemm` of a time loop (A not transposed, `beta` 0 or 1): a product of one row runs on this CPU's own kernel.
template <typename T>
void step_gemm(const IsaKernels& kern, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
               int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 1) return run_gemv(kern, !tb, n, k, B, ldb, A, beta != T(0), C);
  gemm<T>(false, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

void spin_pause() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_ia32_pause();
#endif
}

// Multiply-adds per step below which one more thread costs more (waking it, a barrier per step) than it saves.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 16;

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

// Visiting order: sorted row `r` is batch entry `perm[r]`; `active[s]` rows (a prefix) run at step `s`.
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct Order {
  std::vector<int64_t> perm, len, active;
  std::vector<uint8_t> zero;  // [T, B] by step and sorted row: the step starts from zeros (resets); empty: none
  int64_t T = 0;
  bool reverse = false, ragged = false;

  // Time index of step `s` for sorted row `r`: a reversed sequence starts at its own last step.
  int64_t time(int64_t s, int64_t r) const {
    if (!reverse) return s;
    if (!ragged) return T - 1 - s;
    return s < len[r] ? len[r] - 1 - s : s;
  }
  int64_t last(int64_t r) const { return ragged ? len[r] : T; }
  // Step `s`'s flags by sorted row, or nullptr when no step starts from zeros (or `s` is past the end).
  const uint8_t* zero_at(int64_t s) const {
    return zero.empty() || s >= T ? nullptr : zero.data() + s * int64_t(perm.size());
  }
};

// `zero`: `[T, B]` bool by time step and batch row, True where that step starts from zeros, or none.
Order make_order(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B, bool reverse,
                 const c10::optional<at::Tensor>& zero = c10::nullopt) {
  Order o;
  o.T = T;
  o.reverse = reverse;
  o.ragged = lengths.has_value();
  o.perm.resize(B);
  std::iota(o.perm.begin(), o.perm.end(), 0);
  o.len.assign(B, T);
  if (o.ragged) {
    const int64_t* l = lengths->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(l[b] >= 0 && l[b] <= T, "lengths must lie in [0, T]; got ", l[b]);
    std::stable_sort(o.perm.begin(), o.perm.end(), [l](int64_t a, int64_t b) { return l[a] > l[b]; });
    for (int64_t r = 0; r < B; ++r) o.len[r] = l[o.perm[r]];
  }
  o.active.resize(T);
  int64_t n = B;
  for (int64_t s = 0; s < T; ++s) {
    while (n > 0 && o.len[n - 1] <= s) --n;
    o.active[s] = n;
  }
  if (zero) {
    const at::Tensor flags = zero->contiguous();
    check(flags, "zero", at::kBool, {T, B});
    const bool* z = flags.data_ptr<bool>();
    o.zero.assign(T * B, 0);
    for (int64_t s = 0; s < T; ++s)
      for (int64_t r = 0; r < o.active[s]; ++r) o.zero[s * B + r] = z[o.time(s, r) * B + o.perm[r]];
  }
  return o;
}

// Packing pays once a call runs at least this many steps and this many rows in all (one row at small T reads the
// weights faster through BLAS than it could pack them).
constexpr int64_t kPackMinSteps = 4, kPackMinRows = 16;
// Memory up to this size a calling thread keeps between calls, per use (packed weights; a loop's state buffers).
constexpr int64_t kKeepBytes = int64_t(32) << 20;

// `n` elements of `T` for one call. Up to `kKeepBytes` they live in a block the calling thread keeps for its next call
// of the same `Use`, so repeated calls neither allocate nor fault fresh pages in (glibc hands large freed blocks back
// to the system); a larger request, or one while the thread's block is in use, gets its own allocation.
enum class Use { kPackedWeights, kLoopState };

template <Use use, typename T>
class KeptBuffer {
 public:
  explicit KeptBuffer(int64_t n) {
    Kept& k = kept();
    const int64_t bytes = n * int64_t(sizeof(T));
    if (k.busy || bytes > kKeepBytes) {
      own_ = at::empty({bytes}, at::kByte);
      data_ = reinterpret_cast<T*>(own_.data_ptr<uint8_t>());
      return;
    }
    if (bytes > k.bytes) {
      std::free(k.p);
      k.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      k.bytes = k.p ? bytes : 0;
      TORCH_CHECK(k.p, "out of memory allocating ", bytes, " bytes");
    }
    k.busy = true;
    kept_ = &k;
    data_ = static_cast<T*>(k.p);
  }
  ~KeptBuffer() {
    if (kept_) kept_->busy = false;
  }
  KeptBuffer(const KeptBuffer&) = delete;
  KeptBuffer& operator=(const KeptBuffer&) = delete;
  T* data() const { return data_; }

 private:
  struct Kept {
    void* p = nullptr;
    int64_t bytes = 0;
    bool busy = false;
    ~Kept() { std::free(p); }
  };
  static Kept& kept() {
    thread_local Kept k;
    return k;
  }
  Kept* kept_ = nullptr;
  T* data_ = nullptr;
  at::Tensor own_;
};

// Consecutive arrays carved from one block: `take(n)` returns the next `n` elements.
template <typename T>
class Carve {
 public:
  explicit Carve(T* p) : p_(p) {}
  T* take(int64_t n) {
    T* q = p_;
    p_ += n;
    return q;
  }

 private:
  T* p_;
};

// The recurrent product of one call, chunk by chunk, straight from `w [G*H, P]`: forward, gate by gate,
// `C[n, g*n_j : (g+1)*n_j] = h[n, P] w[g*H + j0 : g*H + j0 + n_j]^T`; backward `C[n, n_j] = da[n, G*H]
// w[:, j0 : j0 + n_j]`. float32 runs this CPU's GEMM on weight panels packed once per call when the call repays the
// packing (`kPackMinSteps`, `kPackMinRows`); a step of one row runs this CPU's matrix-vector kernel; otherwise (and
// float64) BLAS, the forward of a call with that many rows on a copy of `w` with each chunk's gate rows side by side,
// one BLAS call per chunk instead of one per gate.
template <typename T>
class HiddenProduct {
 public:
  HiddenProduct(const at::Tensor& w, int64_t G, int64_t H, int64_t hc, bool backward, const Order& ord,
                const IsaKernels& kern)
      : w_(w.data_ptr<T>()), G_(G), H_(H), P_(w.size(1)), hc_(hc), backward_(backward), kern_(kern) {
    const int64_t rows = std::accumulate(ord.active.begin(), ord.active.end(), int64_t(0));
    const int64_t nch = (H + hc - 1) / hc;
    if (rows < kPackMinRows) return;
    if constexpr (std::is_same_v<T, float>) {
      if (ord.T >= kPackMinSteps) {
        const int64_t nb = blocks(), K = depth();
        offsets_.resize(nch * nb + 1, 0);
        for (int64_t i = 0; i < nch * nb; ++i) offsets_[i + 1] = offsets_[i] + K * round_up(width(i / nb));
        packed_ = buffer_.emplace(offsets_.back()).data();
        at::parallel_for(0, nch, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            if (backward_) {
              kern_.pack(K, width(c), w_ + c * hc_, P_, 1, packed_ + offsets_[c]);
              continue;
            }
            for (int64_t g = 0; g < G_; ++g)
              kern_.pack(K, width(c), w_ + (g * H_ + c * hc_) * P_, 1, P_, packed_ + offsets_[c * G_ + g]);
          }
        });
        return;
      }
    }
    if (backward_ || nch == 1 || G_ == 1) return;
    grouped_ = buffer_.emplace(G_ * H_ * P_).data();
    for (int64_t c = 0; c < nch; ++c)
      for (int64_t g = 0; g < G_; ++g)
        std::copy_n(w_ + (g * H_ + c * hc_) * P_, width(c) * P_, grouped_ + (c * G_ * hc_ + g * width(c)) * P_);
  }

  void operator()(int64_t c, int64_t n, const T* A, int64_t lda, T* C, int64_t ldc, bool accumulate) const {
    const int64_t j0 = c * hc_, n_j = width(c);
    if (backward_) return product(c, n, n_j, A, lda, w_ + j0, false, C, ldc, accumulate);
    // one chunk holding every unit: its gates side by side are w's rows in order, one product
    if (n_j == H_ && !packed_) return step_gemm<T>(kern_, true, n, G_ * H_, P_, A, lda, w_, P_, T(accumulate), C, ldc);
    if (grouped_)
      return step_gemm<T>(kern_, true, n, G_ * n_j, P_, A, lda, grouped_ + c * G_ * hc_ * P_, P_, T(accumulate), C, ldc);
    for (int64_t g = 0; g < G_; ++g)
      product(c * G_ + g, n, n_j, A, lda, w_ + (g * H_ + j0) * P_, true, C + g * n_j, ldc, accumulate);
  }

 private:
  // `C[n, n_j] = A B`: block `i` of the packed panels, else BLAS on `B` (`[K, n_j]`, or `[n_j, K]` when `tb`).
  void product(int64_t i, int64_t n, int64_t n_j, const T* A, int64_t lda, const T* B, bool tb, T* C, int64_t ldc,
               bool accumulate) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_) return kern_.gemm(n, n_j, depth(), A, lda, packed_ + offsets_[i], accumulate, C, ldc);
    }
    step_gemm<T>(kern_, tb, n, n_j, depth(), A, lda, B, P_, T(accumulate), C, ldc);
  }
  int64_t blocks() const { return backward_ ? 1 : G_; }
  int64_t depth() const { return backward_ ? G_ * H_ : P_; }
  int64_t width(int64_t c) const { return std::min(hc_, H_ - c * hc_); }
  int64_t round_up(int64_t n) const { return (n + kern_.nr - 1) / kern_.nr * kern_.nr; }

  const T* w_;
  int64_t G_, H_, P_, hc_;
  bool backward_;
  IsaKernels kern_;
  std::vector<int64_t> offsets_;
  std::optional<KeptBuffer<Use::kPackedWeights, T>> buffer_;
  T* packed_ = nullptr;   // float32: panels packed for kern_.gemm
  T* grouped_ = nullptr;  // BLAS forward: w's rows chunk by chunk, each chunk's gates side by side
};

// `dst[r] = src[perm[r]]` (to sorted order) or `dst[perm[r]] = src[r]` (back), rows of `width`.
template <typename T>
void permute_rows(const T* src, T* dst, const Order& o, int64_t width, bool to_sorted) {
  for (size_t r = 0; r < o.perm.size(); ++r) {
    const int64_t b = o.perm[r];
    std::copy_n(src + (to_sorted ? b : r) * width, width, dst + (to_sorted ? r : b) * width);
  }
}


void check_cell(int64_t cell) { TORCH_CHECK(cell >= RNN_TANH && cell <= GRU, "unknown cell id ", cell); }

// Zoneout of a call: the weights of the previous state, `h [T, B, P]` and LSTM's `c [T, B, H]` in time order (training
// masks), else the constant `keep` for every unit (evaluation); off when neither is given.
struct ZoneoutArgs {
  c10::optional<at::Tensor> h, c;
  double keep = 0;
  bool on() const { return h.has_value() || keep > 0; }
};

// Zoneout row pointers of one call in step order, like `gx_rows`: per step and sorted row, its `width` weights.
template <typename T>
class ZoneoutRows {
 public:
  ZoneoutRows(const c10::optional<at::Tensor>& keep, double constant, bool on, int64_t width, const Order& ord,
              int64_t B)
      : on_(on), keep_(static_cast<T>(constant)), B_(B) {
    if (!on || !keep) return;
    const T* p = keep->data_ptr<T>();
    rows_.resize(ord.T * B);
    for (int64_t s = 0; s < ord.T; ++s)
      for (int64_t r = 0; r < ord.active[s]; ++r) rows_[s * B + r] = p + (ord.time(s, r) * B + ord.perm[r]) * width;
  }
  Zoneout<T> at(int64_t s) const { return {on_, rows_.empty() ? nullptr : rows_.data() + s * B_, keep_}; }
  // The weight of sorted row `r`'s unit `j` at step `s`.
  T weight(int64_t s, int64_t r, int64_t j) const { return rows_.empty() ? keep_ : rows_[s * B_ + r][j]; }

 private:
  bool on_;
  T keep_;
  int64_t B_;
  std::vector<const T*> rows_;
};

template <typename scalar_t>
void fwd_loop(int cell, const at::Tensor& gx, const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias,
              const at::Tensor& h0, const at::Tensor& c0, const Order& ord, const c10::optional<at::Tensor>& w_hr,
              const ZoneoutArgs& zo, int64_t chunk, const at::Tensor& y, const at::Tensor& hT, const at::Tensor& cT,
              const at::Tensor& saved) {
  const int64_t T = gx.size(0), B = gx.size(1), GH = gx.size(2), G = gates(cell), H = GH / G, P = w_hh.size(1);
  const bool proj = w_hr.has_value(), lstm = cell == LSTM;
  const int64_t hc = std::min(chunk, H), nch = (H + hc - 1) / hc, SW = saved_width(cell, zo.on()) * H;
  // a projected h's zoneout runs after the projection, here; the cell kernel's otherwise
  const ZoneoutRows<scalar_t> zh(zo.h, zo.keep, zo.on(), P, ord, B), zc(zo.c, zo.keep, zo.on() && lstm, H, ord, B);
  const int64_t pcs = std::min(chunk, P), npc = (P + pcs - 1) / pcs;
  const IsaKernels kern = isa_kernels();
  const HiddenProduct<scalar_t> whh(w_hh, G, H, hc, false, ord, kern);
  const int64_t BC = lstm ? B * H : 0, BR = proj ? B * H : 0;
  const KeptBuffer<Use::kLoopState, scalar_t> state(2 * B * P + BC + BR + B * GH + (bias ? 0 : GH));
  Carve<scalar_t> carve(state.data());
  scalar_t* hb = carve.take(2 * B * P);  // [2, B, P] state before / after the step
  scalar_t* pc = carve.take(BC);         // [B, H]
  scalar_t* phraw = carve.take(BR);      // [B, H] o * tanh(c) before projecting
  scalar_t* pws = carve.take(B * GH);    // per chunk [B, G*hc]
  scalar_t* zeros = bias ? nullptr : carve.take(GH);
  if (zeros) std::fill_n(zeros, GH, scalar_t(0));
  scalar_t* py = y.data_ptr<scalar_t>();
  scalar_t* psaved = saved.numel() ? saved.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pgx = gx.data_ptr<scalar_t>();
  const scalar_t* pb = bias ? bias->data_ptr<scalar_t>() : zeros;
  const scalar_t* pwr = proj ? w_hr->data_ptr<scalar_t>() : nullptr;
  permute_rows(h0.data_ptr<scalar_t>(), hb, ord, P, true);
  if (lstm) permute_rows(c0.data_ptr<scalar_t>(), pc, ord, H, true);
  if (const uint8_t* z = ord.zero_at(0)) {
    for (int64_t r = 0; r < ord.active[0]; ++r) {
      if (!z[r]) continue;
      std::fill_n(hb + r * P, P, scalar_t(0));
      if (lstm) std::fill_n(pc + r * H, H, scalar_t(0));
    }
  }
  std::vector<const scalar_t*> gx_rows(T * B);  // [T, B] step s's rows, in sorted order
  std::vector<scalar_t*> y_rows(T * B);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t n = ord.active[s];
    for (int64_t r = 0; r < n; ++r) {
      const int64_t off = ord.time(s, r) * B + ord.perm[r];
      gx_rows[s * B + r] = pgx + off * GH;
      y_rows[s * B + r] = py + off * P;
    }
    for (int64_t r = n; r < B; ++r) {
      std::fill_n(py + (s * B + ord.perm[r]) * P, P, scalar_t(0));
      if (psaved) std::fill_n(psaved + (s * B + r) * SW, SW, scalar_t(0));
    }
  }
  auto cell_step = [&](int64_t s, int64_t c) {
    const int64_t n = ord.active[s];
    if (n == 0) return;
    const int64_t j0 = c * hc, n_j = std::min(hc, H - j0);
    scalar_t* cur = hb + (s % 2) * B * P;
    scalar_t* nxt = hb + ((s + 1) % 2) * B * P;
    scalar_t* wsc = pws + B * G * j0;
    whh(c, n, cur, P, wsc, G * n_j, false);
    FwdChunk<scalar_t> a{n,  H,  j0, n_j, wsc, gx_rows.data() + s * B, pb, cur, proj ? phraw : nxt, proj ? H : P, pc,
                         proj ? nullptr : y_rows.data() + s * B, psaved ? psaved + s * B * SW : nullptr,
                         ord.zero_at(s + 1), proj ? Zoneout<scalar_t>{} : zh.at(s), zc.at(s)};
    run_fwd(kern, cell, a);
  };
  if (!proj) {
    run_steps(T, nch, B * GH * P, cell_step);
  } else {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t n = ord.active[s];
      if (n == 0) break;
      at::parallel_for(0, nch, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) cell_step(s, c);
      });
      const scalar_t* cur = hb + (s % 2) * B * P;
      scalar_t* nxt = hb + ((s + 1) % 2) * B * P;
      scalar_t* const* ys = y_rows.data() + s * B;
      at::parallel_for(0, npc, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t p0 = c * pcs, n_p = std::min(pcs, P - p0);
          step_gemm<scalar_t>(kern, true, n, n_p, H, phraw, H, pwr + p0 * H, H, scalar_t(0), nxt + p0, P);
          const uint8_t* z = ord.zero_at(s + 1);
          for (int64_t r = 0; r < n; ++r) {
            if (zo.on()) {
              for (int64_t p = p0; p < p0 + n_p; ++p) {
                const scalar_t k = zh.weight(s, r, p);
                nxt[r * P + p] = k * cur[r * P + p] + (1 - k) * nxt[r * P + p];
              }
            }
            std::copy_n(nxt + r * P + p0, n_p, ys[r] + p0);
            if (z && z[r]) std::fill_n(nxt + r * P + p0, n_p, scalar_t(0));
          }
        }
      });
    }
  }
  scalar_t* phT = hT.data_ptr<scalar_t>();
  for (int64_t r = 0; r < B; ++r)
    std::copy_n(hb + (ord.last(r) % 2) * B * P + r * P, P, phT + ord.perm[r] * P);
  if (lstm) permute_rows(pc, cT.data_ptr<scalar_t>(), ord, H, false);
}

template <typename scalar_t>
void bwd_loop(int cell, const at::Tensor& dy, const at::Tensor& dhT, const at::Tensor& dcT, const at::Tensor& w_hh,
              const c10::optional<at::Tensor>& w_hr, const at::Tensor& h0, const at::Tensor& c0, const Order& ord,
              const ZoneoutArgs& zo, const at::Tensor& y, const at::Tensor& saved, int64_t chunk,
              const at::Tensor& dgx, const at::Tensor& dgh, const at::Tensor& dh0, const at::Tensor& dc0,
              const at::Tensor& dw_hr) {
  const int64_t T = dy.size(0), B = dy.size(1), P = dy.size(2), G = gates(cell), GH = w_hh.size(0), H = GH / G;
  const bool need_dh0 = dh0.defined();
  const bool proj = w_hr.has_value(), lstm = cell == LSTM;
  const int64_t hc = std::min(chunk, H), nch = (H + hc - 1) / hc, SW = saved_width(cell, zo.on()) * H;
  const ZoneoutRows<scalar_t> zh(zo.h, zo.keep, zo.on(), P, ord, B), zc(zo.c, zo.keep, zo.on() && lstm, H, ord, B);
  const int64_t pcs = std::min(chunk, P), npc = (P + pcs - 1) / pcs;
  const IsaKernels kern = isa_kernels();
  const int64_t BC = lstm ? B * H : 0, BR = proj ? B * H : 0, BP = proj ? B * P : 0;
  const KeptBuffer<Use::kLoopState, scalar_t> state(2 * B * P + 2 * BC + (proj ? 1 : 2) * B * GH + BP + 2 * BR);
  Carve<scalar_t> carve(state.data());
  scalar_t* pdh = carve.take(B * P);                 // [B, P] gradient reaching h from later steps
  scalar_t* pdc = carve.take(BC);                    // [B, H]
  scalar_t* ph0s = carve.take(B * P);                // [B, P] h0 in sorted order
  scalar_t* pc0s = carve.take(BC);                   // [B, H] c0 in sorted order
  scalar_t* pda = carve.take((proj ? 1 : 2) * B * GH);  // dgh of the step, double-buffered
  scalar_t* pdhs = carve.take(BP);                   // [B, P] dh at the step (projection)
  scalar_t* pdhraw = carve.take(BR);                 // [B, H] dhs @ w_hr
  scalar_t* phraw = carve.take(BR);                  // [B, H] o * tanh(c)
  scalar_t* pdgx = dgx.data_ptr<scalar_t>();
  scalar_t* pdgh = cell == GRU ? dgh.data_ptr<scalar_t>() : nullptr;  // the other cells' dgh is dgx
  const scalar_t* ph0 = ph0s;
  const scalar_t* pc0 = pc0s;
  const scalar_t* pdy = dy.data_ptr<scalar_t>();
  const scalar_t* py = y.data_ptr<scalar_t>();
  const scalar_t* psaved = saved.data_ptr<scalar_t>();
  const scalar_t* pw = w_hh.data_ptr<scalar_t>();
  const scalar_t* pwr = proj ? w_hr->data_ptr<scalar_t>() : nullptr;
  scalar_t* pdw = proj ? dw_hr.data_ptr<scalar_t>() : nullptr;
  permute_rows(dhT.data_ptr<scalar_t>(), pdh, ord, P, true);
  permute_rows(h0.data_ptr<scalar_t>(), ph0s, ord, P, true);
  if (lstm) {
    permute_rows(dcT.data_ptr<scalar_t>(), pdc, ord, H, true);
    permute_rows(c0.data_ptr<scalar_t>(), pc0s, ord, H, true);
  }
  if (proj) std::fill_n(pdw, P * H, scalar_t(0));
  std::vector<const scalar_t*> dy_rows(T * B), h_rows(T * B);  // [T, B] step s's rows, in sorted order
  std::vector<scalar_t*> dgx_rows(T * B), dgh_rows(T * B);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t n = ord.active[s];
    for (int64_t r = 0; r < n; ++r) {
      const int64_t off = ord.time(s, r) * B + ord.perm[r], i = s * B + r;
      dy_rows[i] = pdy + off * P;
      dgx_rows[i] = pdgx + off * GH;
      dgh_rows[i] = pdgh ? pdgh + off * GH : nullptr;
      if (cell == GRU) {
        h_rows[i] = s > 0 ? py + (ord.time(s - 1, r) * B + ord.perm[r]) * P : ph0 + r * P;
      } else {
        h_rows[i] = py + off * P;
      }
    }
    for (int64_t r = n; r < B; ++r) {
      std::fill_n(pdgx + (s * B + ord.perm[r]) * GH, GH, scalar_t(0));
      if (pdgh) std::fill_n(pdgh + (s * B + ord.perm[r]) * GH, GH, scalar_t(0));
    }
  }
  // dh_prev = da @ w_hh (GRU: + dh z, left in dhbuf by the cell math); chunks of P = H columns.
  const std::optional<HiddenProduct<scalar_t>> whh =
      proj ? std::nullopt : std::make_optional<HiddenProduct<scalar_t>>(w_hh, G, H, hc, true, ord, kern);
  // `dh` columns [p0, p0 + n_p) of the rows whose step `s` started from zeros: no gradient reaches the state before
  auto clear_dh = [&](int64_t s, int64_t n, int64_t p0, int64_t n_p) {
    if (const uint8_t* z = ord.zero_at(s))
      for (int64_t r = 0; r < n; ++r)
        if (z[r]) std::fill_n(pdh + r * P + p0, n_p, scalar_t(0));
  };
  // dh before step `s`, columns of chunk `c`, from step `s`'s `da`
  // the cell math leaves GRU's dh z, and zoneout's k dh, in dh for the product to add to
  auto dh_prev = [&](int64_t s, int64_t c, int64_t n, const scalar_t* da) {
    (*whh)(c, n, da, GH, pdh + c * hc, P, cell == GRU || zo.on());
    clear_dh(s, n, c * hc, std::min(hc, H - c * hc));
  };
  auto c_prev = [&](int64_t s) { return s > 0 ? psaved + (s - 1) * B * SW + (zo.on() ? 5 : 4) * H : pc0; };
  auto ldc = [&](int64_t s) { return s > 0 ? SW : H; };

  if (!proj) {
    // Step k runs time step T - 1 - k; step T forms dh0 from the last da (when wanted).
    run_steps(T + need_dh0, nch, B * GH * P, [&](int64_t k, int64_t c) {
      const int64_t s = T - 1 - k;
      if (s < 0) {
        if (ord.active[0] > 0) dh_prev(0, c, ord.active[0], pda);
        return;
      }
      const int64_t n = ord.active[s], n_next = s + 1 < T ? ord.active[s + 1] : 0;
      if (n == 0) return;
      scalar_t* da = pda + (s % 2) * B * GH;
      if (n_next > 0) dh_prev(s + 1, c, n_next, pda + ((s + 1) % 2) * B * GH);
      const int64_t j0 = c * hc, i = s * B;
      BwdChunk<scalar_t> a{n,        H,      j0,  std::min(hc, H - j0), pdh,           dy_rows.data() + i,
                           pdc,      psaved + s * B * SW, c_prev(s), ldc(s), h_rows.data() + i, dgx_rows.data() + i,
                           dgh_rows.data() + i, da, nullptr, ord.zero_at(s), zh.at(s), zc.at(s)};
      run_bwd(kern, cell, a);
    });
  } else {
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t n = ord.active[s], i = s * B;
      if (n == 0) continue;
      const scalar_t* sv = psaved + s * B * SW;
      // dhs: the gradient reaching the projected h~ (zoneout's k dh goes to the step before, through dh)
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t dh = pdh[r * P + p] + dy_rows[i + r][p];
          if (!zo.on()) {
            pdhs[r * P + p] = dh;
            continue;
          }
          const scalar_t k = zh.weight(s, r, p);
          pdhs[r * P + p] = (1 - k) * dh;
          pdh[r * P + p] = k * dh;
        }
      }
      at::parallel_for(0, nch, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t j0 = c * hc, n_j = std::min(hc, H - j0);
          step_gemm<scalar_t>(kern, false, n, n_j, P, pdhs, P, pwr + j0, H, scalar_t(0), pdhraw + j0, H);
          BwdChunk<scalar_t> a{n,         H,      j0,  n_j, pdhraw, nullptr, pdc, sv, c_prev(s), ldc(s),
                               h_rows.data() + i, dgx_rows.data() + i, dgh_rows.data() + i, pda, phraw,
                               ord.zero_at(s), Zoneout<scalar_t>{}, zc.at(s)};
          run_bwd(kern, cell, a);
        }
      });
      at::parallel_for(0, npc, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t p0 = c * pcs, n_p = std::min(pcs, P - p0);
          if (s > 0 || need_dh0) {
            step_gemm<scalar_t>(kern, false, n, n_p, GH, pda, GH, pw + p0, P, scalar_t(zo.on()), pdh + p0, P);
            clear_dh(s, n, p0, n_p);
          }
          gemm<scalar_t>(true, false, n_p, H, n, pdhs + p0, P, phraw, H, scalar_t(1), pdw + p0 * H, H);
        }
      });
    }
  }
  if (need_dh0) permute_rows(pdh, dh0.data_ptr<scalar_t>(), ord, P, false);
  if (lstm) permute_rows(pdc, dc0.data_ptr<scalar_t>(), ord, H, false);
}

// The extension's own ATen calls skip the autograd layers of the dispatcher: nothing they do is differentiated
// (`layer`'s node records its own backward, which runs without grad), and what they return is never a view of an
// input.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// An output of `sizes`, NaN-filled when `poison` (so an element the loop leaves unwritten fails loudly).
at::Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor as(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t.contiguous() : t.to(dt).contiguous();
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

c10::optional<at::Tensor> as(const c10::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t) return c10::nullopt;
  return as(*t, dt);
}

#if SEQFAST_BLAS
// Whether `project` can make the BLAS call at::addmm (at::mm without a bias) would make for the product itself.
bool direct_projection(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b_ih,
                       const c10::optional<at::Tensor>& b_fold) {
  const auto dt = x.scalar_type();
  const bool blas = dt == at::kFloat ? have_blas<float>() : dt == at::kDouble && have_blas<double>();
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  return blas && w.scalar_type() == dt && (!b_ih || b_ih->scalar_type() == dt) &&
         (!b_fold || b_fold->scalar_type() == dt) && x.is_contiguous() && w.is_contiguous() && w.dim() == 2 &&
         w.size(1) == K && M > 0 && K > 0 && M < INT_MAX && K < INT_MAX && w.size(0) < INT_MAX;
}

// `gx [M, N] = x [M, K] w^T + b_ih + b_fold`: the biases' sum copied to every row, then one GEMM adding to it.
template <typename T>
void project_blas(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b_ih,
                  const c10::optional<at::Tensor>& b_fold, const at::Tensor& gx) {
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  T* c = gx.data_ptr<T>();
  const at::Tensor bi = b_ih ? b_ih->contiguous() : at::Tensor(), bf = b_fold ? b_fold->contiguous() : at::Tensor();
  const T* pi = bi.defined() ? bi.data_ptr<T>() : nullptr;
  const T* pf = bf.defined() ? bf.data_ptr<T>() : nullptr;
  if (pi || pf) {
    for (int64_t n = 0; n < N; ++n) c[n] = pi && pf ? pi[n] + pf[n] : pi ? pi[n] : pf[n];
    for (int64_t m = 1; m < M; ++m) std::copy_n(c, N, c + m * N);
  }
  gemm<T>(false, true, M, N, K, x.data_ptr<T>(), K, w.data_ptr<T>(), K, T(pi || pf), c, N);
}
#endif

// `F.linear(x, w, b_ih + b_fold)` (either bias may be None) with the ops `seqfast.linear.project` runs for it. The
// products it gets (`project` leaves large float32 ones to oneDNN) go straight to the BLAS call at::addmm would make,
// bitwise the same result without at::linear's dispatch.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b_ih,
                   const c10::optional<at::Tensor>& b_fold) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
#if SEQFAST_BLAS
  if (direct_projection(x, w, b_ih, b_fold)) {
    const at::Tensor gx = at::empty(sizes, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast_project", [&] { project_blas<scalar_t>(x, w, b_ih, b_fold, gx); });
    return gx;
  }
#endif
  const c10::optional<at::Tensor> b = b_ih && b_fold ? c10::make_optional(at::add(*b_ih, *b_fold)) : b_ih ? b_ih : b_fold;
  if (x.is_contiguous()) return at::linear(x, w, b);
  return at::linear(x.reshape({-1, x.size(-1)}), w, b).reshape(sizes);
}

// The forward loop on `gx`'s dtype (float32 or float64); other inputs are converted to it. Returns `y [T, B, P]`,
// `hT [B, P]` in h0's dtype, `cT [B, H]` in c0's dtype (LSTM), `saved [T, B, W*H]` (`[0]` unless `need_saved`);
// `hT_out`, `cT_out`, when defined, are contiguous tensors of `gx`'s dtype that the final states are written into.
// `zo` checked and in dtype `dt`: weights `h [T, B, P]` and, for LSTM, `c [T, B, H]` together, or a constant in [0, 1).
ZoneoutArgs zoneout_in(const ZoneoutArgs& zo, at::ScalarType dt, int64_t T, int64_t B, int64_t P, int64_t H,
                       bool lstm) {
  TORCH_CHECK(zo.keep >= 0 && zo.keep < 1, "zoneout's keep must lie in [0, 1), got ", zo.keep);
  TORCH_CHECK(!zo.h || zo.keep == 0, "give zoneout's weights or its constant, not both");
  if (lstm) {
    TORCH_CHECK(zo.h.has_value() == zo.c.has_value(), "lstm's zoneout weights come for h and c together");
  } else {
    TORCH_CHECK(!zo.c, "zoneout weights of c are lstm's only");
  }
  ZoneoutArgs out{as(zo.h, dt), as(zo.c, dt), zo.keep};
  if (out.h) check(*out.h, "keep_h", dt, {T, B, P});
  if (out.c) check(*out.c, "keep_c", dt, {T, B, H});
  return out;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor> fwd_into(
    int64_t cell, const c10::optional<at::Tensor>& gx_given, const c10::optional<at::Tensor>& x,
    const c10::optional<at::Tensor>& w_ih, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_fold, const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& b_hh_in,
    const at::Tensor& h0_in, const c10::optional<at::Tensor>& c0_in, const c10::optional<at::Tensor>& lengths_in,
    const c10::optional<at::Tensor>& w_hr_in, bool reverse, bool need_saved, int64_t chunk, bool poison,
    const at::Tensor& hT_out, const at::Tensor& cT_out, const c10::optional<at::Tensor>& zero = c10::nullopt,
    const ZoneoutArgs& zo_in = {}) {
  const BelowAutograd below;
  check_cell(cell);
  TORCH_CHECK(gx_given.has_value() != (x.has_value() && w_ih.has_value()), "give gx, or x and w_ih to form it");
  const at::Tensor gx_in = gx_given ? *gx_given : project(*x, *w_ih, b_ih, b_fold);
  TORCH_CHECK(gx_in.dim() == 3, "gx must be [T, B, G*H]");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const auto dt = gx_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "gx must be float32 or float64, got ", dt);
  const int64_t T = gx_in.size(0), B = gx_in.size(1), GH = gx_in.size(2), G = gates(cell), H = GH / G;
  TORCH_CHECK(H > 0 && GH == G * H, "gx's last dimension must be a positive multiple of ", G);
  TORCH_CHECK(T < INT_MAX && B < INT_MAX && GH < INT_MAX, "sizes must fit BLAS's 32-bit integers");
  const bool lstm = cell == LSTM, proj = w_hr_in.has_value();
  TORCH_CHECK(!proj || lstm, "w_hr (projection) needs the lstm cell");
  TORCH_CHECK(c0_in.has_value() == lstm, "c0 is given exactly for lstm");
  const int64_t P = proj ? w_hr_in->size(0) : H;
  const at::Tensor gx = gx_in.contiguous(), w_hh = as(w_hh_in, dt), h0 = as(h0_in, dt);
  const auto b_hh = as(b_hh_in, dt), c0 = as(c0_in, dt), w_hr = as(w_hr_in, dt);
  const auto lengths = as(lengths_in, at::kLong);
  check(w_hh, "w_hh", dt, {GH, P});
  if (b_hh) check(*b_hh, "b_hh", dt, {GH});
  check(h0, "h0", dt, {B, P});
  if (proj) check(*w_hr, "w_hr", dt, {P, H});
  if (lstm) check(*c0, "c0", dt, {B, H});
  if (lengths) check(*lengths, "lengths", at::kLong, {B});
  const ZoneoutArgs zo = zoneout_in(zo_in, dt, T, B, P, H, lstm);
  const auto opts = gx.options();
  const at::Tensor y = output({T, B, P}, opts, poison);
  const at::Tensor hT = hT_out.defined() ? hT_out : output({B, P}, opts, poison);
  const at::Tensor cT = !lstm ? at::Tensor() : cT_out.defined() ? cT_out : output({B, H}, opts, poison);
  const at::Tensor saved =
      need_saved ? output({T, B, saved_width(cell, zo.on()) * H}, opts, poison) : at::empty({0}, opts);
  const Order ord = make_order(lengths, T, B, reverse, zero);
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast_fwd", [&] {
    fwd_loop<scalar_t>(static_cast<int>(cell), gx, w_hh, b_hh, h0, lstm ? *c0 : cT, ord, w_hr, zo, chunk, y, hT, cT,
                       saved);
  });
  return {y, in_dtype(hT, h0_in.scalar_type()),
          lstm ? c10::make_optional(in_dtype(cT, c0_in->scalar_type())) : c10::nullopt, saved};
}

// `fwd_into` allocating every output.
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor> fwd(
    int64_t cell, const c10::optional<at::Tensor>& gx, const c10::optional<at::Tensor>& x,
    const c10::optional<at::Tensor>& w_ih, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_fold, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& h0, const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& w_hr, bool reverse, bool need_saved, int64_t chunk, bool poison,
    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& keep_h,
    const c10::optional<at::Tensor>& keep_c, double keep) {
  return fwd_into(cell, gx, x, w_ih, b_ih, b_fold, w_hh, b_hh, h0, c0, lengths, w_hr, reverse, need_saved, chunk, poison,
                  at::Tensor(), at::Tensor(), zero, {keep_h, keep_c, keep});
}

// `(b_fold, b_h)`: the part of `b_hh` added to the input projection and the part left to the recurrence, split as
// `seqfast.autograd.folded_biases` splits it (GRU keeps `b_hh` in the recurrence for its n gate).
std::pair<c10::optional<at::Tensor>, c10::optional<at::Tensor>> folded_biases(int64_t cell,
                                                                              const c10::optional<at::Tensor>& b_hh) {
  if (cell == GRU) return {c10::nullopt, b_hh};
  return {b_hh, c10::nullopt};
}

// A stack's forward without grad, each layer-direction a `fwd` from its input (biases split by `folded_biases`), the
// directions' outputs side by side as the next layer's input.
// `weights`: `w_ih, w_hh, b_ih, b_hh, w_hr` of each layer-direction in turn. Returns `y [T, B, D*P]`, `hn [L*D, B, P]`,
// `cn [L*D, B, H]` (LSTM).
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> stack(
    int64_t cell, const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const std::vector<c10::optional<at::Tensor>>& weights, bool bidirectional, int64_t chunk, bool poison) {
  const BelowAutograd below;
  const int64_t D = bidirectional ? 2 : 1, layers = static_cast<int64_t>(weights.size()) / (5 * D);
  TORCH_CHECK(layers > 0 && layers * 5 * D == static_cast<int64_t>(weights.size()),
              "weights must hold 5 tensors (or None) per layer-direction");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == layers * D, "h0 must be [L*D, B, P]");
  const bool lstm = cell == LSTM;
  TORCH_CHECK(c0.has_value() == lstm && (!c0 || c0->dim() == 3), "c0 [L*D, B, H] is given exactly for lstm");
  // each layer-direction writes its final state straight into its slice of `hn`, `cn`, in the loops' dtype (the
  // projections': `x`'s); states given in another dtype get theirs back at the end, as `fwd` returns them
  const auto opts = x.options();
  at::Tensor hn = output(h0.sizes(), opts, poison);
  at::Tensor cn = lstm ? output(c0->sizes(), opts, poison) : at::Tensor();
  std::vector<at::Tensor> outputs;
  at::Tensor input = x;
  for (int64_t l = 0; l < layers; ++l) {
    outputs.clear();
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = l * D + d;
      const auto* w = &weights[5 * k];
      TORCH_CHECK(w[0] && w[1], "a layer-direction's w_ih and w_hh are tensors");
      const auto c0k = lstm ? c10::make_optional(c0->select(0, k)) : c10::nullopt;
      const auto [b_fold, b_h] = folded_biases(cell, w[3]);
      auto [y, hT, cT, saved] =
          fwd_into(cell, c10::nullopt, input, w[0], w[2], b_fold, *w[1], b_h, h0.select(0, k), c0k, c10::nullopt, w[4],
                   d == 1, false, chunk, poison, hn.select(0, k), lstm ? cn.select(0, k) : at::Tensor());
      outputs.push_back(y);
    }
    input = D == 1 ? outputs[0] : at::cat(outputs, 2);
  }
  const auto cn_out = lstm ? c10::make_optional(in_dtype(cn, c0->scalar_type())) : c10::nullopt;
  return {input, in_dtype(hn, h0.scalar_type()), cn_out};
}

// One step of a cell without grad: `stack`'s layer over `x [B, I]` from `h0 [B, H]` (and `c0`). Returns
// `(h [B, H], c [B, H] or None)`.
std::tuple<at::Tensor, c10::optional<at::Tensor>> step(
    int64_t cell, const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, int64_t chunk, bool poison) {
  const BelowAutograd below;
  const auto [b_fold, b_h] = folded_biases(cell, b_hh);
  auto [y, hT, cT, saved] = fwd(cell, c10::nullopt, x.unsqueeze(0), w_ih, b_ih, b_fold, w_hh, b_h, h0, c0,
                                c10::nullopt, c10::nullopt, false, false, chunk, poison, c10::nullopt, c10::nullopt,
                                c10::nullopt, 0.0);
  return {hT, cT};
}

// The backward loop on `saved`'s dtype. Returns `dgx [T, B, G*H]` and `dgh` (GRU; the other cells' is dgx) in dy's
// dtype, `dh0 [B, P]` in h0's (undefined unless `need_dh0`: the first step then skips its product with w_hh),
// `dc0 [B, H]` in c0's (LSTM), `dw_hr [P, H]` in w_hr's (projection).
std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>
bwd(int64_t cell, const at::Tensor& dy_in, const at::Tensor& dhT_in, const c10::optional<at::Tensor>& dcT_in,
    const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& w_hr_in, const at::Tensor& h0_in,
    const c10::optional<at::Tensor>& c0_in, const c10::optional<at::Tensor>& lengths_in, const at::Tensor& y_in,
    const at::Tensor& saved, bool reverse, int64_t chunk, bool poison, bool need_dh0,
    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& keep_h,
    const c10::optional<at::Tensor>& keep_c, double keep) {
  const BelowAutograd below;
  check_cell(cell);
  TORCH_CHECK(dy_in.dim() == 3 && w_hh_in.dim() == 2, "dy must be [T, B, P] and w_hh [G*H, P]");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const auto dt = saved.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "saved must be float32 or float64, got ", dt);
  const int64_t T = dy_in.size(0), B = dy_in.size(1), P = dy_in.size(2), G = gates(cell), GH = w_hh_in.size(0);
  const int64_t H = GH / G;
  TORCH_CHECK(H > 0 && GH == G * H, "w_hh's first dimension must be a positive multiple of ", G);
  TORCH_CHECK(T < INT_MAX && B < INT_MAX && GH < INT_MAX, "sizes must fit BLAS's 32-bit integers");
  const bool lstm = cell == LSTM, proj = w_hr_in.has_value();
  TORCH_CHECK(!proj || lstm, "w_hr (projection) needs the lstm cell");
  TORCH_CHECK(proj || P == H, "without projection dy's last dimension must be H");
  TORCH_CHECK(dcT_in.has_value() == lstm && c0_in.has_value() == lstm, "dcT and c0 are given exactly for lstm");
  const at::Tensor dy = as(dy_in, dt), dhT = as(dhT_in, dt), w_hh = as(w_hh_in, dt), h0 = as(h0_in, dt);
  const at::Tensor y = as(y_in, dt);
  const auto dcT = as(dcT_in, dt), c0 = as(c0_in, dt), w_hr = as(w_hr_in, dt);
  const auto lengths = as(lengths_in, at::kLong);
  check(dhT, "dhT", dt, {B, P});
  check(w_hh, "w_hh", dt, {GH, P});
  check(h0, "h0", dt, {B, P});
  check(y, "y", dt, {T, B, P});
  const ZoneoutArgs zo = zoneout_in({keep_h, keep_c, keep}, dt, T, B, P, H, lstm);
  check(saved, "saved", dt, {T, B, saved_width(cell, zo.on()) * H});
  if (lstm) {
    check(*dcT, "dcT", dt, {B, H});
    check(*c0, "c0", dt, {B, H});
  }
  if (proj) check(*w_hr, "w_hr", dt, {P, H});
  if (lengths) check(*lengths, "lengths", at::kLong, {B});
  const auto opts = dy.options();
  const at::Tensor dgx = output({T, B, GH}, opts, poison), dh0 = need_dh0 ? output({B, P}, opts, poison) : at::Tensor();
  const at::Tensor dgh = cell == GRU ? output({T, B, GH}, opts, poison) : at::Tensor();
  const at::Tensor dc0 = lstm ? output({B, H}, opts, poison) : at::Tensor();
  const at::Tensor dw_hr = proj ? output({P, H}, opts, poison) : at::Tensor();
  const Order ord = make_order(lengths, T, B, reverse, zero);
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast_bwd", [&] {
    bwd_loop<scalar_t>(static_cast<int>(cell), dy, dhT, lstm ? *dcT : dc0, w_hh, w_hr, h0, lstm ? *c0 : dc0, ord,
                       zo, y, saved, chunk, dgx, dgh, dh0, dc0, dw_hr);
  });
  auto maybe = [](const at::Tensor& t, const c10::optional<at::Tensor>& like) {
    return t.defined() ? c10::make_optional(in_dtype(t, like->scalar_type())) : c10::nullopt;
  };
  const auto io = c10::make_optional(dy_in);
  return {in_dtype(dgx, dy_in.scalar_type()), maybe(dgh, io), dh0.defined() ? in_dtype(dh0, h0_in.scalar_type()) : dh0,
          maybe(dc0, c0_in), maybe(dw_hr, w_hr_in)};
}

}  // namespace

// One layer-direction of an eager call with grad, input projection included, as an autograd node: what
// `seqfast.autograd.Layer` computes, the same ops in the same order (so bitwise its results), without Python in the
// forward or the backward. For calls without `lengths` whose products are all below oneDNN's threshold
// (`seqfast.linear.plain`), where every product of `project` and `project_backward` is one torch GEMM. Outside
// the anonymous namespace, so that torch names its node `CppNode<seqfast::EagerLayer>`.
class EagerLayer : public torch::autograd::Function<EagerLayer> {
 public:
  // An absent tensor (None) is no input of the node, so the node's inputs are the present ones, in order.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, int64_t cell, bool reverse,
                                                const at::Tensor& x, const at::Tensor& w_ih,
                                                const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                const c10::optional<at::Tensor>& c0,
                                                const c10::optional<at::Tensor>& w_hr, int64_t chunk, bool poison) {
    const bool lstm = cell == LSTM;
    const auto [b_fold, b_h] = folded_biases(cell, b_hh);
    auto [y, hT, cT, saved] = fwd(cell, c10::nullopt, x, w_ih, b_ih, b_fold, w_hh, b_h, h0, c0, c10::nullopt, w_hr,
                                  reverse, true, chunk, poison, c10::nullopt, c10::nullopt, c10::nullopt, 0.0);
    ctx->save_for_backward({x, w_ih, w_hh, defined(b_ih), defined(b_hh), h0, defined(c0), defined(w_hr), y, saved});
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["poison"] = poison;
    ctx->set_materialize_grads(false);
    if (lstm) return {y, hT, *cT};
    return {y, hT};
  }

  // Gradients of (cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, chunk, poison).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved_tensors = ctx->get_saved_variables();
    const at::Tensor &x = saved_tensors[0], &w_ih = saved_tensors[1], &w_hh = saved_tensors[2];
    const at::Tensor &b_ih = saved_tensors[3], &b_hh = saved_tensors[4], &h0 = saved_tensors[5];
    const at::Tensor &c0 = saved_tensors[6], &w_hr = saved_tensors[7], &y = saved_tensors[8];
    const at::Tensor& saved = saved_tensors[9];
    const int64_t cell = ctx->saved_data["cell"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool(), lstm = cell == LSTM;
    const bool has_b_ih = b_ih.defined(), has_b_hh = b_hh.defined();
    // the node's inputs: x, w_ih, [b_ih], w_hh, [b_hh], h0, [c0], [w_hr]
    const int64_t i_w_hh = 2 + has_b_ih, i_h0 = i_w_hh + 1 + has_b_hh, i_c0 = i_h0 + 1;
    const int64_t i_w_hr = i_c0 + c0.defined();
    const bool need_x = ctx->needs_input_grad(0), need_w_ih = ctx->needs_input_grad(1);
    const bool need_b_ih = has_b_ih && ctx->needs_input_grad(2);
    const bool need_w_hh = ctx->needs_input_grad(i_w_hh), need_b_hh = has_b_hh && ctx->needs_input_grad(i_w_hh + 1);
    const bool need_h0 = ctx->needs_input_grad(i_h0), need_c0 = c0.defined() && ctx->needs_input_grad(i_c0);
    const bool need_w_hr = w_hr.defined() && ctx->needs_input_grad(i_w_hr);
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients that can be differentiated again
      const std::array<bool, 8> need{need_x, need_w_ih, need_b_ih, need_w_hh, need_b_hh, need_h0, need_c0, need_w_hr};
      const auto wanted = layer_grads().call(cell, reverse, x, w_ih, maybe(b_ih), w_hh, maybe(b_hh), h0, maybe(c0),
                                             maybe(w_hr), maybe(grads[0]), maybe(grads[1]),
                                             lstm ? maybe(grads[2]) : c10::nullopt, need);
      torch::autograd::variable_list out(12);
      for (size_t k = 0, next = 0; k < need.size(); ++k)
        if (need[k]) out[2 + k] = wanted.at(next++);
      return out;
    }
    const BelowAutograd below;
    const at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const at::Tensor dhT = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const at::Tensor dcT = !lstm ? at::Tensor() : grads[2].defined() ? grads[2] : at::zeros_like(c0);
    auto [dgx, dgh, dh0, dc0, dw_hr] =
        bwd(cell, dy, dhT, maybe(dcT), w_hh, maybe(w_hr), h0, maybe(c0), c10::nullopt, y, saved, reverse,
            ctx->saved_data["chunk"].toInt(), ctx->saved_data["poison"].toBool(), need_h0, c10::nullopt,
            c10::nullopt, c10::nullopt, 0.0);
    // `h_prev` as `seqfast.autograd.h_prev` forms it (no lengths)
    const int64_t T = y.size(0);
    const at::Tensor h0_step = h0.to(y.scalar_type()).unsqueeze(0);
    const at::Tensor h_prev = T == 1   ? h0_step
                              : reverse ? at::cat({y.slice(0, 1), h0_step})
                                        : at::cat({h0_step, y.slice(0, 0, T - 1)});
    const at::Tensor dgh2 = (cell == GRU ? *dgh : dgx).flatten(0, -2);
    const bool separate_b_hh = cell == GRU && has_b_hh;  // b_hh stays in the recurrence (see folded_biases)
    const at::Tensor dw_hh = at::mm(dgh2.t(), h_prev.flatten(0, -2)).to(w_hh.scalar_type());
    const at::Tensor db_h = separate_b_hh ? dgh2.sum(0).to(w_hh.scalar_type()) : at::Tensor();
    const bool need_db_x = need_b_ih || (need_b_hh && !separate_b_hh);
    const at::Tensor dgx2 = dgx.flatten(0, -2), x2 = x.flatten(0, -2);
    const at::Tensor dx = need_x ? at::linear(dgx2, w_ih.t()).reshape(x.sizes()) : at::Tensor();
    const at::Tensor dw_ih = need_w_ih ? at::mm(dgx2.t(), x2).to(w_ih.scalar_type()) : at::Tensor();
    const at::Tensor db_x = need_db_x ? dgx2.sum(0).to(w_ih.scalar_type()) : at::Tensor();
    const at::Tensor db_hh = separate_b_hh ? db_h : db_x;
    return {at::Tensor(), at::Tensor(), dx, dw_ih, need_b_ih ? db_x : at::Tensor(), dw_hh,
            need_b_hh ? db_hh : at::Tensor(), dh0, lstm ? *dc0 : at::Tensor(),
            w_hr.defined() ? *dw_hr : at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  // `seqfast::layer_grads`, which seqfast.autograd registers (`differentiable_grads` on the reference's torch ops).
  using LayerGrads = std::vector<at::Tensor>(
      int64_t, bool, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const c10::optional<at::Tensor>&, const at::Tensor&, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, c10::ArrayRef<bool>);
  static const c10::TypedOperatorHandle<LayerGrads>& layer_grads() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("seqfast::layer_grads", "").typed<LayerGrads>();
    return op;
  }
  static c10::optional<at::Tensor> maybe(const at::Tensor& t) {
    return t.defined() ? c10::make_optional(t) : c10::nullopt;
  }
  static at::Tensor defined(const c10::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
};

// `EagerLayer` from Python: `(y, hT, cT or None)`.
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> layer(
    int64_t cell, bool reverse, const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& w_hr, int64_t chunk, bool poison) {
  const auto out = EagerLayer::apply(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, chunk, poison);
  return {out[0], out[1], out.size() > 2 ? c10::make_optional(out[2]) : c10::nullopt};
}

namespace {

std::string isa() { return kIsaNames[g_isa.load()]; }

std::string set_isa(const std::string& name) {
  const int best = best_isa();
  for (int i = GENERIC; i <= AVX512; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= best, "this CPU does not support ", name, "; the best is ", kIsaNames[best]);
      return kIsaNames[g_isa.exchange(i)];
    }
  }
  TORCH_CHECK(false, "unknown instruction set ", name, "; choose generic, avx2 or avx512");
}

}  // namespace
}  // namespace seqfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqfast C++ CPU recurrences (see seqfast.kernels.cpp for the contract)";
  namespace py = pybind11;
  m.def("fwd", &seqfast::fwd, "Recurrence forward from gx, or from x, w_ih, b_ih, b_fold: (y, hT, cT or None, saved).",
        py::call_guard<py::gil_scoped_release>());
  m.def("bwd", &seqfast::bwd, "Recurrence backward: (dgx, dgh or None, dh0, dc0 or None, dw_hr or None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("stack", &seqfast::stack, "A stack's forward without grad: (y, hn, cn or None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("step", &seqfast::step, "A cell's step without grad: (h, c or None).", py::call_guard<py::gil_scoped_release>());
  m.def("layer", &seqfast::layer, "One layer-direction with grad as an autograd node: (y, hT, cT or None).");
  m.def("cells", [] {
    std::vector<std::tuple<int, int, int>> table;
    for (int cell = seqfast::RNN_TANH; cell <= seqfast::GRU; ++cell)
      table.emplace_back(seqfast::gates(cell), seqfast::saved_width(cell, false), seqfast::saved_width(cell, true));
    return table;
  }, "(gates, width of `saved` per hidden unit, the same with zoneout) of each cell id.");
  m.def("isa", &seqfast::isa, "The instruction set of the cell math and float32 GEMM in use.");
  m.def("set_isa", &seqfast::set_isa, "Use `generic`, `avx2` or `avx512` kernels; returns the previous.");
  m.def("has_blas", [] {
#if SEQFAST_BLAS
    return seqfast::have_blas<float>() && seqfast::have_blas<double>();
#else
    return false;
#endif
  }, "Whether the GEMMs call torch's BLAS directly (else they go through at::mm).");
}
