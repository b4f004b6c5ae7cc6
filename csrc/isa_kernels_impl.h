// Kernels templated on a vector type. Each isa_*.cpp includes this once with its own instruction-set pragma,
// `SEQFAST_ISA` namespace, vector width and GEMM register tile (`SEQFAST_MR` rows x `SEQFAST_NV` vectors). The cell
// math uses GCC vector extensions of that width and Cephes' exp/tanh, about 2 ulp in float32 and float64 alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "isa_kernels.h"

#define SEQFAST_INLINE __attribute__((always_inline))
// Masked vector moves for partial vectors: AVX-512's and AVX2's (SSE has none); with them, AVX's shuffles for `pack`
#if defined(__x86_64__) && defined(__GNUC__) && SEQFAST_VBYTES > 16
#define SEQFAST_MASKED_MOVES 1
#include <immintrin.h>
#else
#define SEQFAST_MASKED_MOVES 0
#endif
// AVX-512's vscalefps/pd (`v 2^k` in one instruction) in exp, rounding as MXCSR says (_MM_FROUND_CUR_DIRECTION)
#if defined(__x86_64__) && defined(__GNUC__) && SEQFAST_VBYTES == 64
#define SEQFAST_SCALEF 1
#define SEQFAST_ROUND_MXCSR 4
#else
#define SEQFAST_SCALEF 0
#endif

namespace seqfast {
namespace SEQFAST_ISA {

// Local to the namespace so no inline function is shared (and merged by the linker) across instruction sets.
constexpr int n_gates(int cell) { return cell == LSTM ? 4 : cell == GRU ? 3 : 1; }
constexpr int lanes(int64_t w, int64_t left) { return static_cast<int>(left < w ? left : w); }

// An integer vector whose first `m` of its `W` lanes are all ones (-1) and the others zero: AVX2's masked moves' mask.
template <class I, int W>
SEQFAST_INLINE inline I lanes_below(int m) {
  I index;
  for (int i = 0; i < W; ++i) index[i] = i;
  return index < m;
}

// The first `m` of the `W` lanes of a vector `V` of `T` from `p`, the others zero (`load_lanes`), or from `v` to `p`
// (`store_lanes`); `I`: the integer vector of `V`'s lane width. The full-width branch has a constant size, so it
// compiles to one vector move, and a partial one is a masked move where the instruction set has one (a memcpy call
// otherwise, around which every live vector is spilled: on AVX-512, 1 thread, `LSTM(200)` B20's loops, whose rows end
// in an 8-lane partial vector, took 12-29% more time per multiply-add than `LSTM(208)`'s; 1-13% with masked moves).
template <class V, class I, class T, int W>
SEQFAST_INLINE inline V load_lanes(const T* p, int m) {
  V v = {};
  if (m == W) {
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
#if SEQFAST_MASKED_MOVES && SEQFAST_VBYTES == 64
  if constexpr (sizeof(T) == 4) {
    return (V)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1), p);
  } else {
    return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << m) - 1), p);
  }
#elif SEQFAST_MASKED_MOVES
  if constexpr (sizeof(T) == 4) {
    return (V)_mm256_maskload_ps(p, (__m256i)lanes_below<I, W>(m));
  } else {
    return (V)_mm256_maskload_pd(p, (__m256i)lanes_below<I, W>(m));
  }
#else
  std::memcpy(&v, p, sizeof(T) * m);
  return v;
#endif
}

template <class V, class I, class T, int W>
SEQFAST_INLINE inline void store_lanes(T* p, V v, int m) {
  if (m == W) {
    std::memcpy(p, &v, sizeof(V));
    return;
  }
#if SEQFAST_MASKED_MOVES && SEQFAST_VBYTES == 64
  if constexpr (sizeof(T) == 4) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << m) - 1), (__m512)v);
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << m) - 1), (__m512d)v);
  }
#elif SEQFAST_MASKED_MOVES
  if constexpr (sizeof(T) == 4) {
    _mm256_maskstore_ps(p, (__m256i)lanes_below<I, W>(m), (__m256)v);
  } else {
    _mm256_maskstore_pd(p, (__m256i)lanes_below<I, W>(m), (__m256d)v);
  }
#else
  std::memcpy(p, &v, sizeof(T) * m);
#endif
}

struct OpsF32 {
  using T = float;
  static constexpr int W = SEQFAST_VBYTES / 4;
  typedef float V __attribute__((vector_size(SEQFAST_VBYTES)));
  typedef int32_t I __attribute__((vector_size(SEQFAST_VBYTES)));

  // `x - 0` is `x` for every x (`0 + x` is not, for x = -0), so this compiles to one broadcast, from memory where `x`
  // is loaded (an add first would take an FMA port).
  static V splat(float x) { return x - V{}; }
  SEQFAST_INLINE static V load(const float* p, int m) { return load_lanes<V, I, float, W>(p, m); }
  SEQFAST_INLINE static void store(float* p, V v, int m) { store_lanes<V, I, float, W>(p, v, m); }

  // Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, times 2^n; +inf above ln(FLT_MAX) as
  // IEEE exp, so that a sigmoid of -inf is exactly 0 and its derivative too. AVX-512's vscalefps forms p 2^n, +inf
  // past the range included (x is clamped only to keep n ln2's two parts exact); else 2^n from the exponent bits.
  static V exp(V x) {
#if SEQFAST_SCALEF
    x = x > 89.0f ? splat(89.0f) : x;
#else
    const V in = x;
    x = x > 88.3762626647949f ? splat(88.3762626647949f) : x;
#endif
    x = x < -87.3365447505531f ? splat(-87.3365447505531f) : x;
    V fx = x * 1.44269504088896341f + 12582912.0f;
    fx = fx - 12582912.0f;
    V r = x - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    V p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
#if SEQFAST_SCALEF
    return __builtin_ia32_scalefps512_mask(p, fx, V{}, -1, SEQFAST_ROUND_MXCSR);
#else
    I e = (__builtin_convertvector(fx, I) + 127) << 23;
    V scale;
    std::memcpy(&scale, &e, sizeof(V));
    return in > 88.72283935546875f ? splat(__builtin_inff()) : p * scale;
#endif
  }
  // 1 / d for a positive normal d or +inf: the CPU's reciprocal estimate (14 bits with AVX-512, 12 with AVX) refined
  // by Newton steps to within an ulp of the quotient (a division costs 5-10 times as much), 0 at +inf; a plain division
  // where there is no estimate.
  SEQFAST_INLINE static V recip(V d) {
#if defined(__x86_64__) && defined(__GNUC__) && SEQFAST_VBYTES > 16
#if SEQFAST_VBYTES == 64
    V r = __builtin_ia32_rcp14ps512_mask(d, V{}, -1);
#else
    V r = __builtin_ia32_rcpps256(d);
    r = r + r * (1.0f - d * r);
#endif
    r = r + r * (1.0f - d * r);
    return d == __builtin_inff() ? V{} : r;
#else
    return 1.0f / d;
#endif
  }
  static V sigmoid(V x) { return recip(1.0f + exp(-x)); }
  // Eigen's rational minimax fit of tanh on [-7.9, 7.9], a few ulp (the numba backend's): 1 / q by `recip`; +-1 from
  // |x| = 9 on, where float32's tanh rounds to it and the clamped fit stops 4 ulp short; NaN stays NaN.
  static V tanh(V x) {
    V c = x > 7.90531110763549805f ? splat(7.90531110763549805f) : x;
    c = c < -7.90531110763549805f ? splat(-7.90531110763549805f) : c;
    const V z = c * c;
    V p = splat(-2.76076847742355e-16f);
    p = p * z + 2.00018790482477e-13f;
    p = p * z - 8.60467152213735e-11f;
    p = p * z + 5.12229709037114e-08f;
    p = p * z + 1.48572235717979e-05f;
    p = p * z + 6.37261928875436e-04f;
    p = p * z + 4.89352455891786e-03f;
    V q = splat(1.19825839466702e-06f);
    q = q * z + 1.18534705686654e-04f;
    q = q * z + 2.26843463243900e-03f;
    q = q * z + 4.89352518554385e-03f;
    const V one = (V)(((I)x & INT32_MIN) | (I)splat(1.0f));
    return (x < 0.0f ? -x : x) >= 9.0f ? one : c * p * recip(q);
  }
  // Cephes tanhf, about 2 ulp, where layer_norm's division by a row's spread would magnify `tanh`'s few: an odd
  // polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1) with the sign restored.
  static V tanh_precise(V x) {
    V ax = x < 0.0f ? -x : x;
    V z = x * x;
    V p = splat(-5.70498872745e-3f);
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    V small = p * z * x + x;
    V big = 1.0f - 2.0f * recip(exp(ax + ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
  }
  static V relu(V x) { return x < 0.0f ? splat(0.0f) : x; }
  // relu' as torch's threshold_backward: 0 where h <= 0, else dh (a NaN h passes dh)
  static V relu_grad(V h, V dh) { return h <= 0.0f ? splat(0.0f) : dh; }
};

struct OpsF64 {
  using T = double;
  static constexpr int W = SEQFAST_VBYTES / 8;
  typedef double V __attribute__((vector_size(SEQFAST_VBYTES)));
  typedef int64_t I __attribute__((vector_size(SEQFAST_VBYTES)));

  static V splat(double x) { return x - V{}; }
  SEQFAST_INLINE static V load(const double* p, int m) { return load_lanes<V, I, double, W>(p, m); }
  SEQFAST_INLINE static void store(double* p, V v, int m) { store_lanes<V, I, double, W>(p, v, m); }

  // x + 1.5 * 2^52: x rounded to an integer (ties to even, |x| < 2^51), which then fills the low mantissa bits.
  static V round_shifted(V x) { return x + 6755399441055744.0; }
  // `v 2^k` for integral k, exactly where it is a normal double (+inf above): AVX-512's vscalefpd, else 2^k as two
  // factors, each the exponent field of `k / 2 + 1.5 * 2^52` shifted into place (k in [-2044, 2046]).
  static V scale(V v, V k) {
#if SEQFAST_SCALEF
    return __builtin_ia32_scalefpd512_mask(v, k, V{}, -1, SEQFAST_ROUND_MXCSR);
#else
    const V k1 = round_shifted(k * 0.5) - 6755399441055744.0;
    return v * pow2(k1) * pow2(k - k1);
#endif
  }
  // 2^k for integral k in [-1022, 1023]: the exponent field of `k + 1.5 * 2^52` shifted into place.
  static V pow2(V k) { return (V)(((I)round_shifted(k) + 1023) << 52); }
  // Cephes: x = n ln2 + r (ln2 in two parts), p = r P(r^2), q = Q(r^2), exp(r) = (q + p) / (q - p) = 1 + 2p / (q - p).
  static void exp_core(V x, V& n, V& p, V& q) {
    n = round_shifted(x * 1.4426950408889634073599) - 6755399441055744.0;
    V r = x - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    const V z = r * r;
    p = splat(1.26177193074810590878e-4);
    p = p * z + 3.02994407707441961300e-2;
    p = (p * z + 9.99999999999999999910e-1) * r;
    q = splat(3.00198505138664455042e-6);
    q = q * z + 2.52448340349684104192e-3;
    q = q * z + 2.27265548208155028766e-1;
    q = q * z + 2.00000000000000000009e0;
  }
  // 1 / (1 + exp(-x)) in one division: with exp(-x) = 2^n (q + p) / (q - p) it is (q - p) / (q - p + 2^n (q + p)).
  // -x is kept within [-40, 746], beyond which the result rounds to 1 or 0 alike (n <= 1076).
  static V sigmoid(V x) {
    V t = -x;
    t = t > 746.0 ? splat(746.0) : t;
    t = t < -40.0 ? splat(-40.0) : t;
    V n, p, q;
    exp_core(t, n, p, q);
    const V qm = q - p;
    return qm / (qm + scale(q + p, n));
  }
  // Cephes tanh of |x|, sign bit restored: x + x^3 P(x^2) / Q(x^2) below 0.625, else 1 - 2 / (exp(2|x|) + 1).
  static V tanh(V x) {
    const I sign = (I)x & INT64_MIN;
    const V ax = (V)((I)x ^ sign);
    const V z = ax * ax;
    V tp = splat(-9.64399179425052238628e-1);
    tp = tp * z - 9.92877231001918586564e1;
    tp = tp * z - 1.61468768441708447952e3;
    V tq = z + 1.12811678491632931402e2;
    tq = tq * z + 2.23548839060100448583e3;
    tq = tq * z + 4.84406305325125486048e3;
    V n, p, q;
    exp_core(ax > 20.0 ? splat(40.0) : ax + ax, n, p, q);  // tanh rounds to 1 beyond 20
    // One division for both: exp(2|x|) + 1 = (2^n (q + p) + (q - p)) / (q - p).
    const V qm = q - p;
    const auto small = ax < 0.625;
    const V ratio = (small ? tp : qm + qm) / (small ? tq : scale(q + p, n) + qm);
    return (V)((I)(small ? ax + ax * (z * ratio) : 1.0 - ratio) | sign);
  }
  static V tanh_precise(V x) { return tanh(x); }
  static V relu(V x) { return x < 0.0 ? splat(0.0) : x; }
  static V relu_grad(V h, V dh) { return h <= 0.0 ? splat(0.0) : dh; }
};

// `units(jj, m)` over `[0, n)` a vector at a time: full vectors with `m` a compile-time `O::W` (plain vector moves,
// no partial-copy branch in the loop), then the partial tail.
template <class O, class F>
SEQFAST_INLINE inline void each_vector(int64_t n, F&& units) {
  int64_t jj = 0;
  for (; jj + O::W <= n; jj += O::W) units(jj, std::integral_constant<int, O::W>{});
  if (jj < n) units(jj, static_cast<int>(n - jj));
}

// Zoneout's weight of the previous state at row `r`, units `[j, j + m)`.
template <class O>
inline typename O::V keep_at(const Zoneout<typename O::T>& z, int64_t r, int64_t j, int m) {
  return z.rows ? O::load(z.rows[r] + j, m) : O::splat(z.keep);
}

// The sum of the `N` lanes of `v` (`I`: 0 .. N/2 - 1), halves added as vectors; shuffles, not a copy through
// memory, so that the accumulators the caller passes stay in registers.
template <typename T, int N, typename Vec, std::size_t... I>
inline T halves_sum(Vec v, std::index_sequence<I...>) {
  typedef T Half __attribute__((vector_size(sizeof(T) * N / 2)));
  const Half lo = __builtin_shufflevector(v, v, I...);
  const Half hi = __builtin_shufflevector(v, v, (I + N / 2)...);
  if constexpr (N == 2) {
    return lo[0] + hi[0];
  } else {
    return halves_sum<T, N / 2>(lo + hi, std::make_index_sequence<N / 4>());
  }
}

template <class O>
inline typename O::T vector_sum(typename O::V v) {
  return halves_sum<typename O::T, O::W>(v, std::make_index_sequence<O::W / 2>());
}

// LayerNorm's statistics of `v [N]`: the mean and 1 / sqrt(var + eps), the biased variance from the deviations.
template <class O>
inline void ln_stats(int64_t N, const typename O::T* v, typename O::T& mean, typename O::T& rstd) {
  using T = typename O::T;
  using V = typename O::V;
  const int64_t full = N / O::W * O::W;
  V acc = {};
  for (int64_t j = 0; j < full; j += O::W) acc += O::load(v + j, O::W);
  T sum = vector_sum<O>(acc);
  for (int64_t j = full; j < N; ++j) sum += v[j];
  mean = sum / T(N);
  V dev = {};
  for (int64_t j = 0; j < full; j += O::W) {
    const V d = O::load(v + j, O::W) - mean;
    dev += d * d;
  }
  T var = vector_sum<O>(dev);
  for (int64_t j = full; j < N; ++j) var += (v[j] - mean) * (v[j] - mean);
  rstd = T(1) / std::sqrt(var / T(N) + T(kLnEps));
}

// `acc[j] += v` at units `[j, j + m)`: a parameter gradient's sum over rows.
template <class O>
SEQFAST_INLINE inline void add_to(typename O::T* acc, typename O::V v, int m) {
  O::store(acc, O::load(acc, m) + v, m);
}

// LayerNorm of the row `z [N]`: `y = x^ gamma (+ beta)` with `x^ = (z - mean) rstd`, `x^` also into `xh` (each of
// `beta`, `xh` null: none; `y` may be `z`); returns `rstd`.
template <class O>
inline typename O::T ln_row(int64_t N, const typename O::T* z, const typename O::T* gamma, const typename O::T* beta,
                            typename O::T* y, typename O::T* xh) {
  using T = typename O::T;
  T mean, rstd;
  ln_stats<O>(N, z, mean, rstd);
  each_vector<O>(N, [&](int64_t j, auto m) SEQFAST_INLINE {
    const auto x = (O::load(z + j, m) - mean) * rstd;
    if (xh) O::store(xh + j, x, m);
    const auto v = x * O::load(gamma + j, m);
    O::store(y + j, beta ? v + O::load(beta + j, m) : v, m);
  });
  return rstd;
}

// `ln_row`'s backward from `d [N]`, the gradient of its `y`, with its `x^` at units `[j, j + m)` from `xhat(j, m)`:
// adds `d x^` into `dgamma` and `d` into `dbeta` (each null: not wanted); writes the gradient of `z`, `rstd (u -
// mean(u) - x^ mean(u x^))` with `u = d gamma`, into `dz` and `dz_copy` (each null: not wanted; either may be `d`).
template <class O, class XHat>
SEQFAST_INLINE inline void ln_row_backward(int64_t N, const typename O::T* d, XHat&& xhat, const typename O::T* gamma,
                                           typename O::T rstd, typename O::T* dgamma, typename O::T* dbeta,
                                           typename O::T* dz, typename O::T* dz_copy) {
  using T = typename O::T;
  using V = typename O::V;
  V s_u = {}, s_ux = {};
  each_vector<O>(N, [&](int64_t j, auto m) SEQFAST_INLINE {
    const V dj = O::load(d + j, m), x = xhat(j, m), u = dj * O::load(gamma + j, m);
    s_u += u;
    s_ux += u * x;
    if (dgamma) add_to<O>(dgamma + j, dj * x, m);
    if (dbeta) add_to<O>(dbeta + j, dj, m);
  });
  if (!dz && !dz_copy) return;
  const T m_u = vector_sum<O>(s_u) / T(N), m_ux = vector_sum<O>(s_ux) / T(N);
  each_vector<O>(N, [&](int64_t j, auto m) SEQFAST_INLINE {
    const V g = rstd * (O::load(d + j, m) * O::load(gamma + j, m) - m_u - xhat(j, m) * m_ux);
    if (dz) O::store(dz + j, g, m);
    if (dz_copy) O::store(dz_copy + j, g, m);
  });
}

// tanh in the cell math of a call with (LN) or without layer_norm: the precise one where LN's division magnifies errors
template <class O, bool LN>
SEQFAST_INLINE inline typename O::V cell_tanh(typename O::V x) {
  if constexpr (LN) return O::tanh_precise(x);
  return O::tanh(x);
}

template <class O, int CELL, bool LN>
void fwd_rows(const FwdChunk<typename O::T>& a) {
  using T = typename O::T;
  using V = typename O::V;
  const int G = n_gates(CELL);
  const int64_t H = a.H, hc = a.hc, j0 = a.j0, ldw = G * hc, GH = G * H;
  const bool zoneout = a.zh.on || a.zc.on;
  // a saved row: the cell's `saved_width` per unit, then layer_norm's x^ [G*H], its 1 / std, LSTM's c~ mean, 1 / std
  const int64_t SW = saved_cols(CELL, H, zoneout, LN), LN0 = saved_width(CELL, zoneout) * H;
  for (int64_t r = 0; r < a.n; ++r) {
    const auto* gx = a.gx_rows[r] + j0;
    auto* ws = a.ws + r * ldw;
    const auto* b = a.bias + j0;
    auto* hn = a.h_next + r * a.ldh + j0;
    auto* y = a.y_rows ? a.y_rows[r] + j0 : nullptr;
    auto* y_copy = y && a.y_copy ? a.y_copy + (y - a.y) : nullptr;
    auto* sv = a.saved && SW ? a.saved + r * SW + j0 : nullptr;
    const bool zn = a.zero_next && a.zero_next[r];
    if constexpr (LN) {
      // the product's LayerNorm over the row's G*H units (hc == H): x^ saved, x^ ln_hh left for the gates
      const T rstd = ln_row<O>(GH, ws, a.ln.hh, nullptr, ws, sv ? sv + LN0 : nullptr);
      if (sv) sv[LN0 + GH] = rstd;
    }
    // the cell's new h~ at units [jj, jj + m): zoneout's mix, then the carried state and y
    auto emit = [&](int64_t jj, auto m, V h) SEQFAST_INLINE {
      if (a.zh.on) {
        const V k = keep_at<O>(a.zh, r, j0 + jj, m);
        h = k * O::load(a.h_prev + r * H + j0 + jj, m) + (1.0f - k) * h;
      }
      O::store(hn + jj, zn && y ? V{} : h, m);
      if (y) O::store(y + jj, h, m);
      if (y_copy) O::store(y_copy + jj, h, m);
    };
    // LSTM's gates `o` and new cell state `cn` (c~) at units [jj, jj + m); the carried c and saved written
    auto lstm_gates = [&](int64_t jj, auto m, V& o, V& cn) SEQFAST_INLINE {
      V i = O::sigmoid(O::load(gx + jj, m) + (O::load(ws + jj, m) + O::load(b + jj, m)));
      V f = O::sigmoid(O::load(gx + H + jj, m) + (O::load(ws + hc + jj, m) + O::load(b + H + jj, m)));
      V g = cell_tanh<O, LN>(O::load(gx + 2 * H + jj, m) + (O::load(ws + 2 * hc + jj, m) + O::load(b + 2 * H + jj, m)));
      o = O::sigmoid(O::load(gx + 3 * H + jj, m) + (O::load(ws + 3 * hc + jj, m) + O::load(b + 3 * H + jj, m)));
      auto* c = a.c + r * H + j0 + jj;
      const V cp = O::load(c, m);
      cn = f * cp + i * g;
      V carried = cn;
      if (a.zc.on) {
        const V k = keep_at<O>(a.zc, r, j0 + jj, m);
        carried = k * cp + (1.0f - k) * cn;
      }
      O::store(c, zn ? V{} : carried, m);
      if (sv) {
        O::store(sv + jj, i, m);
        O::store(sv + H + jj, f, m);
        O::store(sv + 2 * H + jj, g, m);
        O::store(sv + 3 * H + jj, o, m);
        O::store(sv + 4 * H + jj, cn, m);
        if (a.zc.on) O::store(sv + 5 * H + jj, carried, m);
      }
    };
    if constexpr (CELL == LSTM && LN) {
      // h~ = o tanh(LN(c~) ln_c_weight + ln_c_bias) needs the row's whole c~: c~ and o wait in ws's read slots
      each_vector<O>(H, [&](int64_t jj, auto m) SEQFAST_INLINE {
        V o, cn;
        lstm_gates(jj, m, o, cn);
        O::store(ws + jj, cn, m);
        O::store(ws + H + jj, o, m);
      });
      T mean, rstd;
      ln_stats<O>(H, ws, mean, rstd);
      if (sv) {
        sv[LN0 + GH + 1] = mean;
        sv[LN0 + GH + 2] = rstd;
      }
      each_vector<O>(H, [&](int64_t jj, auto m) SEQFAST_INLINE {
        const V u = (O::load(ws + jj, m) - mean) * rstd * O::load(a.ln.c_weight + jj, m) + O::load(a.ln.c_bias + jj, m);
        emit(jj, m, O::load(ws + H + jj, m) * cell_tanh<O, LN>(u));
      });
      continue;
    }
    auto units = [&](int64_t jj, auto m) SEQFAST_INLINE {
      V h;
      if (CELL == RNN_TANH || CELL == RNN_RELU) {
        V pre = O::load(gx + jj, m) + (O::load(ws + jj, m) + O::load(b + jj, m));
        h = CELL == RNN_TANH ? cell_tanh<O, LN>(pre) : O::relu(pre);
        if (sv && a.zh.on) O::store(sv + jj, h, m);
      } else if (CELL == LSTM) {
        V o, cn;
        lstm_gates(jj, m, o, cn);
        h = o * cell_tanh<O, LN>(cn);
      } else {
        V rg = O::sigmoid(O::load(gx + jj, m) + (O::load(ws + jj, m) + O::load(b + jj, m)));
        V z = O::sigmoid(O::load(gx + H + jj, m) + (O::load(ws + hc + jj, m) + O::load(b + H + jj, m)));
        V hh = O::load(ws + 2 * hc + jj, m) + O::load(b + 2 * H + jj, m);
        V nn = cell_tanh<O, LN>(O::load(gx + 2 * H + jj, m) + rg * hh);
        h = (1.0f - z) * nn + z * O::load(a.h_prev + r * H + j0 + jj, m);
        if (sv) {
          O::store(sv + jj, rg, m);
          O::store(sv + H + jj, z, m);
          O::store(sv + 2 * H + jj, nn, m);
          O::store(sv + 3 * H + jj, hh, m);
        }
      }
      emit(jj, m, h);
    };
    each_vector<O>(hc, units);
  }
}

template <class O, int CELL, bool LN>
void bwd_rows(const BwdChunk<typename O::T>& a) {
  using T = typename O::T;
  using V = typename O::V;
  const int G = n_gates(CELL);
  const int64_t H = a.H, hc = a.hc, j0 = a.j0, GH = G * H;
  const bool zoneout = a.zh.on || a.zc.on;
  const int64_t SW = saved_cols(CELL, H, zoneout, LN), LN0 = saved_width(CELL, zoneout) * H;  // as the forward's
  for (int64_t r = 0; r < a.n; ++r) {
    auto* dhp = a.dh + r * H + j0;
    const auto* dy = a.dy_rows ? a.dy_rows[r] + j0 : nullptr;
    auto* dgx = a.dgx_rows[r] + j0;
    auto* da = a.da + r * GH + j0;
    const auto* sv = SW ? a.saved + r * SW + j0 : nullptr;
    const bool zero = a.zero && a.zero[r];
    // the gradient reaching h at units [jj, jj + m): h = k h_prev + (1 - k) h~ gives h_prev `direct` = k dh, the
    // cell's h~ the rest
    auto split_dh = [&](int64_t jj, auto m, V& dh, V& direct) SEQFAST_INLINE {
      dh = O::load(dhp + jj, m);
      if (dy) dh = dh + O::load(dy + jj, m);
      direct = V{};
      if (a.zh.on) {
        const V k = keep_at<O>(a.zh, r, j0 + jj, m);
        direct = k * dh;
        dh = (1.0f - k) * dh;
      }
    };
    // LSTM at units [jj, jj + m) from the gradient reaching h~ = o t (`dh`), t = tanh(c~) (layer_norm: tanh of the
    // normalised c~, whose gradient at c~ is `dch`): c~ = f c_prev + i g (then c_t = k c_prev + (1 - k) c~);
    // d sigmoid = s (1 - s), d tanh = 1 - t^2
    auto lstm_grads = [&](int64_t jj, auto m, V dh, V t, V dch) SEQFAST_INLINE {
      V i = O::load(sv + jj, m), f = O::load(sv + H + jj, m), g = O::load(sv + 2 * H + jj, m);
      V o = O::load(sv + 3 * H + jj, m);
      V cp = zero ? V{} : O::load(a.c_prev + r * a.ldc + j0 + jj, m);
      auto* dcp = a.dc + r * H + j0 + jj;
      V dct = O::load(dcp, m), dc_direct = V{};
      if (a.zc.on) {
        const V k = keep_at<O>(a.zc, r, j0 + jj, m);
        dc_direct = k * dct;
        dct = (1.0f - k) * dct;
      }
      V dc = dct + (LN ? dch : dh * o * (1.0f - t * t));
      V di = dc * g * i * (1.0f - i);
      V df = dc * cp * f * (1.0f - f);
      V dg = dc * i * (1.0f - g * g);
      V dout = dh * t * o * (1.0f - o);
      O::store(dcp, zero ? V{} : dc * f + dc_direct, m);
      O::store(dgx + jj, di, m);
      O::store(dgx + H + jj, df, m);
      O::store(dgx + 2 * H + jj, dg, m);
      O::store(dgx + 3 * H + jj, dout, m);
      O::store(da + jj, di, m);
      O::store(da + H + jj, df, m);
      O::store(da + 2 * H + jj, dg, m);
      O::store(da + 3 * H + jj, dout, m);
      if (a.hraw) O::store(a.hraw + r * H + j0 + jj, o * t, m);
    };
    if constexpr (CELL == LSTM && LN) {
      // h~ = o tanh(u), u = c^ ln_c_weight + ln_c_bias, c^ = (c~ - mean) rstd: with du = dh o (1 - tanh(u)^2) and
      // dc^ = du ln_c_weight, c~ gets rstd (dc^ - mean(dc^) - c^ mean(dc^ c^)); dh, tanh(u), dc^ wait in da
      const T mean = sv[LN0 + GH + 1], rstd = sv[LN0 + GH + 2];
      V s_dn = {}, s_dnc = {};
      each_vector<O>(H, [&](int64_t jj, auto m) SEQFAST_INLINE {
        V dh, direct;
        split_dh(jj, m, dh, direct);
        if (a.zh.on) O::store(dhp + jj, direct, m);
        const V cn = (O::load(sv + 4 * H + jj, m) - mean) * rstd, w = O::load(a.ln.c_weight + jj, m);
        const V t = cell_tanh<O, LN>(cn * w + O::load(a.ln.c_bias + jj, m));
        const V du = dh * O::load(sv + 3 * H + jj, m) * (1.0f - t * t), dn = du * w;
        s_dn += dn;
        s_dnc += dn * cn;
        add_to<O>(a.ln_grads.c_weight + jj, du * cn, m);
        add_to<O>(a.ln_grads.c_bias + jj, du, m);
        O::store(da + jj, dh, m);
        O::store(da + H + jj, t, m);
        O::store(da + 2 * H + jj, dn, m);
      });
      const T m_dn = vector_sum<O>(s_dn) / T(H), m_dnc = vector_sum<O>(s_dnc) / T(H);
      each_vector<O>(H, [&](int64_t jj, auto m) SEQFAST_INLINE {
        const V cn = (O::load(sv + 4 * H + jj, m) - mean) * rstd;
        const V dch = rstd * (O::load(da + 2 * H + jj, m) - m_dn - cn * m_dnc);
        lstm_grads(jj, m, O::load(da + jj, m), O::load(da + H + jj, m), dch);
      });
    } else {
      auto units = [&](int64_t jj, auto m) SEQFAST_INLINE {
        V dh, dh_direct;
        split_dh(jj, m, dh, dh_direct);
        if (CELL == RNN_TANH || CELL == RNN_RELU) {
          V h = O::load(a.zh.on ? sv + jj : a.h_rows[r] + j0 + jj, m);
          // tanh' = 1 - h^2; relu' = [h > 0]
          V d = CELL == RNN_TANH ? dh * (1.0f - h * h) : O::relu_grad(h, dh);
          O::store(dgx + jj, d, m);
          O::store(da + jj, d, m);
          if (a.zh.on) O::store(dhp + jj, dh_direct, m);
        } else if (CELL == LSTM) {
          lstm_grads(jj, m, dh, cell_tanh<O, LN>(O::load(sv + 4 * H + jj, m)), V{});
          if (a.zh.on) O::store(dhp + jj, dh_direct, m);
        } else {
          V rg = O::load(sv + jj, m), z = O::load(sv + H + jj, m), nn = O::load(sv + 2 * H + jj, m);
          V hh = O::load(sv + 3 * H + jj, m);
          V hp = zero ? V{} : O::load(a.h_rows[r] + j0 + jj, m);
          // h = (1 - z) n + z h_prev, n = tanh(gx_n + r hh); d sigmoid = s (1 - s), d tanh = 1 - t^2
          V dn = dh * (1.0f - z) * (1.0f - nn * nn);
          V dr = dn * hh * rg * (1.0f - rg);
          V dz = dh * (hp - nn) * z * (1.0f - z);
          V dnh = dn * rg;
          O::store(dgx + jj, dr, m);
          O::store(dgx + H + jj, dz, m);
          O::store(dgx + 2 * H + jj, dn, m);
          if (!LN) {
            auto* dgh = a.dgh_rows[r] + j0;
            O::store(dgh + jj, dr, m);
            O::store(dgh + H + jj, dz, m);
            O::store(dgh + 2 * H + jj, dnh, m);
          }
          O::store(da + jj, dr, m);
          O::store(da + H + jj, dz, m);
          O::store(da + 2 * H + jj, dnh, m);
          O::store(dhp + jj, dh * z + dh_direct, m);
        }
      };
      each_vector<O>(hc, units);
    }
    if constexpr (LN) {
      // the product's LayerNorm, da holding the gradient after it (b_hh's; ln_hh's is da x^): with u = da ln_hh, the
      // product's is rstd (u - mean(u) - x^ mean(u x^))
      const auto* xh = sv + LN0;
      ln_row_backward<O>(
          GH, da, [&](int64_t j, auto m) SEQFAST_INLINE { return O::load(xh + j, m); }, a.ln.hh, xh[GH], a.ln_grads.hh,
          a.ln_grads.b, da, a.dgh_rows[r]);
    }
  }
}

template <class O, bool LN>
void fwd_cell(int cell, const FwdChunk<typename O::T>& a) {
  switch (cell) {
    case RNN_TANH: return fwd_rows<O, RNN_TANH, LN>(a);
    case RNN_RELU: return fwd_rows<O, RNN_RELU, LN>(a);
    case LSTM: return fwd_rows<O, LSTM, LN>(a);
    default: return fwd_rows<O, GRU, LN>(a);
  }
}

template <class O, bool LN>
void bwd_cell(int cell, const BwdChunk<typename O::T>& a) {
  switch (cell) {
    case RNN_TANH: return bwd_rows<O, RNN_TANH, LN>(a);
    case RNN_RELU: return bwd_rows<O, RNN_RELU, LN>(a);
    case LSTM: return bwd_rows<O, LSTM, LN>(a);
    default: return bwd_rows<O, GRU, LN>(a);
  }
}

template <class O>
void fwd(int cell, const FwdChunk<typename O::T>& a) {
  return a.ln.hh ? fwd_cell<O, true>(cell, a) : fwd_cell<O, false>(cell, a);
}

template <class O>
void bwd(int cell, const BwdChunk<typename O::T>& a) {
  return a.ln.hh ? bwd_cell<O, true>(cell, a) : bwd_cell<O, false>(cell, a);
}

constexpr int64_t NR = SEQFAST_NV * OpsF32::W;

#if SEQFAST_MASKED_MOVES
// `dst[i * ldd + j] = src[j * lds + i]` for `i, j < 8`: an 8 x 8 block transposed in registers.
SEQFAST_INLINE inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[i + q], q < 4: element q of rows i..i+3 in its low half, element q + 4 in its high half
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(dst + q * ldd, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
    _mm256_storeu_ps(dst + (q + 4) * ldd, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
  }
}
#endif

// Walks `src` along its unit stride: down a column when `ldk == 1`, along a row when `ldn == 1` (a power-of-two `ldk`
// walked down a column would map every element to one cache set), through 8 x 8 blocks transposed in registers where
// the instruction set has AVX (element by element, `LSTM(200)`'s forward panels took about 130 us a layer).
inline void pack(int64_t k, int64_t n, const float* src, int64_t ldk, int64_t ldn, float* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    float* panel = dst + (j0 / NR) * k * NR;
    const int64_t cols = n - j0 < NR ? n - j0 : NR;
    if (ldn == 1) {
      for (int64_t kk = 0; kk < k; ++kk) {
        for (int64_t jj = 0; jj < NR; ++jj) panel[kk * NR + jj] = jj < cols ? src[kk * ldk + j0 + jj] : 0.0f;
      }
    } else {
      // where `ldk == 1`, blocks of 8 x 8 transposed in registers, the edges element by element
      int64_t k8 = 0, c8 = 0;
#if SEQFAST_MASKED_MOVES
      if (ldk == 1) {
        k8 = k / 8 * 8, c8 = cols / 8 * 8;
        for (int64_t jj = 0; jj < c8; jj += 8)
          for (int64_t kk = 0; kk < k8; kk += 8) transpose8(src + (j0 + jj) * ldn + kk, ldn, panel + kk * NR + jj, NR);
      }
#endif
      for (int64_t jj = 0; jj < NR; ++jj) {
        for (int64_t kk = jj < c8 ? k8 : 0; kk < k; ++kk)
          panel[kk * NR + jj] = jj < cols ? src[kk * ldk + (j0 + jj) * ldn] : 0.0f;
      }
    }
  }
}

// Steps of `k` ahead that a tile streaming its panels prefetches.
constexpr int64_t kPrefetchSteps = 16;

// One register tile: `C[MR, ncols] = A[MR, k] [panel_0 .. panel_NP-1][k, NP*NR]`, accumulators held in registers
// over all of `k`. Small tiles also split `k` into `KS` interleaved partial sums so that at least 8 independent FMA
// chains are in flight (a fixed order: the result does not depend on the caller). A tile that reads its panels
// first (`STREAM`) prefetches them `kPrefetchSteps` ahead: they come from L3 or memory, which the hardware prefetcher
// alone did not keep up with (Ice Lake, one core, 32 rows against `LSTM(512)`'s 4 MB of panels on huge pages: 70-88
// GFLOP/s, prefetched 97-105).
template <int MR, int NP, bool STREAM>
inline void tile(int64_t k, const float* A, int64_t lda, const float* panel, int64_t pstride, bool accumulate,
                 float* C, int64_t ldc, int64_t ncols) {
  using O = OpsF32;
  using V = O::V;
  constexpr int NB = NP * SEQFAST_NV;
  constexpr int KS = MR * NB >= 8 ? 1 : (8 + MR * NB - 1) / (MR * NB);
  V acc[KS][MR][NB];
#pragma GCC unroll 4
  for (int s = 0; s < KS; ++s)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) acc[s][m][v] = V{};
  auto step = [&](int s, int64_t p) {
    if constexpr (STREAM) {
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
        for (int64_t line = 0; line < NR; line += 64 / int64_t(sizeof(float)))
          __builtin_prefetch(panel + q * pstride + (p + kPrefetchSteps) * NR + line, 0, 3);
    }
    V b[NB];
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v)
      std::memcpy(&b[v], panel + (v / SEQFAST_NV) * pstride + p * NR + (v % SEQFAST_NV) * O::W, sizeof(V));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V a = O::splat(A[m * lda + p]);
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) acc[s][m][v] += a * b[v];
    }
  };
  int64_t p = 0;
  for (; p + KS <= k; p += KS) {
#pragma GCC unroll 4
    for (int s = 0; s < KS; ++s) step(s, p + s);
  }
  for (; p < k; ++p) step(0, p);
#pragma GCC unroll 4
  for (int s = 1; s < KS; ++s)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) acc[0][m][v] += acc[s][m][v];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      const int64_t left = ncols - v * O::W;
      if (left <= 0) break;
      const int cols = lanes(O::W, left);
      float* c = C + m * ldc + v * O::W;
      O::store(c, accumulate ? acc[0][m][v] + O::load(c, cols) : acc[0][m][v], cols);
    }
  }
}

// `tile<rows, NP, STREAM>` for a run-time `rows <= MR`.
template <int NP, int MR, bool STREAM>
inline void tile_rows(int64_t rows, int64_t k, const float* A, int64_t lda, const float* panel, int64_t pstride,
                      bool accumulate, float* C, int64_t ldc, int64_t ncols) {
  if constexpr (MR > 0) {
    if (rows == MR) return tile<MR, NP, STREAM>(k, A, lda, panel, pstride, accumulate, C, ldc, ncols);
    tile_rows<NP, MR - 1, STREAM>(rows, k, A, lda, panel, pstride, accumulate, C, ldc, ncols);
  }
}

inline void gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* Bp, bool accumulate,
                 float* C, int64_t ldc) {
  const int64_t panels = (n + NR - 1) / NR, ps = k * NR;
  int64_t q = 0;
  if (m <= SEQFAST_MR / 4) {
    for (; q + 4 <= panels; q += 4)
      tile_rows<4, SEQFAST_MR / 4, true>(m, k, A, lda, Bp + q * ps, ps, accumulate, C + q * NR, ldc, n - q * NR);
  }
  if (m <= SEQFAST_MR / 2) {
    for (; q + 2 <= panels; q += 2)
      tile_rows<2, SEQFAST_MR / 2, true>(m, k, A, lda, Bp + q * ps, ps, accumulate, C + q * NR, ldc, n - q * NR);
  }
  for (; q < panels; ++q) {
    const float* panel = Bp + q * ps;
    const int64_t j = q * NR, ncols = n - j < NR ? n - j : NR;
    // the first tile of rows streams the panel in, the others find it in cache
    int64_t i = 0;
    if (m >= SEQFAST_MR) {
      tile<SEQFAST_MR, 1, true>(k, A, lda, panel, ps, accumulate, C + j, ldc, ncols);
      i = SEQFAST_MR;
    }
    for (; i + SEQFAST_MR <= m; i += SEQFAST_MR)
      tile<SEQFAST_MR, 1, false>(k, A + i * lda, lda, panel, ps, accumulate, C + i * ldc + j, ldc, ncols);
    if (i == 0) {
      tile_rows<1, SEQFAST_MR - 1, true>(m, k, A, lda, panel, ps, accumulate, C + j, ldc, ncols);
    } else if (i < m) {
      tile_rows<1, SEQFAST_MR - 1, false>(m - i, k, A + i * lda, lda, panel, ps, accumulate, C + i * ldc + j, ldc,
                                          ncols);
    }
  }
}

// `y[i] (+)= sum_p W[i, p] x[p]` for `p` from `full` (a multiple of the vector width, up to which `acc` holds the
// sums by lanes) to `k`.
template <class O>
inline void dot_finish(typename O::V acc, int64_t full, int64_t k, const typename O::T* w, const typename O::T* x,
                       bool accumulate, typename O::T* y) {
  typename O::T sum = vector_sum<O>(acc);
  for (int64_t p = full; p < k; ++p) sum += w[p] * x[p];
  *y = sum + (accumulate ? *y : typename O::T(0));
}

// `y[i] (+)= W[i, :k] x` for 4 rows (`ROWS4`) or 1, `ldw` apart, one accumulator per row (named, not an array, so
// that they stay in registers).
template <class O, bool ROWS4>
inline void dot_block(int64_t k, const typename O::T* W, int64_t ldw, const typename O::T* x, bool accumulate,
                      typename O::T* y) {
  using V = typename O::V;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  const int64_t full = k / O::W * O::W;
  for (int64_t p = 0; p < full; p += O::W) {
    const V xv = O::load(x + p, O::W);
    a0 += O::load(W + p, O::W) * xv;
    if (ROWS4) {
      a1 += O::load(W + ldw + p, O::W) * xv;
      a2 += O::load(W + 2 * ldw + p, O::W) * xv;
      a3 += O::load(W + 3 * ldw + p, O::W) * xv;
    }
  }
  dot_finish<O>(a0, full, k, W, x, accumulate, y);
  if (ROWS4) {
    dot_finish<O>(a1, full, k, W + ldw, x, accumulate, y + 1);
    dot_finish<O>(a2, full, k, W + 2 * ldw, x, accumulate, y + 2);
    dot_finish<O>(a3, full, k, W + 3 * ldw, x, accumulate, y + 3);
  }
}

// `y[:n] += x[i] W[i, :n] + ... ` for the `R` rows `i` from `W` (`ldw` apart): each row read once, in order.
template <class O, int R>
inline void axpy_rows(int64_t n, const typename O::T* W, int64_t ldw, const typename O::T* x, typename O::T* y) {
  using V = typename O::V;
  V a[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) a[i] = O::splat(x[i]);
  each_vector<O>(n, [&](int64_t j, auto m) SEQFAST_INLINE {
    V acc = O::load(y + j, m);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) acc += a[i] * O::load(W + i * ldw + j, m);
    O::store(y + j, acc, m);
  });
}

// A product of one row: `y[j] (+)= W[j, :k] x` for `j < n`, or `trans`: `y[j] (+)= x[:k] W[:k, j]`; W's rows `ldw`
// apart. It runs at the memory's pace: 600x200 from L3 in 6.2 us on a Zen 4, where MKL's sgemv takes 12.0.
template <class O>
inline void gemv(bool trans, int64_t n, int64_t k, const typename O::T* W, int64_t ldw, const typename O::T* x,
                 bool accumulate, typename O::T* y) {
  if (trans) {
    if (!accumulate) std::fill_n(y, n, typename O::T(0));
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) axpy_rows<O, 4>(n, W + i * ldw, ldw, x + i, y);
    for (; i < k; ++i) axpy_rows<O, 1>(n, W + i * ldw, ldw, x + i, y);
    return;
  }
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_block<O, true>(k, W + j * ldw, ldw, x, accumulate, y + j);
  for (; j < n; ++j) dot_block<O, false>(k, W + j * ldw, ldw, x, accumulate, y + j);
}

template <class O>
void ln_fwd(int64_t n, int64_t N, const typename O::T* z, const typename O::T* gamma, const typename O::T* beta,
            typename O::T* y) {
  for (int64_t r = 0; r < n; ++r) ln_row<O>(N, z + r * N, gamma, beta, y + r * N, nullptr);
}

template <class O>
void ln_bwd(int64_t n, int64_t N, const typename O::T* dy, const typename O::T* z, const typename O::T* gamma,
            typename O::T* dz, typename O::T* dgamma, typename O::T* dbeta) {
  using T = typename O::T;
  for (int64_t r = 0; r < n; ++r) {
    const T* z_r = z + r * N;
    T mean, rstd;
    ln_stats<O>(N, z_r, mean, rstd);
    ln_row_backward<O>(
        N, dy + r * N, [&](int64_t j, auto m) SEQFAST_INLINE { return (O::load(z_r + j, m) - mean) * rstd; }, gamma,
        rstd, dgamma, dbeta, dz ? dz + r * N : nullptr, nullptr);
  }
}

inline void fwd_f32(int cell, const FwdChunk<float>& a) { fwd<OpsF32>(cell, a); }
inline void bwd_f32(int cell, const BwdChunk<float>& a) { bwd<OpsF32>(cell, a); }
inline void fwd_f64(int cell, const FwdChunk<double>& a) { fwd<OpsF64>(cell, a); }
inline void bwd_f64(int cell, const BwdChunk<double>& a) { bwd<OpsF64>(cell, a); }
inline void gemv_f32(bool trans, int64_t n, int64_t k, const float* W, int64_t ldw, const float* x, bool accumulate,
                     float* y) {
  gemv<OpsF32>(trans, n, k, W, ldw, x, accumulate, y);
}
inline void gemv_f64(bool trans, int64_t n, int64_t k, const double* W, int64_t ldw, const double* x, bool accumulate,
                     double* y) {
  gemv<OpsF64>(trans, n, k, W, ldw, x, accumulate, y);
}

inline IsaKernels kernels() {
  return {fwd_f32,        bwd_f32,        fwd_f64,        bwd_f64,        NR, pack, gemm, gemv_f32, gemv_f64,
          ln_fwd<OpsF32>, ln_fwd<OpsF64>, ln_bwd<OpsF32>, ln_bwd<OpsF64>};
}

}  // namespace SEQFAST_ISA
}  // namespace seqfast
