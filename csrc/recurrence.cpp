// The extension's entry points: the ATen-facing forward, backward, stack and step around the loops of loops.h, the
// eager autograd node, and the Python bindings.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <array>
#include <climits>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "isa_choice.h"
#include "isa_kernels.h"
#include "loops.h"

namespace seqfast {
namespace {

void check_cell(int64_t cell) { TORCH_CHECK(cell >= RNN_TANH && cell <= GRU, "unknown cell id ", cell); }

// The extension's own ATen calls skip the autograd layers of the dispatcher: nothing they do is differentiated
// (`layer`'s node records its own backward, which runs without grad), and what they return is never a view of an
// input.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// An output of `sizes` (a large one on a recycled block, see `Recycler`), NaN-filled when `poison` (so an element the
// loop leaves unwritten fails loudly).
at::Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = Recycler::empty(sizes, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor as(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t.contiguous() : t.to(dt).contiguous();
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// The loops' dtype for inputs of `dt`: float64 stays float64, float32, float16 and bfloat16 compute in float32.
at::ScalarType compute_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

c10::optional<at::Tensor> as(const c10::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t) return c10::nullopt;
  return as(*t, dt);
}

#if SEQFAST_BLAS
// Whether `project` can make the BLAS call at::addmm (at::mm without a bias) would make for the product itself.
bool direct_projection(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  const auto dt = x.scalar_type();
  const bool blas = dt == at::kFloat ? have_blas<float>() : dt == at::kDouble && have_blas<double>();
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  return blas && w.scalar_type() == dt && (!b || b->scalar_type() == dt) && x.is_contiguous() && w.is_contiguous() &&
         w.dim() == 2 && w.size(1) == K && M > 0 && K > 0 && M < INT_MAX && K < INT_MAX && w.size(0) < INT_MAX;
}

// Weights of a one-row projection from which `project_blas` splits it over two threads: a 2-layer float32 GRU(200)
// step at B = 1 (480 KB a matrix) took 49 us against 67 us on one; an LSTM cell of H = 128 (256 KB) lost 6% to the
// fork and join.
constexpr int64_t kSplitRowBytes = int64_t(384) << 10;

// `gx [M, N] = x [M, K] w^T + b`: the bias copied to every row, then one GEMM adding to it.
template <typename T>
void project_blas(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& gx) {
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  T* c = gx.data_ptr<T>();
  const at::Tensor bias = b ? b->contiguous() : at::Tensor();
  if (bias.defined()) {
    std::copy_n(bias.data_ptr<T>(), N, c);
    // on every thread: a long gx's copies, serial, left the others waiting for up to a fifth of a small-I call
    at::parallel_for(1, M, std::max<int64_t>(1, (int64_t{1} << 15) / N), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::copy_n(c, N, c + m * N);
    });
  }
  const IsaKernels kern = isa_kernels();
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
  // one row of large weights: two halves of its outputs, each a thread's, whose rows of w then stay in that core's
  // L2 from call to call (an output is one row's dot product, so the halves give the whole's bits)
  const int64_t parts = M == 1 && N * K * int64_t(sizeof(T)) >= kSplitRowBytes ? 2 : 1;
  at::parallel_for(0, N, (N + parts - 1) / parts, [&](int64_t j0, int64_t j1) {
    step_gemm<T>(kern, true, M, j1 - j0, K, xp, K, wp + j0 * K, K, T(bias.defined()), c + j0, N);
  });
}
#endif

// Whether `project` forms `x w^T + b` by `SmallProjection`'s rows: float32 or float64 alike, `x [..., K]` contiguous
// with several rows and `K` up to `kSmallProjectionK`.
bool small_projection(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  const auto dt = x.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !x.is_cpu() || x.dim() < 2 || !x.is_contiguous()) return false;
  const int64_t K = x.size(-1);
  return K > 0 && K <= kSmallProjectionK && x.numel() > K && w.scalar_type() == dt && w.is_cpu() && w.dim() == 2 &&
         w.size(1) == K && (!b || (b->scalar_type() == dt && b->dim() == 1 && b->size(0) == w.size(0)));
}

// `SmallProjection`'s operands for `x`, `w`, `b` (see `small_projection`), `wt` and `bc` keeping `w^T` and `b`.
template <typename T>
SmallProjection<T> small_projection_of(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                       at::Tensor& wt, at::Tensor& bc) {
  wt = w.t().contiguous();
  if (b) bc = b->contiguous();
  return {x.data_ptr<T>(), wt.data_ptr<T>(), b ? bc.data_ptr<T>() : nullptr, x.size(-1), w.size(0)};
}

// `F.linear(x, w, b)` (`b` may be None) with the ops `seqfast.linear.project` runs for it. The
// products it gets (`project` leaves large float32 ones to oneDNN) go straight to the BLAS call at::addmm would make,
// bitwise the same result without at::linear's dispatch; one row (a step of B = 1) to the matrix-vector kernel, which
// `seqfast.linear.project` then calls here too.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  if (small_projection(x, w, b)) {
    const at::Tensor gx = output(sizes, x.options(), false);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast_project_small", [&] {
      at::Tensor wt, bc;
      small_projection_of<scalar_t>(x, w, b, wt, bc).rows(x.numel() / x.size(-1), gx.data_ptr<scalar_t>());
    });
    return gx;
  }
#if SEQFAST_BLAS
  if (direct_projection(x, w, b)) {
    const at::Tensor gx = output(sizes, x.options(), false);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast_project", [&] { project_blas<scalar_t>(x, w, b, gx); });
    return gx;
  }
#endif
  if (x.is_contiguous()) return at::linear(x, w, b);
  return at::linear(x.reshape({-1, x.size(-1)}), w, b).reshape(sizes);
}

// The forward loop in the compute dtype of `gx`'s (`compute_type`); every input is converted to it. Returns
// `y [T, B, P]` in gx's dtype, `hT [B, P]` in h0's, `cT [B, H]` in c0's (LSTM), `saved [T, B, W*H]` in the compute
// dtype (`[0]` unless `need_saved`); `hT_out`, `cT_out`, when defined, are contiguous tensors of the compute dtype
// that the final states are written into; `y_copy`, when defined, a contiguous `[T, B, P]` tensor of gx's dtype, the
// compute dtype, that the loop writes y's values into too.
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

// `ln` checked and in dtype `dt`: layer_norm's gains, `hh [G*H]` and for LSTM `c_weight`, `c_bias [H]`, all or none.
LayerNormArgs layer_norm_in(const LayerNormArgs& ln, at::ScalarType dt, int64_t GH, int64_t H, bool lstm, bool proj) {
  if (!ln.on()) {
    TORCH_CHECK(!ln.c_weight && !ln.c_bias, "layer_norm's gains of c come with ln_hh");
    return {};
  }
  TORCH_CHECK_VALUE(!proj, "layer_norm does not run with a projection (w_hr)");
  TORCH_CHECK(ln.c_weight.has_value() == lstm && ln.c_bias.has_value() == lstm,
              "layer_norm's ln_c_weight and ln_c_bias are given exactly for lstm");
  LayerNormArgs out{as(ln.hh, dt), as(ln.c_weight, dt), as(ln.c_bias, dt)};
  check(*out.hh, "ln_hh", dt, {GH});
  if (lstm) {
    check(*out.c_weight, "ln_c_weight", dt, {H});
    check(*out.c_bias, "ln_c_bias", dt, {H});
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor> fwd_into(
    int64_t cell, const c10::optional<at::Tensor>& gx_given, const c10::optional<at::Tensor>& x,
    const c10::optional<at::Tensor>& w_ih, const c10::optional<at::Tensor>& b_x, const at::Tensor& w_hh_in,
    const c10::optional<at::Tensor>& b_hh_in, const at::Tensor& h0_in, const c10::optional<at::Tensor>& c0_in,
    const c10::optional<at::Tensor>& lengths_in,
    const c10::optional<at::Tensor>& w_hr_in, bool reverse, bool need_saved, int64_t chunk, int64_t plan, bool poison,
    const at::Tensor& hT_out, const at::Tensor& cT_out, const c10::optional<at::Tensor>& zero = c10::nullopt,
    const ZoneoutArgs& zo_in = {}, const LayerNormArgs& ln_in = {}, const at::Tensor& y_copy = at::Tensor()) {
  const BelowAutograd below;
  check_cell(cell);
  TORCH_CHECK(gx_given.has_value() != (x.has_value() && w_ih.has_value()), "give gx, or x and w_ih to form it");
  // a small-K projection the loop forms itself (`SmallProjection`), else `gx` whole first
  const bool small = !gx_given && x->dim() == 3 && small_projection(*x, *w_ih, b_x);
  const at::Tensor gx_in = gx_given ? *gx_given : small ? at::Tensor() : project(*x, *w_ih, b_x);
  TORCH_CHECK(small || gx_in.dim() == 3, "gx must be [T, B, G*H]");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const at::Tensor& steps_in = small ? *x : gx_in;  // [T, B, *]: the loop's steps and rows
  const auto io = steps_in.scalar_type(), dt = compute_type(io);
  TORCH_CHECK(io == at::kFloat || io == at::kDouble || io == at::kHalf || io == at::kBFloat16,
              "gx must be float32, float64, float16 or bfloat16, got ", io);
  const int64_t T = steps_in.size(0), B = steps_in.size(1), GH = small ? w_ih->size(0) : gx_in.size(2);
  const int64_t G = gates(cell), H = GH / G;
  TORCH_CHECK(H > 0 && GH == G * H, "gx's last dimension must be a positive multiple of ", G);
  TORCH_CHECK(T < INT_MAX && B < INT_MAX && GH < INT_MAX, "sizes must fit BLAS's 32-bit integers");
  const bool lstm = cell == LSTM, proj = w_hr_in.has_value();
  TORCH_CHECK(!proj || lstm, "w_hr (projection) needs the lstm cell");
  TORCH_CHECK(c0_in.has_value() == lstm, "c0 is given exactly for lstm");
  const int64_t P = proj ? w_hr_in->size(0) : H;
  const at::Tensor gx = small ? at::Tensor() : as(gx_in, dt), w_hh = as(w_hh_in, dt), h0 = as(h0_in, dt);
  const auto b_hh = as(b_hh_in, dt), c0 = as(c0_in, dt), w_hr = as(w_hr_in, dt);
  const auto lengths = as(lengths_in, at::kLong);
  check(w_hh, "w_hh", dt, {GH, P});
  if (b_hh) check(*b_hh, "b_hh", dt, {GH});
  check(h0, "h0", dt, {B, P});
  if (proj) check(*w_hr, "w_hr", dt, {P, H});
  if (lstm) check(*c0, "c0", dt, {B, H});
  if (lengths) check(*lengths, "lengths", at::kLong, {B});
  const ZoneoutArgs zo = zoneout_in(zo_in, dt, T, B, P, H, lstm);
  const LayerNormArgs ln = layer_norm_in(ln_in, dt, GH, H, lstm, proj);
  const auto opts = steps_in.options().dtype(dt);
  const at::Tensor y = output({T, B, P}, opts, poison);
  const at::Tensor hT = hT_out.defined() ? hT_out : output({B, P}, opts, poison);
  const at::Tensor cT = !lstm ? at::Tensor() : cT_out.defined() ? cT_out : output({B, H}, opts, poison);
  const at::Tensor saved =
      need_saved ? output({T, B, saved_cols(cell, H, zo.on(), ln.on())}, opts, poison) : at::empty({0}, opts);
  if (y_copy.defined()) {
    TORCH_CHECK(io == dt, "y_copy needs gx of the compute dtype");
    check(y_copy, "y_copy", dt, {T, B, P});
  }
  const Order ord = make_order(lengths, T, B, reverse, zero);
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast_fwd", [&] {
    at::Tensor wt, bc;
    const SmallProjection<scalar_t> sp = small ? small_projection_of<scalar_t>(*x, *w_ih, b_x, wt, bc)
                                               : SmallProjection<scalar_t>{};
    fwd_loop<scalar_t>(static_cast<int>(cell), gx, sp, w_hh, b_hh, h0, lstm ? *c0 : cT, ord, w_hr, zo, ln, chunk,
                       Plan::of(plan), y, hT, cT, saved, y_copy);
  });
  return {in_dtype(y, io), in_dtype(hT, h0_in.scalar_type()),
          lstm ? c10::make_optional(in_dtype(cT, c0_in->scalar_type())) : c10::nullopt, saved};
}

// `fwd_into` allocating every output.
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor> fwd(
    int64_t cell, const c10::optional<at::Tensor>& gx, const c10::optional<at::Tensor>& x,
    const c10::optional<at::Tensor>& w_ih, const c10::optional<at::Tensor>& b_x, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& w_hr, bool reverse, bool need_saved, int64_t chunk, int64_t plan, bool poison,
    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& keep_h,
    const c10::optional<at::Tensor>& keep_c, double keep, const c10::optional<at::Tensor>& ln_hh,
    const c10::optional<at::Tensor>& ln_c_weight, const c10::optional<at::Tensor>& ln_c_bias) {
  return fwd_into(cell, gx, x, w_ih, b_x, w_hh, b_hh, h0, c0, lengths, w_hr, reverse, need_saved, chunk, plan,
                  poison, at::Tensor(), at::Tensor(), zero, {keep_h, keep_c, keep}, {ln_hh, ln_c_weight, ln_c_bias});
}

// `a + b` for two biases, element by element where they share a dtype and layout (at::add's dispatch took about 2 us,
// an eighth of a small cell's step).
at::Tensor bias_sum(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes() || !a.is_cpu() || !b.is_cpu() ||
      !a.is_contiguous() || !b.is_contiguous())
    return at::add(a, b);
  at::Tensor out = at::empty(a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "seqfast_bias_sum", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < a.numel(); ++i) po[i] = pa[i] + pb[i];
  });
  return out;
}

// `(b_x, b_h)`: the bias the input projection adds and the one the recurrence adds, split as
// `seqfast.autograd.folded_biases` splits them (the recurrence adds both, except GRU's `b_ih`).
std::pair<c10::optional<at::Tensor>, c10::optional<at::Tensor>> folded_biases(int64_t cell,
                                                                              const c10::optional<at::Tensor>& b_ih,
                                                                              const c10::optional<at::Tensor>& b_hh) {
  if (cell == GRU) return {b_ih, b_hh};
  if (b_ih && b_hh) return {c10::nullopt, bias_sum(*b_ih, *b_hh)};
  return {c10::nullopt, b_ih ? b_ih : b_hh};
}

// A stack's forward without grad, each layer-direction a `fwd` from its input (biases split by `folded_biases`), the
// directions' outputs side by side as the next layer's input.
// `weights`: `w_ih, w_hh, b_ih, b_hh, w_hr` of each layer-direction in turn. Returns `y [T, B, D*P]`, `hn [L*D, B, P]`,
// `cn [L*D, B, H]` (LSTM).
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> stack(
    int64_t cell, const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const std::vector<c10::optional<at::Tensor>>& weights, bool bidirectional, const c10::optional<at::Tensor>& lengths,
    int64_t chunk, int64_t plan, bool poison) {
  const BelowAutograd below;
  const int64_t D = bidirectional ? 2 : 1, layers = static_cast<int64_t>(weights.size()) / (5 * D);
  TORCH_CHECK(layers > 0 && layers * 5 * D == static_cast<int64_t>(weights.size()),
              "weights must hold 5 tensors (or None) per layer-direction");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == layers * D, "h0 must be [L*D, B, P]");
  const bool lstm = cell == LSTM;
  TORCH_CHECK(c0.has_value() == lstm && (!c0 || c0->dim() == 3), "c0 [L*D, B, H] is given exactly for lstm");
  // each layer-direction writes its final state straight into its slice of `hn`, `cn`, in the loops' dtype (the
  // compute dtype of `x`'s); states given in another dtype get theirs back at the end, as `fwd` returns them
  const auto opts = x.options().dtype(compute_type(x.scalar_type()));
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
      const auto [b_x, b_h] = folded_biases(cell, w[2], w[3]);
      auto [y, hT, cT, saved] =
          fwd_into(cell, c10::nullopt, input, w[0], b_x, *w[1], b_h, h0.select(0, k), c0k, lengths, w[4], d == 1,
                   false, chunk, plan, poison, hn.select(0, k), lstm ? cn.select(0, k) : at::Tensor());
      outputs.push_back(y);
    }
    // the directions side by side in a recycled block: a large fresh one faulted its pages in on every call (two-layer
    // bidirectional GRU(128) B32 T40 without grad: the concatenation 333 -> 183 us of a 4.8 ms call, by the profiler)
    if (D == 1) {
      input = outputs[0];
    } else {
      const at::Tensor& y0 = outputs[0];
      at::Tensor both = output({y0.size(0), y0.size(1), D * y0.size(2)}, y0.options(), poison);
      input = at::cat_out(both, outputs, 2);
    }
  }
  const auto cn_out = lstm ? c10::make_optional(in_dtype(cn, c0->scalar_type())) : c10::nullopt;
  return {input, in_dtype(hn, h0.scalar_type()), cn_out};
}

// One step of a cell without grad: `stack`'s layer over `x [B, I]` from `h0 [B, H]` (and `c0`). Returns
// `(h [B, H], c [B, H] or None)`.
std::tuple<at::Tensor, c10::optional<at::Tensor>> step(
    int64_t cell, const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, int64_t chunk, int64_t plan, bool poison) {
  const BelowAutograd below;
  const auto [b_x, b_h] = folded_biases(cell, b_ih, b_hh);
  auto [y, hT, cT, saved] = fwd(cell, c10::nullopt, x.unsqueeze(0), w_ih, b_x, w_hh, b_h, h0, c0,
                                c10::nullopt, c10::nullopt, false, false, chunk, plan, poison, c10::nullopt,
                                c10::nullopt, c10::nullopt, 0.0, c10::nullopt, c10::nullopt, c10::nullopt);
  return {hT, cT};
}

// Each step's offset into a PackedSequence's `data` from its `batch_sizes [T]` (int64, CPU, positive, non-increasing),
// and the total last.
std::vector<int64_t> packed_offsets(const at::Tensor& batch_sizes) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.is_cpu(),
              "batch_sizes must be a 1-D int64 CPU tensor");
  const at::Tensor bs = batch_sizes.contiguous();
  const int64_t T = bs.size(0), *b = bs.data_ptr<int64_t>();
  std::vector<int64_t> off(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(b[t] > 0 && (t == 0 || b[t] <= b[t - 1]), "batch_sizes must be positive and non-increasing");
    off[t + 1] = off[t] + b[t];
  }
  return off;
}

// Copies, per step `t`, `rows(t)` rows of `row_bytes` from `src + from(t)` to `dst + to(t)` over torch's threads,
// and zeroes the `zeros(t)` rows after them in `dst`.
template <class Rows, class From, class To, class Zeros>
void copy_steps(int64_t T, int64_t row_bytes, const char* src, char* dst, const Rows& rows, const From& from,
                const To& to, const Zeros& zeros) {
  if (T == 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, rows(0) * row_bytes));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(dst + to(t) * row_bytes, src + from(t) * row_bytes, rows(t) * row_bytes);
      std::memset(dst + (to(t) + rows(t)) * row_bytes, 0, zeros(t) * row_bytes);
    }
  });
}

// A PackedSequence's `data [N, *]` and `batch_sizes [T]` as its padded batch: `x [T, B, *]` (zeros past each length;
// a large one on a recycled block, NaN-filled first when `poison`) and `lengths [B]` (int64), one copy of each step's
// rows. The values of `pad_packed_sequence`'s; not differentiated here (`seqfast.nn._PadPacked` is its autograd
// function).
std::tuple<at::Tensor, at::Tensor> pad_packed(const at::Tensor& data, const at::Tensor& batch_sizes, bool poison) {
  const BelowAutograd below;
  TORCH_CHECK(data.is_cpu() && data.dim() >= 1, "data must be a CPU tensor of at least one dimension");
  const std::vector<int64_t> off = packed_offsets(batch_sizes);
  const int64_t T = batch_sizes.size(0), B = T ? off[1] : 0;
  TORCH_CHECK(off[T] == data.size(0), "batch_sizes sum to ", off[T], " but data has ", data.size(0), " rows");
  const at::Tensor d = data.contiguous();
  std::vector<int64_t> sizes{T, B};
  for (int64_t k = 1; k < d.dim(); ++k) sizes.push_back(d.size(k));
  const at::Tensor x = output(sizes, d.options(), poison && d.is_floating_point());
  const int64_t row_bytes = (d.size(0) ? d.numel() / d.size(0) : 0) * int64_t(d.element_size());
  auto rows = [&](int64_t t) { return off[t + 1] - off[t]; };
  copy_steps(T, row_bytes, static_cast<const char*>(d.const_data_ptr()), static_cast<char*>(x.data_ptr()), rows,
             [&](int64_t t) { return off[t]; }, [&](int64_t t) { return t * B; },
             [&](int64_t t) { return B - rows(t); });
  const at::Tensor lengths = at::zeros({B}, batch_sizes.options());
  int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < rows(t); ++b) len[b] = t + 1;
  return {x, lengths};
}

// `pad_packed`'s inverse: the rows of `y [T, B, *]` that `batch_sizes [T]` runs, in PackedSequence order, `[N, *]`
// (`seqfast.nn._UnpadPacked` is its autograd function).
at::Tensor unpad_packed(const at::Tensor& y, const at::Tensor& batch_sizes, bool poison) {
  const BelowAutograd below;
  TORCH_CHECK(y.is_cpu() && y.dim() >= 2 && y.size(0) == batch_sizes.size(0), "y must be a CPU tensor [T, B, *]");
  const at::Tensor yc = y.contiguous();
  const int64_t T = yc.size(0), B = yc.size(1);
  const std::vector<int64_t> off = packed_offsets(batch_sizes);
  TORCH_CHECK(T == 0 || off[1] <= B, "batch_sizes must not exceed y's batch of ", B);
  std::vector<int64_t> sizes{off[T]};
  for (int64_t k = 2; k < yc.dim(); ++k) sizes.push_back(yc.size(k));
  const at::Tensor data = output(sizes, yc.options(), poison && yc.is_floating_point());
  const int64_t row_bytes = (T * B ? yc.numel() / (T * B) : 0) * int64_t(yc.element_size());
  copy_steps(T, row_bytes, static_cast<const char*>(yc.const_data_ptr()), static_cast<char*>(data.data_ptr()),
             [&](int64_t t) { return off[t + 1] - off[t]; }, [&](int64_t t) { return t * B; },
             [&](int64_t t) { return off[t]; }, [](int64_t) { return int64_t(0); });
  return data;
}

// The backward loop on `saved`'s dtype. Returns `dgx [T, B, G*H]` and `dgh` (GRU, or layer_norm: the gradient of
// the product before its LayerNorm; the other cells' is dgx) in dy's dtype, `dh0 [B, P]` in h0's (undefined unless
// `need_dh0`: the first step then skips its product with w_hh), `dc0 [B, H]` in c0's (LSTM), `dw_hr [P, H]` in
// w_hr's (projection), and with layer_norm the sums over steps and rows of the gradients of `b_hh`, `ln_hh [G*H]`
// (LSTM also `ln_c_weight`, `ln_c_bias [H]`) in `saved`'s dtype (empty without).
std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
           std::vector<at::Tensor>>
bwd(int64_t cell, const at::Tensor& dy_in, const at::Tensor& dhT_in, const c10::optional<at::Tensor>& dcT_in,
    const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& w_hr_in, const at::Tensor& h0_in,
    const c10::optional<at::Tensor>& c0_in, const c10::optional<at::Tensor>& lengths_in, const at::Tensor& y_in,
    const at::Tensor& saved, bool reverse, int64_t chunk, int64_t plan, bool poison, bool need_dh0,
    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& keep_h,
    const c10::optional<at::Tensor>& keep_c, double keep, const c10::optional<at::Tensor>& ln_hh,
    const c10::optional<at::Tensor>& ln_c_weight, const c10::optional<at::Tensor>& ln_c_bias) {
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
  const LayerNormArgs ln = layer_norm_in({ln_hh, ln_c_weight, ln_c_bias}, dt, GH, H, lstm, proj);
  check(saved, "saved", dt, {T, B, saved_cols(cell, H, zo.on(), ln.on())});
  if (lstm) {
    check(*dcT, "dcT", dt, {B, H});
    check(*c0, "c0", dt, {B, H});
  }
  if (proj) check(*w_hr, "w_hr", dt, {P, H});
  if (lengths) check(*lengths, "lengths", at::kLong, {B});
  const auto opts = dy.options();
  const at::Tensor dgx = output({T, B, GH}, opts, poison), dh0 = need_dh0 ? output({B, P}, opts, poison) : at::Tensor();
  const at::Tensor dgh = cell == GRU || ln.on() ? output({T, B, GH}, opts, poison) : at::Tensor();
  std::vector<at::Tensor> ln_grads;  // b_hh's, ln_hh's [G*H], LSTM's ln_c_weight's, ln_c_bias's [H]
  if (ln.on()) ln_grads = {output({GH}, opts, poison), output({GH}, opts, poison)};
  if (ln.on() && lstm) ln_grads.insert(ln_grads.end(), {output({H}, opts, poison), output({H}, opts, poison)});
  const at::Tensor dc0 = lstm ? output({B, H}, opts, poison) : at::Tensor();
  const at::Tensor dw_hr = proj ? output({P, H}, opts, poison) : at::Tensor();
  const Order ord = make_order(lengths, T, B, reverse, zero);
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast_bwd", [&] {
    bwd_loop<scalar_t>(static_cast<int>(cell), dy, dhT, lstm ? *dcT : dc0, w_hh, w_hr, h0, lstm ? *c0 : dc0, ord,
                       zo, ln, y, saved, chunk, Plan::of(plan), dgx, dgh, dh0, dc0, dw_hr, ln_grads);
  });
  auto maybe = [](const at::Tensor& t, const c10::optional<at::Tensor>& like) {
    return t.defined() ? c10::make_optional(in_dtype(t, like->scalar_type())) : c10::nullopt;
  };
  const auto io = c10::make_optional(dy_in);
  return {in_dtype(dgx, dy_in.scalar_type()), maybe(dgh, io), dh0.defined() ? in_dtype(dh0, h0_in.scalar_type()) : dh0,
          maybe(dc0, c0_in), maybe(dw_hr, w_hr_in), ln_grads};
}

// Whether a weight gradient reduced over `rows` rows with `cols` columns is formed transposed:
// `seqfast.linear.transposed_weight_grad`.
bool transposed_weight_grad(int64_t rows, int64_t cols) {
  constexpr int64_t kMaxCols = 64, kRowsPerCol = 16;
  return cols <= kMaxCols && rows >= kRowsPerCol * std::max<int64_t>(cols, 16);
}

// `sum dy^T x` over `pairs` of `(dy, x)` as `seqfast.linear.weight_grad` forms it, bitwise.
at::Tensor weight_grad(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs) {
  int64_t rows = 0;
  for (const auto& pair : pairs) rows += pair.first.size(0);
  const bool transposed = transposed_weight_grad(rows, pairs.front().second.size(1));
  at::Tensor out;
  for (const auto& [dy, x] : pairs) {
    const at::Tensor a = transposed ? x.t() : dy.t(), b = transposed ? dy : x;
    out = out.defined() ? out.addmm_(a, b) : at::mm(a, b);
  }
  return transposed ? out.t().contiguous() : out;
}

}  // namespace

// One layer-direction of an eager call with grad, input projection included, as an autograd node: what
// `seqfast.autograd.Layer` computes, the same ops in the same order (so bitwise its results), without Python in the
// forward or the backward. For calls whose products are all below oneDNN's threshold (`seqfast.linear.plain`), where
// every product of `project` and `project_backward` is one torch GEMM, with resets or `lengths` (not both). Outside
// the anonymous namespace, so that torch names its node `CppNode<seqfast::EagerLayer>`.
class EagerLayer : public torch::autograd::Function<EagerLayer> {
 public:
  // An absent tensor (None) is no input of the node, so the node's inputs are the present ones, in order.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, int64_t cell, bool reverse,
                                                const at::Tensor& x, const at::Tensor& w_ih,
                                                const c10::optional<at::Tensor>& b_ih, const at::Tensor& w_hh,
                                                const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                const c10::optional<at::Tensor>& c0,
                                                const c10::optional<at::Tensor>& w_hr,
                                                const c10::optional<at::Tensor>& zero,
                                                const c10::optional<at::Tensor>& lengths, int64_t chunk,
                                                int64_t fwd_plan, int64_t bwd_plan, bool poison, bool copy_y) {
    const bool lstm = cell == LSTM;
    const auto [b_x, b_h] = folded_biases(cell, b_ih, b_hh);
    // the backward reads `y`: with `copy_y` the caller gets a copy, which it may change in place; the loop writes it
    // alongside y where no dtype conversion follows
    const at::Tensor xs = steps(x);
    const int64_t P = w_hr ? w_hr->size(0) : w_hh.size(1);
    const bool in_loop = copy_y && compute_type(x.scalar_type()) == x.scalar_type();
    const at::Tensor y_copy = in_loop ? output({xs.size(0), xs.size(1), P}, x.options(), poison) : at::Tensor();
    auto [y, hT, cT, saved] = fwd_into(cell, c10::nullopt, xs, w_ih, b_x, w_hh, b_h, h0, c0, lengths, w_hr, reverse,
                                       true, chunk, fwd_plan, poison, at::Tensor(), at::Tensor(), zero, {}, {}, y_copy);
    ctx->save_for_backward(
        {x, w_ih, w_hh, defined(b_ih), defined(b_hh), h0, defined(c0), defined(w_hr), y, saved, defined(zero),
         defined(lengths)});
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["plan"] = bwd_plan;
    ctx->saved_data["poison"] = poison;
    ctx->set_materialize_grads(false);
    const at::Tensor y_out = in_loop ? y_copy : copy_y ? output(y.sizes(), y.options(), false).copy_(y) : y;
    if (lstm) return {y_out, hT, *cT};
    return {y_out, hT};
  }

  // Gradients of (cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, zero, lengths, chunk, fwd_plan, bwd_plan,
  // poison, copy_y).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved_tensors = ctx->get_saved_variables();
    const at::Tensor &x = saved_tensors[0], &w_ih = saved_tensors[1], &w_hh = saved_tensors[2];
    const at::Tensor &b_ih = saved_tensors[3], &b_hh = saved_tensors[4], &h0 = saved_tensors[5];
    const at::Tensor &c0 = saved_tensors[6], &w_hr = saved_tensors[7], &y = saved_tensors[8];
    const at::Tensor &saved = saved_tensors[9], &zero = saved_tensors[10], &lengths = saved_tensors[11];
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
      const auto wanted = layer_grads().call(cell, reverse, steps(x), w_ih, maybe(b_ih), w_hh, maybe(b_hh), h0,
                                             maybe(c0), maybe(w_hr), maybe(zero), maybe(lengths), maybe(grads[0]),
                                             maybe(grads[1]), lstm ? maybe(grads[2]) : c10::nullopt, need);
      torch::autograd::variable_list out(17);
      for (size_t k = 0, next = 0; k < need.size(); ++k)
        if (need[k]) out[2 + k] = wanted.at(next++);
      if (need_x) out[2] = out[2].view(x.sizes());
      return out;
    }
    const BelowAutograd below;
    const at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(y);
    const at::Tensor dhT = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const at::Tensor dcT = !lstm ? at::Tensor() : grads[2].defined() ? grads[2] : at::zeros_like(c0);
    auto [dgx, dgh, dh0, dc0, dw_hr, ln_grads] =
        bwd(cell, dy, dhT, maybe(dcT), w_hh, maybe(w_hr), h0, maybe(c0), maybe(lengths), y, saved, reverse,
            ctx->saved_data["chunk"].toInt(), ctx->saved_data["plan"].toInt(), ctx->saved_data["poison"].toBool(),
            need_h0, maybe(zero), c10::nullopt, c10::nullopt, 0.0, c10::nullopt, c10::nullopt, c10::nullopt);
    const int64_t T = y.size(0);
    const at::Tensor dgh3 = cell == GRU ? *dgh : dgx, dgh2 = dgh3.flatten(0, -2);
    const bool separate_b_hh = cell == GRU && has_b_hh;  // b_hh stays in the recurrence (see folded_biases)
    const at::Tensor db_h = separate_b_hh ? dgh2.sum(0).to(w_hh.scalar_type()) : at::Tensor();
    const bool need_db_x = need_b_ih || (need_b_hh && !separate_b_hh);
    const at::Tensor dgx2 = dgx.flatten(0, -2), x2 = x.flatten(0, -2);
    // at::linear's own product for 2-D operands without a bias (`seqfast.linear.dense`), without its dispatch
    const at::Tensor dx = need_x ? at::mm(dgx2, w_ih).reshape(x.sizes()) : at::Tensor();
    const at::Tensor dw_ih = need_w_ih ? weight_grad({{dgx2, x2}}).to(w_ih.scalar_type()) : at::Tensor();
    const at::Tensor db_x = need_db_x ? dgx2.sum(0).to(w_ih.scalar_type()) : at::Tensor();
    const at::Tensor db_hh = separate_b_hh ? db_h : db_x;
    // a step that starts from zero (resets) adds nothing to dw_hh: its rows of dgh, read by nothing else from here
    // on, are zeroed instead of its states (which `seqfast.autograd.hidden_grads` forms, a copy of y)
    if (zero.defined()) dgh2.index_fill_(0, zero.flatten().nonzero().squeeze(1), 0);
    // dw_hh as `seqfast.autograd.hidden_grads` forms it: the step from h0 (reversed, each sequence's own last), then
    // y shifted by a step (zero past a sequence's length, where dgh is zero too)
    const at::Tensor first =
        !reverse           ? dgh3.select(0, 0)
        : !lengths.defined() ? dgh3.select(0, T - 1)
                             : dgh3.index({(lengths - 1).clamp_min(0), at::arange(dgh3.size(1), lengths.options())});
    std::vector<std::pair<at::Tensor, at::Tensor>> pairs{{first, h0.to(y.scalar_type())}};
    if (T > 1)
      pairs.emplace_back(dgh3.slice(0, reverse ? 0 : 1, reverse ? T - 1 : T).flatten(0, -2),
                         y.slice(0, reverse ? 1 : 0, reverse ? T : T - 1).flatten(0, -2));
    const at::Tensor dw_hh = weight_grad(pairs).to(w_hh.scalar_type());
    return {at::Tensor(), at::Tensor(), dx, dw_ih, need_b_ih ? db_x : at::Tensor(), dw_hh,
            need_b_hh ? db_hh : at::Tensor(), dh0, lstm ? *dc0 : at::Tensor(),
            w_hr.defined() ? *dw_hr : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  // `seqfast::layer_grads`, which seqfast.autograd registers (`differentiable_grads` on the reference's torch ops).
  using LayerGrads = std::vector<at::Tensor>(
      int64_t, bool, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const c10::optional<at::Tensor>&, const at::Tensor&, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
      c10::ArrayRef<bool>);
  static const c10::TypedOperatorHandle<LayerGrads>& layer_grads() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("seqfast::layer_grads", "").typed<LayerGrads>();
    return op;
  }
  static c10::optional<at::Tensor> maybe(const at::Tensor& t) {
    return t.defined() ? c10::make_optional(t) : c10::nullopt;
  }
  static at::Tensor defined(const c10::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
  // `x [T, B, I]`, or a cell's step `[B, I]` as `T = 1` (a view made here costs less than one made in Python).
  static at::Tensor steps(const at::Tensor& x) { return x.dim() == 2 ? x.unsqueeze(0) : x; }
};

// `EagerLayer` from Python: `(y, hT, cT or None)`.
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> layer(
    int64_t cell, bool reverse, const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& zero,
    const c10::optional<at::Tensor>& lengths, int64_t chunk, int64_t fwd_plan, int64_t bwd_plan, bool poison,
    bool copy_y) {
  TORCH_CHECK(!zero || !lengths, "the eager node takes resets or lengths, not both");
  const auto out = EagerLayer::apply(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, zero, lengths, chunk,
                                     fwd_plan, bwd_plan, poison, copy_y);
  return {out[0], out[1], out.size() > 2 ? c10::make_optional(out[2]) : c10::nullopt};
}

namespace {

// The facts of an eager call's tensors (a cell's step or a module's call) that the checks of its arguments and the
// choice of the function running it read (see `seqfast.functional.call_key`), packed exactly: grad mode, the thread
// count, and per tensor (or None) its dtype, layout, device, whether it requires grad, and its sizes. None (Python's)
// when the call cannot take the eager path (`seqfast.functional.eager`, but for compiling, which the caller tests
// first): while tracing, under a dispatch or torch function mode, a functorch transform or autocast on any device,
// for a tensor that is neither a plain tensor nor a parameter, or a meta input.
PyObject* g_parameter_type = nullptr;

pybind11::object call_signature(const pybind11::args& tensors) {
  using c10::impl::tls_is_dispatch_key_included;
  if (at::tracer::impl::is_dispatch_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      at::impl::torch_function_mode_enabled() ||
      tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return pybind11::none();
  for (const auto device : {at::kCPU, at::kCUDA, at::kXPU, at::kIPU, at::kXLA, at::kHPU, at::kMPS, at::kPrivateUse1})
    if (at::autocast::is_autocast_enabled(device)) return pybind11::none();
  std::string facts;
  facts.reserve(16 * (tensors.size() + 2));
  const auto put = [&facts](int64_t v) { facts.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(at::GradMode::is_enabled());
  put(at::get_num_threads());
  bool first = true;
  for (const auto& handle : tensors) {
    PyObject* obj = handle.ptr();
    if (obj == Py_None) {
      put(-1);
    } else {
      if (!THPVariable_CheckExact(obj) && Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(g_parameter_type))
        return pybind11::none();
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (first && t.is_meta()) return pybind11::none();
      const at::Device device = t.device();
      put(static_cast<int64_t>(t.scalar_type()) | static_cast<int64_t>(t.layout()) << 8 |
          static_cast<int64_t>(device.type()) << 16 | static_cast<int64_t>(device.index() + 1) << 24 |
          static_cast<int64_t>(t.requires_grad()) << 32 | static_cast<int64_t>(t.dim()) << 40);
      for (const int64_t size : t.sizes()) put(size);
    }
    first = false;
  }
  return pybind11::bytes(facts);
}

std::string isa() { return kIsaNames[g_isa.load()]; }

// The bits of a `Plan` that change how a call of these sizes runs: 1 where its recurrent products may pack, 2 where its
// steps split into row blocks.
int64_t plan_bits(int64_t T, int64_t B, int64_t GH, int64_t P, bool float32, bool proj, bool backward) {
  const bool pack = float32 && !(backward && proj) && T >= kPackMinSteps && B > 1 && T * B >= kPackMinRows;
  const bool blocks = !proj && row_block(B, GH, P, float32 ? sizeof(float) : sizeof(double), false) < B;
  return int64_t(pack) | int64_t(blocks) << 1;
}

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

// Rows of a block of the input LayerNorm: fixed, so that its parameter gradients add the same partial sums in the
// same order whatever the thread count.
constexpr int64_t kLnBlockRows = 64;

void check_layer_norm(const at::Tensor& z, const at::Tensor& gamma, const char* name) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, name, ": float32 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(z.dim() >= 1 && gamma.dim() == 1 && gamma.size(0) == z.size(-1), name, ": z [..., N] and gamma [N]");
}

// The layer_norm option's input LayerNorm `LN(z) gamma + beta` over the last dimension (`beta` may be None), its
// output on a recycled block when large (NaN-filled first when `poison`).
at::Tensor layer_norm(const at::Tensor& z, const at::Tensor& gamma, const c10::optional<at::Tensor>& beta,
                      bool poison) {
  const BelowAutograd below;
  check_layer_norm(z, gamma, "layer_norm");
  const auto dt = z.scalar_type();
  const int64_t N = z.size(-1), n = N ? z.numel() / N : 0;
  const at::Tensor z_c = as(z, dt), gamma_c = as(gamma, dt);
  const at::Tensor beta_c = beta.has_value() ? as(*beta, dt) : at::Tensor();
  TORCH_CHECK(!beta_c.defined() || beta_c.sizes() == gamma_c.sizes(), "layer_norm: beta [N]");
  at::Tensor y = output(z.sizes(), z.options(), poison);
  AT_DISPATCH_FLOATING_TYPES(dt, "layer_norm", [&] {
    const IsaKernels kern = isa_kernels();
    const scalar_t *z_p = z_c.data_ptr<scalar_t>(), *gamma_p = gamma_c.data_ptr<scalar_t>();
    const scalar_t* beta_p = beta_c.defined() ? beta_c.data_ptr<scalar_t>() : nullptr;
    scalar_t* y_p = y.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kLnBlockRows - 1) / kLnBlockRows, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * kLnBlockRows, r1 = std::min(n, b1 * kLnBlockRows);
      run_ln_fwd(kern, r1 - r0, N, z_p + r0 * N, gamma_p, beta_p, y_p + r0 * N);
    });
  });
  return y;
}

// `layer_norm`'s backward from `dy`: `(dz, dgamma, dbeta)`, each an empty `[0]` where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& dy, const at::Tensor& z,
                                                                   const at::Tensor& gamma, bool need_dz,
                                                                   bool need_dgamma, bool need_dbeta, bool poison) {
  const BelowAutograd below;
  check_layer_norm(z, gamma, "layer_norm_backward");
  TORCH_CHECK(dy.sizes() == z.sizes(), "layer_norm_backward: dy of z's shape");
  const auto dt = z.scalar_type();
  const int64_t N = z.size(-1), n = N ? z.numel() / N : 0;
  const at::Tensor dy_c = as(dy, dt), z_c = as(z, dt), gamma_c = as(gamma, dt);
  const at::Tensor empty = at::empty({0}, z.options());
  at::Tensor dz = need_dz ? output(z.sizes(), z.options(), poison) : empty;
  at::Tensor dgamma = need_dgamma ? at::zeros({N}, z.options()) : empty;
  at::Tensor dbeta = need_dbeta ? at::zeros({N}, z.options()) : empty;
  const int64_t blocks = (n + kLnBlockRows - 1) / kLnBlockRows;
  const bool sums = need_dgamma || need_dbeta;
  // per block: its rows' sums of dgamma, then of dbeta
  at::Tensor partial = at::zeros({sums ? blocks : 0, 2, N}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "layer_norm_backward", [&] {
    const IsaKernels kern = isa_kernels();
    const scalar_t *dy_p = dy_c.data_ptr<scalar_t>(), *z_p = z_c.data_ptr<scalar_t>();
    const scalar_t* gamma_p = gamma_c.data_ptr<scalar_t>();
    scalar_t* dz_p = need_dz ? dz.data_ptr<scalar_t>() : nullptr;
    scalar_t* part = sums ? partial.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kLnBlockRows, off = r0 * N;
        run_ln_bwd(kern, std::min(kLnBlockRows, n - r0), N, dy_p + off, z_p + off, gamma_p,
                   dz_p ? dz_p + off : nullptr, need_dgamma ? part + 2 * b * N : nullptr,
                   need_dbeta ? part + (2 * b + 1) * N : nullptr);
      }
    });
    scalar_t* dgamma_p = need_dgamma ? dgamma.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbeta_p = need_dbeta ? dbeta.data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < (sums ? blocks : 0); ++b)
      for (int64_t j = 0; j < N; ++j) {
        if (dgamma_p) dgamma_p[j] += part[2 * b * N + j];
        if (dbeta_p) dbeta_p[j] += part[(2 * b + 1) * N + j];
      }
  });
  return {dz, dgamma, dbeta};
}

}  // namespace
}  // namespace seqfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqfast C++ CPU recurrences (see seqfast.kernels.cpp for the contract)";
  namespace py = pybind11;
  m.def("fwd", &seqfast::fwd, "Recurrence forward from gx, or from x, w_ih, b_x: (y, hT, cT or None, saved).",
        py::call_guard<py::gil_scoped_release>());
  m.def("bwd", &seqfast::bwd,
        "Recurrence backward: (dgx, dgh or None, dh0, dc0 or None, dw_hr or None, layer_norm's [db_hh, d_ln_hh, "
        "d_ln_c_weight, d_ln_c_bias] or []).",
        py::call_guard<py::gil_scoped_release>());
  m.def("stack", &seqfast::stack, "A stack's forward without grad: (y, hn, cn or None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("pad_packed", &seqfast::pad_packed,
        "pad_packed(data, batch_sizes, poison): a PackedSequence's padded batch, (x [T, B, *], lengths [B]); not "
        "differentiable.",
        py::call_guard<py::gil_scoped_release>());
  m.def("unpad_packed", &seqfast::unpad_packed,
        "unpad_packed(y, batch_sizes, poison): the rows of y [T, B, *] that batch_sizes runs, in PackedSequence "
        "order; not differentiable.",
        py::call_guard<py::gil_scoped_release>());
  m.def("step", &seqfast::step, "A cell's step without grad: (h, c or None).", py::call_guard<py::gil_scoped_release>());
  m.def("project", [](const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
    const seqfast::BelowAutograd below;
    return seqfast::project(x, w, b);
  }, "x @ w.T + b over every leading index, as the loops' input projections are formed.",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm", &seqfast::layer_norm,
        "layer_norm(z, gamma, beta, poison): the layer_norm option's input LayerNorm, LN(z) gamma + beta over the "
        "last dimension (beta may be None).",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm_backward", &seqfast::layer_norm_backward,
        "layer_norm_backward(dy, z, gamma, need_dz, need_dgamma, need_dbeta, poison): layer_norm's backward, (dz, "
        "dgamma, dbeta), each an empty [0] where not needed.",
        py::call_guard<py::gil_scoped_release>());
  m.attr("small_projection_k") = seqfast::kSmallProjectionK;
  m.def("empty", [](const std::vector<int64_t>& sizes, at::ScalarType dtype, bool poison) {
    return seqfast::output(sizes, at::TensorOptions().dtype(dtype), poison);
  }, "empty(sizes, dtype, poison): a CPU tensor, on a recycled block when large (NaN-filled when poison).",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer", &seqfast::layer, "One layer-direction with grad as an autograd node: (y, hT, cT or None).");
  m.def("cells", [] {
    std::vector<std::tuple<int, int, int, int>> table;
    for (int cell = seqfast::RNN_TANH; cell <= seqfast::GRU; ++cell)
      table.emplace_back(seqfast::gates(cell), seqfast::saved_width(cell, false), seqfast::saved_width(cell, true),
                         seqfast::ln_scalars(cell));
    return table;
  }, "(gates, width of `saved` per hidden unit, the same with zoneout, layer_norm's scalars per row) of each cell id.");
  seqfast::g_parameter_type = py::object(py::module::import("torch.nn").attr("Parameter")).release().ptr();
  m.def("call_signature", &seqfast::call_signature,
        "The facts of an eager call's tensors (the input first, any may be None) that its checks and backend choice "
        "read, as bytes, or None when the call cannot take the eager path (see seqfast.functional.call_key).");
  m.def("plan_bits", &seqfast::plan_bits,
        "plan_bits(T, B, G*H, P, float32, proj, backward): the bits of a plan (1: BLAS products instead of packed "
        "panels, 2: hidden units in chunks instead of rows in blocks) that change how a call of these sizes runs.");
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
