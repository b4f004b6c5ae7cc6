// The recurrent product `h @ w_hh^T` (forward) and `da @ w_hh` (backward) of a time step, chunk by chunk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

#include "blas.h"
#include "buffers.h"
#include "order.h"

namespace seqfast {

// Packing pays once a call runs at least this many steps and this many rows in all, more than one a step (one row
// at small T reads the weights faster through BLAS than it could pack them, and one row a step gains nothing from
// panels it does not reuse).
constexpr int64_t kPackMinSteps = 4, kPackMinRows = 16;
// Elements of packed panels per thread below which packing stays on the calling thread.
constexpr int64_t kPackPerThread = int64_t(1) << 16;

// The recurrent product of one call, chunk by chunk, straight from `w [G*H, P]`: forward, gate by gate,
// `C[n, g*n_j : (g+1)*n_j] = h[n, P] w[g*H + j0 : g*H + j0 + n_j]^T`; backward `C[n, n_j] = da[n, G*H]
// w[:, j0 : j0 + n_j]`. float32 runs this CPU's GEMM on weight panels packed once per call when the call repays the
// packing (`kPackMinSteps`, `kPackMinRows`) and `pack` asks for it (see `Plan`). Unpacked (and float64), a step of
// one row runs this CPU's matrix-vector kernel and any other BLAS; the forward of a call with enough rows and steps to
// pack for then works on a copy of `w` with each chunk's gate rows side by side, one product per chunk instead of one
// per gate.
template <typename T>
class HiddenProduct {
 public:
  HiddenProduct(const at::Tensor& w, int64_t G, int64_t H, int64_t hc, bool backward, const Order& ord,
                const IsaKernels& kern, bool pack)
      : w_(w.data_ptr<T>()), G_(G), H_(H), P_(w.size(1)), hc_(hc), backward_(backward), kern_(kern) {
    const int64_t rows = std::accumulate(ord.active.begin(), ord.active.end(), int64_t(0));
    const int64_t nch = (H + hc - 1) / hc;
    // one row a step: the matrix-vector kernel reads `w` as it is, at the memory's pace, with nothing to pack
    if (rows < kPackMinRows || ord.active.empty() || ord.active[0] <= 1) return;
    if constexpr (std::is_same_v<T, float>) {
      if (pack && ord.T >= kPackMinSteps) {
        const int64_t nb = blocks(), K = depth();
        offsets_.resize(nch * nb + 1, 0);
        for (int64_t i = 0; i < nch * nb; ++i) offsets_[i + 1] = offsets_[i] + K * round_up(width(i / nb));
        packed_ = buffer_.emplace(offsets_.back()).data();
        // the panels of every block over the threads, `kPackPerThread` elements a thread at least
        const int64_t panel = K * kern_.nr;
        auto pack_range = [&](int64_t begin, int64_t end) {
          for (int64_t q = begin; q < end;) {
            const int64_t i = std::upper_bound(offsets_.begin(), offsets_.end(), q * panel) - offsets_.begin() - 1;
            const int64_t q1 = std::min(end, offsets_[i + 1] / panel);
            pack_panels(i / nb, i % nb, q - offsets_[i] / panel, q1 - q, packed_ + q * panel);
            q = q1;
          }
        };
        at::parallel_for(0, offsets_.back() / panel, std::max<int64_t>(1, kPackPerThread / panel), pack_range);
        return;
      }
    }
    // the copy costs two passes over `w`: a call of fewer steps reads it faster gate by gate
    if (backward_ || nch == 1 || G_ == 1 || ord.T < kPackMinSteps) return;
    grouped_ = buffer_.emplace(G_ * H_ * P_).data();
    for (int64_t c = 0; c < nch; ++c)
      for (int64_t g = 0; g < G_; ++g)
        std::copy_n(w_ + (g * H_ + c * hc_) * P_, width(c) * P_, grouped_ + (c * G_ * hc_ + g * width(c)) * P_);
  }

  // Chunk `c`'s product for `n` rows of `A`, into `C` (rows `ldc` apart). Forward: gate `g`'s columns start at
  // `g * gate_ld`, by default the chunk's width (its gates side by side); `gate_ld = H` writes the chunk into rows
  // that hold every unit.
  void operator()(int64_t c, int64_t n, const T* A, int64_t lda, T* C, int64_t ldc, bool accumulate,
                  int64_t gate_ld = 0) const {
    const int64_t j0 = c * hc_, n_j = width(c);
    if (backward_) return product(c, n, n_j, A, lda, w_ + j0, false, C, ldc, accumulate);
    gate_ld = gate_ld ? gate_ld : n_j;
    // one chunk holding every unit: its gates side by side are w's rows in order, one product
    if (n_j == H_ && !packed_) return step_gemm<T>(kern_, true, n, G_ * H_, P_, A, lda, w_, P_, T(accumulate), C, ldc);
    if (grouped_ && gate_ld == n_j) {
      const T* rows = grouped_ + c * G_ * hc_ * P_;
      return step_gemm<T>(kern_, true, n, G_ * n_j, P_, A, lda, rows, P_, T(accumulate), C, ldc);
    }
    for (int64_t g = 0; g < G_; ++g)
      product(c * G_ + g, n, n_j, A, lda, w_ + (g * H_ + j0) * P_, true, C + g * gate_ld, ldc, accumulate);
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
  // Panels `[p, p + np)` of chunk `c`'s block `g` (its gate, forward) into `dst`.
  void pack_panels(int64_t c, int64_t g, int64_t p, int64_t np, T* dst) const {
    if constexpr (std::is_same_v<T, float>) {
      const int64_t j = p * kern_.nr, n = std::min(width(c), (p + np) * kern_.nr) - j;
      if (backward_) return kern_.pack(depth(), n, w_ + c * hc_ + j, P_, 1, dst);
      kern_.pack(depth(), n, w_ + (g * H_ + c * hc_ + j) * P_, 1, P_, dst);
    }
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

}  // namespace seqfast
