// The per-instruction-set kernels of a fused step: the float32 and float64 cell math over rows `[0, n)` of the batch
// (sorted by length, longest first) and hidden units `[j0, j0 + hc)`, and a float32 GEMM on packed weight panels.
// Plain C++ without torch headers, so it is compiled once per instruction set (see isa_kernels_impl.h).
#pragma once

#include <cstdint>

namespace seqfast {

enum Cell : int { RNN_TANH = 0, RNN_RELU = 1, LSTM = 2, GRU = 3 };

inline int gates(int cell) { return cell == LSTM ? 4 : cell == GRU ? 3 : 1; }

// Width of `saved` per hidden unit: LSTM `i, f, g, o, c`; GRU `r, z, n, W_hn h + b_hn`; RNN none (`h` is `y`). With
// zoneout `c` is the cell's new value before zoneout, and LSTM adds the carried `c`, RNN the cell's new `h`.
inline int saved_width(int cell, bool zoneout) {
  return (cell == LSTM ? 5 : cell == GRU ? 4 : 0) + (zoneout && cell != GRU);
}

// Scalars of `saved` per row after the layer_norm option's `[G*H]` normalised product: its 1 / std, and LSTM's mean
// and 1 / std of the new cell state.
inline int ln_scalars(int cell) { return cell == LSTM ? 3 : 1; }

// Columns of `saved` per row and step: `saved_width` per hidden unit, then with `layer_norm` the normalised product
// `[G*H]` and `ln_scalars`.
inline int64_t saved_cols(int cell, int64_t H, bool zoneout, bool layer_norm) {
  return saved_width(cell, zoneout) * H + (layer_norm ? gates(cell) * H + ln_scalars(cell) : 0);
}

// The epsilon of the layer_norm option's LayerNorms (`common.LN_EPS`).
constexpr double kLnEps = 1e-5;

// Zoneout of one step: the weight `m` of the state the step started from in `h = m h_prev + (1 - m) h~` (and `c`),
// per row (`[n] -> [H]`, time-major rows as `gx_rows`) or, where the rows are null, the constant; `on` false: none.
template <typename T>
struct Zoneout {
  bool on = false;
  const T* const* rows = nullptr;
  T keep = 0;
};

// The layer_norm option's gains: `hh [G*H]` of the recurrent product, LSTM's `c_weight`, `c_bias [H]` of its cell
// state; `hh` null: off. A call with it runs chunks of every hidden unit (`hc == H`), so a row's product is whole.
template <typename T>
struct LayerNorm {
  const T* hh = nullptr;
  const T* c_weight = nullptr;
  const T* c_bias = nullptr;
};

// Where the backward adds the layer_norm option's parameter gradients over its rows: `b [G*H]` (of b_hh), `hh
// [G*H]`, LSTM's `c_weight`, `c_bias [H]`.
template <typename T>
struct LayerNormGrads {
  T* b = nullptr;
  T* hh = nullptr;
  T* c_weight = nullptr;
  T* c_bias = nullptr;
};

template <typename T>
struct FwdChunk {
  int64_t n, H, j0, hc;
  T* ws;                    // [n, G*hc] h_prev @ w_hh^T of this chunk, gates side by side; layer_norm normalises it
                            // in place, then keeps LSTM's c~ and o in it
  const T* const* gx_rows;  // [n] -> [G*H] x-side pre-activations at each row's time step
  const T* bias;            // [G*H] b_hh (zeros when absent)
  const T* h_prev;          // [B, H] state before the step (GRU)
  T* h_next;                // [B, ldh] new state (LSTM with projection: o * tanh(c) before projecting)
  int64_t ldh;
  T* c;                     // [B, H] LSTM cell state, updated in place
  T* const* y_rows;         // [n] -> [H] output rows, or nullptr (projection writes y later)
  const T* y;               // the output all `y_rows` point into, and
  T* y_copy;                // a second output the rows are written to alike, at the same offsets; or nullptr
  T* saved;                 // [B, W*H] rows of this step, or nullptr
  const uint8_t* zero_next; // [n] rows whose next step starts from zeros (resets): their carried h_next (unless
                            // projected: the caller's) and c are written as 0; or nullptr
  Zoneout<T> zh, zc;        // zoneout of h (a projected h's is the caller's) and LSTM's c
  LayerNorm<T> ln;
};

template <typename T>
struct BwdChunk {
  int64_t n, H, j0, hc;
  T* dh;                    // [B, H] gradient reaching h (GRU: overwritten with dh * z)
  const T* const* dy_rows;  // [n] -> [H] added to dh, or nullptr
  T* dc;                    // [B, H] LSTM, updated in place
  const T* saved;           // [B, W*H] rows of this step
  const T* c_prev;          // [B, ldc] LSTM cell state before the step
  int64_t ldc;
  const T* const* h_rows;   // [n] -> [H] RNN: h after the step; GRU: h before it
  T* const* dgx_rows;       // [n] -> [G*H]
  T* const* dgh_rows;       // [n] -> [G*H], GRU or layer_norm only (the other cells' dgh is dgx)
  T* da;                    // [B, G*H] dgh of the rows, the operand of the dh_prev GEMM
  T* hraw;                  // [B, H] o * tanh(c) for dw_hr, or nullptr
  const uint8_t* zero;      // [n] rows whose step started from zeros (resets): c_prev and GRU's h_prev read as 0,
                            // dc written as 0 (the caller zeroes their dh_prev); or nullptr
  Zoneout<T> zh, zc;        // as the forward's; with zh on, dh is left holding m dh (the caller's GEMM adds to it)
  LayerNorm<T> ln;          // as the forward's; with it `da` and `dgh_rows` get the gradient before the LayerNorm
  LayerNormGrads<T> ln_grads;
};

struct IsaKernels {
  void (*fwd_f32)(int cell, const FwdChunk<float>& a);
  void (*bwd_f32)(int cell, const BwdChunk<float>& a);
  void (*fwd_f64)(int cell, const FwdChunk<double>& a);
  void (*bwd_f64)(int cell, const BwdChunk<double>& a);
  // Panel width of the packed GEMM operand.
  int64_t nr;
  // `dst [ceil(n / nr), k, nr]` from `B[kk, j] = src[kk * ldk + j * ldn]` (`[k, n]`), zero-padded columns.
  void (*pack)(int64_t k, int64_t n, const float* src, int64_t ldk, int64_t ldn, float* dst);
  // `C[m, n] = A[m, k] B[k, n] (+ C when accumulate)`, `B` packed by `pack`.
  void (*gemm)(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* Bp, bool accumulate,
               float* C, int64_t ldc);
  // A product of one row: `y[j] = W[j, :k] x` for `j < n`, or `trans`: `y[j] = x[:k] W[:k, j]`; W's rows `ldw`
  // apart; `+ y[j]` when accumulate.
  void (*gemv_f32)(bool trans, int64_t n, int64_t k, const float* W, int64_t ldw, const float* x, bool accumulate,
                   float* y);
  void (*gemv_f64)(bool trans, int64_t n, int64_t k, const double* W, int64_t ldw, const double* x, bool accumulate,
                   double* y);
  // The layer_norm option's input LayerNorm over rows `[0, n)` of `z [n, N]`: `y [n, N] = LN(z) gamma + beta` (`beta`
  // null: none); its backward from the gradient `dy [n, N]` after it: `dz [n, N]` (null: not wanted), and `dgamma`,
  // `dbeta [N]` added to (null: not wanted).
  void (*ln_fwd_f32)(int64_t n, int64_t N, const float* z, const float* gamma, const float* beta, float* y);
  void (*ln_fwd_f64)(int64_t n, int64_t N, const double* z, const double* gamma, const double* beta, double* y);
  void (*ln_bwd_f32)(int64_t n, int64_t N, const float* dy, const float* z, const float* gamma, float* dz,
                     float* dgamma, float* dbeta);
  void (*ln_bwd_f64)(int64_t n, int64_t N, const double* dy, const double* z, const double* gamma, double* dz,
                     double* dgamma, double* dbeta);
};

IsaKernels kernels_generic();
IsaKernels kernels_avx2();
IsaKernels kernels_avx512();

}  // namespace seqfast
