// The order a loop visits a call's rows and steps in: rows by length, longest first, so the rows still running at a
// step are a prefix; a reversed sequence from its own last step.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

namespace seqfast {

// A tensor argument of a loop: on the CPU, of `dtype` and `sizes`, contiguous.
inline void check(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Visiting order: sorted row `r` is batch entry `perm[r]`; `active[s]` rows (a prefix) run at step `s`.
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
inline Order make_order(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B, bool reverse,
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
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= T, "lengths must lie in [0, ", T, "]; got ", l[b]);
    if (!std::is_sorted(l, l + B, std::greater<int64_t>()))  // packed input arrives sorted: perm stays the identity
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

// `dst[r] = src[perm[r]]` (to sorted order) or `dst[perm[r]] = src[r]` (back), rows of `width`.
template <typename T>
void permute_rows(const T* src, T* dst, const Order& o, int64_t width, bool to_sorted) {
  for (size_t r = 0; r < o.perm.size(); ++r) {
    const int64_t b = o.perm[r];
    std::copy_n(src + (to_sorted ? b : r) * width, width, dst + (to_sorted ? r : b) * width);
  }
}

}  // namespace seqfast
