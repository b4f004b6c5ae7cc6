// The fused time loops, forward and backward, of one layer-direction. A call's rows split into blocks that run all
// their steps apart (`row_block`: from 12 rows, while `w_hh` is small for a block's rows), each step's product over
// every hidden unit and then the cell math on the block's rows. Otherwise a step is split into fixed chunks of hidden
// units: a chunk runs its slice of the recurrent GEMM and then the cell math on the slice while it is in cache; the
// whole loop is one parallel region in which each thread keeps its own chunks (so their weights stay in its cache)
// and waits for the other threads only at the end of a step. Blocks and chunks do not depend on the thread count, so
// results are bitwise the same for any `torch.set_num_threads`. Rows are visited in length order (longest first), so
// the rows still running at a step are a prefix and the GEMMs shrink as sequences end. The layer_norm option
// normalises each row's whole product: its calls run one chunk of every unit, rows in blocks or all in one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "blas.h"
#include "buffers.h"
#include "hidden_product.h"
#include "isa_choice.h"
#include "isa_kernels.h"
#include "order.h"
#include "scheduler.h"

namespace seqfast {

// The input projection `x [M, K] w^T + b` where `K` is small (up to `kSmallProjectionK`), a row at a time from `wt =
// w^T [K, N]`: writing and reading back `[M, N]` cost more than its multiply-adds there (LSTM(8, 32) B256 T50: 0.3 of
// 1.2 ms), so a loop running rows in blocks forms each step's rows in cache instead, and `project` forms the rest
// with the same rows: the same bits either way. Up to K = 16: at K = 28 (LSTM(28, 64) B64 T28) the rows cost 3-5%
// more than they saved.
constexpr int64_t kSmallProjectionK = 16;

template <typename T>
struct SmallProjection {
  const T* x = nullptr;   // [M, K]; null: the call was given `gx`
  const T* wt = nullptr;  // [K, N]
  const T* b = nullptr;   // [N] or null
  int64_t K = 0, N = 0;

  // `out [N]` of the row `x_row [K]`
  void row(const IsaKernels& kern, const T* x_row, T* out) const {
    if (b) std::copy_n(b, N, out);
    run_gemv(kern, true, N, K, wt, N, x_row, b != nullptr, out);
  }
  // `out [M, N]` of all `M` rows of `x`, over the threads
  void rows(int64_t M, T* out) const {
    const IsaKernels kern = isa_kernels();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, N * K));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) row(kern, x + m * K, out + m * N);
    });
  }
};

// Zoneout of a call: the weights of the previous state, `h [T, B, P]` and LSTM's `c [T, B, H]` in time order (training
// masks), else the constant `keep` for every unit (evaluation); off when neither is given.
struct ZoneoutArgs {
  c10::optional<at::Tensor> h, c;
  double keep = 0;
  bool on() const { return h.has_value() || keep > 0; }
};

// The layer_norm option of a call: the gains `hh [G*H]` and LSTM's `c_weight`, `c_bias [H]`; off without `hh`.
struct LayerNormArgs {
  c10::optional<at::Tensor> hh, c_weight, c_bias;
  bool on() const { return hh.has_value(); }
  template <typename T>
  LayerNorm<T> pointers() const {
    auto p = [](const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<T>() : nullptr; };
    return {p(hh), p(c_weight), p(c_bias)};
  }
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
  // Step `s`'s zoneout from sorted row `r0` on.
  Zoneout<T> at(int64_t s, int64_t r0 = 0) const {
    return {on_, rows_.empty() ? nullptr : rows_.data() + s * B_ + r0, keep_};
  }
  // The weight of sorted row `r`'s unit `j` at step `s`.
  T weight(int64_t s, int64_t r, int64_t j) const { return rows_.empty() ? keep_ : rows_[s * B_ + r][j]; }

 private:
  bool on_;
  T keep_;
  int64_t B_;
  std::vector<const T*> rows_;
};

template <typename scalar_t>
void fwd_loop(int cell, const at::Tensor& gx, const SmallProjection<scalar_t>& sp, const at::Tensor& w_hh,
              const c10::optional<at::Tensor>& bias, const at::Tensor& h0, const at::Tensor& c0, const Order& ord,
              const c10::optional<at::Tensor>& w_hr, const ZoneoutArgs& zo, const LayerNormArgs& lna, int64_t chunk,
              Plan plan, const at::Tensor& y, const at::Tensor& hT, const at::Tensor& cT, const at::Tensor& saved,
              const at::Tensor& y_copy) {
  const int64_t T = y.size(0), B = y.size(1), GH = w_hh.size(0), G = gates(cell), H = GH / G, P = w_hh.size(1);
  const bool proj = w_hr.has_value(), lstm = cell == LSTM, ln = lna.on();
  // rows in blocks (one chunk of every unit), else hidden units in chunks (layer_norm, which normalises whole rows:
  // a step's product by chunks, then its rows in groups)
  const int64_t rb = proj || !plan.blocks ? B : row_block(B, GH, P, sizeof(scalar_t), ord.ragged);
  const int64_t hc = rb < B ? H : std::min(chunk, H), nch = (H + hc - 1) / hc;
  const int64_t SW = saved_cols(cell, H, zo.on(), ln);
  // `sp`'s rows formed a step at a time in blocks of rows (into `pgs`), else all at once before the loop
  const bool fused = sp.x && rb < B;
  const LayerNorm<scalar_t> lnp = lna.pointers<scalar_t>();
  // a projected h's zoneout runs after the projection, here; the cell kernel's otherwise
  const ZoneoutRows<scalar_t> zh(zo.h, zo.keep, zo.on(), P, ord, B), zc(zo.c, zo.keep, zo.on() && lstm, H, ord, B);
  const int64_t pcs = std::min(chunk, P), npc = (P + pcs - 1) / pcs;
  const IsaKernels kern = isa_kernels();
  const HiddenProduct<scalar_t> whh(w_hh, G, H, hc, false, ord, kern, plan.pack);
  const int64_t BC = lstm ? B * H : 0, BR = proj ? B * H : 0;
  const int64_t BS = fused ? B * GH : 0;
  const KeptBuffer<Use::kLoopState, scalar_t> state(2 * B * P + BC + BR + B * GH + (bias ? 0 : GH) + BS);
  Carve<scalar_t> carve(state.data());
  scalar_t* hb = carve.take(2 * B * P);  // [2, B, P] state before / after the step
  scalar_t* pc = carve.take(BC);         // [B, H]
  scalar_t* phraw = carve.take(BR);      // [B, H] o * tanh(c) before projecting
  scalar_t* pws = carve.take(B * GH);    // per chunk [B, G*hc]
  scalar_t* zeros = bias ? nullptr : carve.take(GH);
  scalar_t* pgs = carve.take(BS);        // [B, G*H] the step's projected rows (`fused`)
  if (zeros) std::fill_n(zeros, GH, scalar_t(0));
  scalar_t* py = y.data_ptr<scalar_t>();
  scalar_t* py_copy = y_copy.defined() ? y_copy.data_ptr<scalar_t>() : nullptr;  // written alike, for the caller
  scalar_t* psaved = saved.numel() ? saved.data_ptr<scalar_t>() : nullptr;
  at::Tensor gx_formed;
  if (sp.x && !fused) {
    gx_formed = Recycler::empty({T, B, GH}, y.options());
    sp.rows(T * B, gx_formed.data_ptr<scalar_t>());
  }
  const at::Tensor& gx_all = sp.x ? gx_formed : gx;
  const scalar_t* pgx = fused ? nullptr : gx_all.data_ptr<scalar_t>();
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
  std::vector<const scalar_t*> gx_rows(T * B);  // [T, B] step s's rows (of `x` when `fused`), in sorted order
  std::vector<const scalar_t*> gs_rows(fused ? B : 0);  // sorted row r's projected row in `pgs`
  for (int64_t r = 0; r < int64_t(gs_rows.size()); ++r) gs_rows[r] = pgs + r * GH;
  std::vector<scalar_t*> y_rows(T * B);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t n = ord.active[s];
    for (int64_t r = 0; r < n; ++r) {
      const int64_t off = ord.time(s, r) * B + ord.perm[r];
      gx_rows[s * B + r] = fused ? sp.x + off * sp.K : pgx + off * GH;
      y_rows[s * B + r] = py + off * P;
    }
    for (int64_t r = n; r < B; ++r) {
      std::fill_n(py + (s * B + ord.perm[r]) * P, P, scalar_t(0));
      if (py_copy) std::fill_n(py_copy + (s * B + ord.perm[r]) * P, P, scalar_t(0));
      if (psaved) std::fill_n(psaved + (s * B + r) * SW, SW, scalar_t(0));
    }
  }
  // step `s`'s cell math on hidden units `[j0, j0 + n_j)` of the rows `[r0, r0 + n)`, their products in `wsc`
  auto cell_math = [&](int64_t s, int64_t j0, int64_t n_j, int64_t r0, int64_t n, scalar_t* wsc) {
    scalar_t* cur = hb + (s % 2) * B * P + r0 * P;
    scalar_t* nxt = hb + ((s + 1) % 2) * B * P + r0 * P;
    const uint8_t* zero_next = ord.zero_at(s + 1);
    const FwdChunk<scalar_t> a{.n = n,
                               .H = H,
                               .j0 = j0,
                               .hc = n_j,
                               .ws = wsc,
                               .gx_rows = fused ? gs_rows.data() + r0 : gx_rows.data() + s * B + r0,
                               .bias = pb,
                               .h_prev = cur,
                               .h_next = proj ? phraw + r0 * H : nxt,
                               .ldh = proj ? H : P,
                               .c = pc + r0 * H,
                               .y_rows = proj ? nullptr : y_rows.data() + s * B + r0,
                               .y = py,
                               .y_copy = py_copy,
                               .saved = psaved ? psaved + (s * B + r0) * SW : nullptr,
                               .zero_next = zero_next ? zero_next + r0 : nullptr,
                               .zh = proj ? Zoneout<scalar_t>{} : zh.at(s, r0),
                               .zc = zc.at(s, r0),
                               .ln = lnp};
    run_fwd(kern, cell, a);
  };
  // step `s`, hidden chunk `c`, for the rows of `[r0, r1)` still running
  auto cell_step = [&](int64_t s, int64_t c, int64_t r0, int64_t r1) {
    const int64_t n = std::min(ord.active[s], r1) - r0;
    if (n <= 0) return;
    const int64_t j0 = c * hc, n_j = std::min(hc, H - j0);
    scalar_t* wsc = pws + B * G * j0 + r0 * G * n_j;
    whh(c, n, hb + (s % 2) * B * P + r0 * P, P, wsc, G * n_j, false);
    if (fused)
      for (int64_t r = r0; r < r0 + n; ++r) sp.row(kern, gx_rows[s * B + r], pgs + r * GH);
    cell_math(s, j0, n_j, r0, n, wsc);
  };
  const int64_t step_macs = float_macs<scalar_t>(B * GH * P);
  if (rb < B) {
    run_blocks((B + rb - 1) / rb, T * step_macs, [&](int64_t b) {
      for (int64_t s = 0; s < T && ord.active[s] > b * rb; ++s) cell_step(s, 0, b * rb, (b + 1) * rb);
    });
  } else if (ln) {
    // phase 2s: step s's product, chunk c, into rows of every unit; phase 2s + 1: its rows in `nch` groups
    const int64_t rows = (B + nch - 1) / nch;
    run_steps(2 * T, nch, step_macs, [&](int64_t q, int64_t c) {
      const int64_t s = q / 2, n = ord.active[s];
      if (q % 2 == 0) {
        if (n > 0) whh(c, n, hb + (s % 2) * B * P, P, pws + c * hc, GH, false, H);
        return;
      }
      const int64_t r0 = c * rows, m = std::min(n, r0 + rows) - r0;
      if (m > 0) cell_math(s, 0, H, r0, m, pws + r0 * GH);
    });
  } else if (!proj) {
    run_steps(T, nch, step_macs, [&](int64_t s, int64_t c) { cell_step(s, c, 0, B); });
  } else {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t n = ord.active[s];
      if (n == 0) break;
      at::parallel_for(0, nch, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) cell_step(s, c, 0, B);
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
            if (py_copy) std::copy_n(nxt + r * P + p0, n_p, py_copy + (ys[r] - py) + p0);
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
              const ZoneoutArgs& zo, const LayerNormArgs& lna, const at::Tensor& y, const at::Tensor& saved,
              int64_t chunk, Plan plan, const at::Tensor& dgx, const at::Tensor& dgh, const at::Tensor& dh0,
              const at::Tensor& dc0, const at::Tensor& dw_hr, const std::vector<at::Tensor>& ln_grads) {
  const int64_t T = dy.size(0), B = dy.size(1), P = dy.size(2), G = gates(cell), GH = w_hh.size(0), H = GH / G;
  const bool need_dh0 = dh0.defined();
  const bool proj = w_hr.has_value(), lstm = cell == LSTM, ln = lna.on();
  const int64_t rb = proj || !plan.blocks ? B : row_block(B, GH, P, sizeof(scalar_t), ord.ragged);
  const int64_t hc = rb < B ? H : std::min(chunk, H), nch = (H + hc - 1) / hc;
  // blocks of rows, or layer_norm's groups of rows when the products run by chunks
  const int64_t nb = rb < B ? (B + rb - 1) / rb : ln ? nch : 1;
  const int64_t group = rb < B ? rb : std::max<int64_t>(1, (B + nb - 1) / nb);
  const int64_t SW = saved_cols(cell, H, zo.on(), ln);
  const LayerNorm<scalar_t> lnp = lna.pointers<scalar_t>();
  // layer_norm's parameter gradients, `b_hh, ln_hh [G*H]` (LSTM: `ln_c_weight, ln_c_bias [H]`), summed per block of
  // rows, then the blocks in order
  const int64_t LG = ln ? 2 * GH + (lstm ? 2 * H : 0) : 0;
  std::vector<scalar_t> block_ln_grads(nb * LG, scalar_t(0));
  const ZoneoutRows<scalar_t> zh(zo.h, zo.keep, zo.on(), P, ord, B), zc(zo.c, zo.keep, zo.on() && lstm, H, ord, B);
  const int64_t pcs = std::min(chunk, P), npc = (P + pcs - 1) / pcs;
  const IsaKernels kern = isa_kernels();
  const int64_t BC = lstm ? B * H : 0, BR = proj ? B * H : 0;
  const KeptBuffer<Use::kLoopState, scalar_t> state(2 * B * P + 2 * BC + (proj ? 1 : 2) * B * GH + BR);
  Carve<scalar_t> carve(state.data());
  scalar_t* pdh = carve.take(B * P);                 // [B, P] gradient reaching h from later steps
  scalar_t* pdc = carve.take(BC);                    // [B, H]
  scalar_t* ph0s = carve.take(B * P);                // [B, P] h0 in sorted order
  scalar_t* pc0s = carve.take(BC);                   // [B, H] c0 in sorted order
  scalar_t* pda = carve.take((proj ? 1 : 2) * B * GH);  // dgh of the step, double-buffered
  scalar_t* pdhraw = carve.take(BR);                 // [B, H] dhs @ w_hr
  // projection: per step, dh at the projected h and o * tanh(c), zero past each length, for dw_hr after the loop
  const at::Tensor dhs_all = proj ? at::zeros({T, B, P}, dy.options()) : at::Tensor();
  const at::Tensor hraw_all = proj ? at::zeros({T, B, H}, dy.options()) : at::Tensor();
  scalar_t* pdgx = dgx.data_ptr<scalar_t>();
  scalar_t* pdgh = cell == GRU || ln ? dgh.data_ptr<scalar_t>() : nullptr;  // the other cells' dgh is dgx
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
      proj ? std::nullopt : std::make_optional<HiddenProduct<scalar_t>>(w_hh, G, H, hc, true, ord, kern, plan.pack);
  // `dh` columns [p0, p0 + n_p) of rows `[r0, r1)` whose step `s` started from zeros: no gradient reaches the state
  // before
  auto clear_dh = [&](int64_t s, int64_t r0, int64_t r1, int64_t p0, int64_t n_p) {
    if (const uint8_t* z = ord.zero_at(s))
      for (int64_t r = r0; r < r1; ++r)
        if (z[r]) std::fill_n(pdh + r * P + p0, n_p, scalar_t(0));
  };
  // dh before step `s`, columns of chunk `c`, rows `[r0, r0 + n)`, from step `s`'s `da`
  // the cell math leaves GRU's dh z, and zoneout's k dh, in dh for the product to add to
  auto dh_prev = [&](int64_t s, int64_t c, int64_t r0, int64_t n, const scalar_t* da) {
    (*whh)(c, n, da + r0 * GH, GH, pdh + r0 * P + c * hc, P, cell == GRU || zo.on());
    clear_dh(s, r0, r0 + n, c * hc, std::min(hc, H - c * hc));
  };
  // block `b`'s sums of the layer_norm parameter gradients
  auto ln_grads_of = [&](int64_t b) {
    scalar_t* p = block_ln_grads.data() + b * LG;
    return ln ? LayerNormGrads<scalar_t>{p, p + GH, lstm ? p + 2 * GH : nullptr, lstm ? p + 2 * GH + H : nullptr}
              : LayerNormGrads<scalar_t>{};
  };
  auto c_prev = [&](int64_t s) { return s > 0 ? psaved + (s - 1) * B * SW + (zo.on() ? 5 : 4) * H : pc0; };
  auto ldc = [&](int64_t s) { return s > 0 ? SW : H; };
  // step `s`'s cell math on hidden units `[j0, j0 + n_j)` of the rows `[r0, r0 + n)`, layer_norm's sums into block
  // (or group) `b`'s
  auto cell_bwd = [&](int64_t s, int64_t j0, int64_t n_j, int64_t r0, int64_t n, int64_t b) {
    const int64_t i = s * B + r0;
    const uint8_t* zero = ord.zero_at(s);
    const BwdChunk<scalar_t> a{.n = n,
                               .H = H,
                               .j0 = j0,
                               .hc = n_j,
                               .dh = pdh + r0 * P,
                               .dy_rows = dy_rows.data() + i,
                               .dc = pdc + r0 * H,
                               .saved = psaved + i * SW,
                               .c_prev = c_prev(s) + r0 * ldc(s),
                               .ldc = ldc(s),
                               .h_rows = h_rows.data() + i,
                               .dgx_rows = dgx_rows.data() + i,
                               .dgh_rows = dgh_rows.data() + i,
                               .da = pda + (s % 2) * B * GH + r0 * GH,
                               .hraw = nullptr,
                               .zero = zero ? zero + r0 : nullptr,
                               .zh = zh.at(s, r0),
                               .zc = zc.at(s, r0),
                               .ln = lnp,
                               .ln_grads = ln_grads_of(b)};
    run_bwd(kern, cell, a);
  };
  // Step k runs time step T - 1 - k, for chunk `c` and the rows of `[r0, r1)` still running; step T forms dh0 from
  // the last da (when wanted).
  auto bwd_step = [&](int64_t k, int64_t c, int64_t r0, int64_t r1) {
    const int64_t s = T - 1 - k;
    auto rows = [&](int64_t step) { return step < T ? std::max<int64_t>(std::min(ord.active[step], r1) - r0, 0) : 0; };
    if (s < 0) {
      if (rows(0) > 0) dh_prev(0, c, r0, rows(0), pda);
      return;
    }
    const int64_t n = rows(s), n_next = rows(s + 1);
    if (n == 0) return;
    if (n_next > 0) dh_prev(s + 1, c, r0, n_next, pda + ((s + 1) % 2) * B * GH);
    cell_bwd(s, c * hc, std::min(hc, H - c * hc), r0, n, r0 / group);
  };

  const int64_t step_macs = float_macs<scalar_t>(B * GH * P);
  if (rb < B) {
    run_blocks(nb, T * step_macs, [&](int64_t b) {
      for (int64_t k = 0; k < T + need_dh0; ++k) bwd_step(k, 0, b * rb, (b + 1) * rb);
    });
  } else if (ln) {
    // phase 2k - 1: the product with step T - k's da (the dh before that step), chunk c; phase 2k: step T - 1 - k's
    // rows in `nb` groups
    run_steps(T > 0 ? 2 * T - 1 + need_dh0 : 0, nch, step_macs, [&](int64_t q, int64_t c) {
      const int64_t k = (q + 1) / 2;
      if (q % 2) {
        const int64_t s = T - k, n = ord.active[s];
        if (n > 0) dh_prev(s, c, 0, n, pda + (s % 2) * B * GH);
        return;
      }
      const int64_t s = T - 1 - k, r0 = c * group, n = std::min(ord.active[s], r0 + group) - r0;
      if (n > 0) cell_bwd(s, 0, H, r0, n, c);
    });
  } else if (!proj) {
    // a single step without dh0 has no product with w_hh, only the cell math: not worth waking a thread for
    run_steps(T + need_dh0, nch, T > 1 || need_dh0 ? step_macs : 0,
              [&](int64_t k, int64_t c) { bwd_step(k, c, 0, B); });
  } else {
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t n = ord.active[s], i = s * B;
      if (n == 0) continue;
      const scalar_t* sv = psaved + s * B * SW;
      scalar_t* pdhs = dhs_all.data_ptr<scalar_t>() + s * B * P;
      scalar_t* phraw = hraw_all.data_ptr<scalar_t>() + s * B * H;
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
          const BwdChunk<scalar_t> a{.n = n,
                                     .H = H,
                                     .j0 = j0,
                                     .hc = n_j,
                                     .dh = pdhraw,
                                     .dy_rows = nullptr,
                                     .dc = pdc,
                                     .saved = sv,
                                     .c_prev = c_prev(s),
                                     .ldc = ldc(s),
                                     .h_rows = h_rows.data() + i,
                                     .dgx_rows = dgx_rows.data() + i,
                                     .dgh_rows = dgh_rows.data() + i,
                                     .da = pda,
                                     .hraw = phraw,
                                     .zero = ord.zero_at(s),
                                     .zh = Zoneout<scalar_t>{},
                                     .zc = zc.at(s)};
          run_bwd(kern, cell, a);
        }
      });
      if (s == 0 && !need_dh0) continue;
      at::parallel_for(0, npc, 1, [&](int64_t begin, int64_t end) {
        OneBlasThread one;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t p0 = c * pcs, n_p = std::min(pcs, P - p0);
          step_gemm<scalar_t>(kern, false, n, n_p, GH, pda, GH, pw + p0, P, scalar_t(zo.on()), pdh + p0, P);
          clear_dh(s, 0, n, p0, n_p);
        }
      });
    }
    // dw_hr = dhs^T [o * tanh(c)] over all steps and rows, one product, on one BLAS thread: MKL splits the sum over
    // rows by its thread count
    OneBlasThread one;
    gemm<scalar_t>(true, false, P, H, T * B, dhs_all.data_ptr<scalar_t>(), P, hraw_all.data_ptr<scalar_t>(), H,
                   scalar_t(1), pdw, H);
  }
  if (need_dh0) permute_rows(pdh, dh0.data_ptr<scalar_t>(), ord, P, false);
  if (lstm) permute_rows(pdc, dc0.data_ptr<scalar_t>(), ord, H, false);
  int64_t off = 0;
  for (const at::Tensor& grad : ln_grads) {
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t n = grad.numel();
    std::fill_n(out, n, scalar_t(0));
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < n; ++j) out[j] += block_ln_grads[b * LG + off + j];
    off += n;
  }
}

}  // namespace seqfast
