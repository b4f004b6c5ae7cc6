"""Facts every backend shares: cell names, gate counts, compute dtype, output allocation."""

import math
import os
from typing import NamedTuple

import torch

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
CELL_IDS = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
"""The number the compiled kernels (`csrc/isa_kernels.h`'s `Cell`, the Triton kernels' `CELL`) know each cell by."""

_poison = os.environ.get("SEQFAST_POISON", "0") == "1"


def set_poison(enabled):
    """Fill every output of `empty` with NaN (floats) before a kernel writes it.

    Args:
        enabled: `bool`; the default comes from `SEQFAST_POISON=1`.

    Returns:
        The previous setting.
    """
    global _poison
    previous, _poison = _poison, bool(enabled)
    return previous


def poisoning():
    """Whether kernel outputs are NaN-filled before the kernel writes them (see `set_poison`)."""
    return _poison


def empty(shape, dtype, device):
    """Allocate a kernel output; NaN-filled when poisoning is on, so an unwritten element fails loudly. One of at least
    `RECYCLE_FROM_BYTES` on the CPU comes from the blocks that `seqfast._C` recycles, where it is built: glibc hands
    blocks from 32 MB back to the system on free, so each call would fault their pages in afresh."""
    if torch.device(device).type == "cpu" and math.prod(shape) * dtype.itemsize >= RECYCLE_FROM_BYTES:
        if (C := extension()) is not None:
            return C.empty(list(shape), dtype, _poison)
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


# the size from which `empty` takes recycled blocks on the CPU (`seqfast._C`'s own threshold)
RECYCLE_FROM_BYTES = 1 << 20


def extension():
    """`seqfast._C`, imported on first use, or None when it is not built (a plain global, which Dynamo traces)."""
    global _C
    if _C is None:
        try:
            from seqfast import _C as built
        except ImportError:
            built = False
        _C = built
    return _C or None


_C = None  # seqfast._C once `extension` has looked for it; False when it is not built


def compute_dtype(dtype):
    """State and accumulation dtype for inputs of `dtype`: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Projection(NamedTuple):
    """Input pre-activations not yet formed: `gx = F.linear(x, w, b)` (`b` may be None).

    A backend that sets `FUSES_PROJECTION = True` may receive this instead of the `gx` tensor and forms it inside its
    forward call with those same torch ops (`F.linear` of `x`, or of `x` flattened to 2-D when `x` is not contiguous,
    exactly as `seqfast.linear.project` does), so the results are bitwise those of the unfused call.
    """

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None


class Extensions(NamedTuple):
    """The options beyond torch.nn's cells for one layer-direction call (None where off); see
    `seqfast.kernels.reference` for their math.

    zero: `[T, B]` bool, True where the step at that time starts from a zero state (h and, for LSTM, c): the
        caller's `resets`, shifted by one step for a reversed direction.
    keep_h: `[T, B, P]` weights of the previous `h` in zoneout's `h_t = m h_{t-1} + (1 - m) h~_t` (Bernoulli masks
        in training), or the probability `p` as a float (evaluation); keep_c: the same for LSTM's `c`, `[T, B, H]`.
    ln_ih: `[G*H]` gain of the input projection's LayerNorm, which the caller forms around its GEMM.
    ln_hh: `[G*H]` gain of the LayerNorm of `h @ w_hh.T`; ln_c_weight, ln_c_bias: `[H]` of LSTM's LayerNorm of `c`.
    """

    zero: torch.Tensor | None = None
    keep_h: torch.Tensor | float | None = None
    keep_c: torch.Tensor | float | None = None
    ln_ih: torch.Tensor | None = None
    ln_hh: torch.Tensor | None = None
    ln_c_weight: torch.Tensor | None = None
    ln_c_bias: torch.Tensor | None = None

    def fused(self):
        """`(zero, keep_h, keep_c, keep)`: resets and zoneout as tensors or None, and zoneout's constant weight as a
        float (0 when off or given per unit), the form the custom ops and the eager autograd Function carry."""
        if torch.is_tensor(self.keep_h) or self.keep_h is None:
            return self.zero, self.keep_h, self.keep_c, 0.0
        return self.zero, None, None, float(self.keep_h)

    def gains(self):
        """`(ln_hh, ln_c_weight, ln_c_bias)`: the `layer_norm` tensors a fused backend takes inside its loops (None
        where off), the form the custom ops carry them in after `fused`'s."""
        return self.ln_hh, self.ln_c_weight, self.ln_c_bias

    def steps(self, index):
        """These options at the steps `index` picks out of `[T, B]` (a slice of steps, or per-row step indices as in
        `seq[order, arange(B)]`)."""

        def take(t):
            return t[index] if torch.is_tensor(t) else t

        return self._replace(zero=take(self.zero), keep_h=take(self.keep_h), keep_c=take(self.keep_c))

    def options(self):
        """The options in use: a sorted tuple of `resets`, `zoneout`, `layer_norm`."""
        used = (("layer_norm", self.ln_hh), ("resets", self.zero), ("zoneout", self.keep_h))
        return tuple(name for name, value in used if value is not None)


def fused_arg(zero, keep_h, keep_c, keep, ln_hh=None, ln_c_weight=None, ln_c_bias=None):
    """The trailing `ext` argument of a backend call from the fused options as the custom ops carry them (see
    `Extensions.fused` and `Extensions.gains`): `()` without any, so that a backend without options is called as
    before."""
    if keep_h is None and keep:
        keep_h = keep_c = keep
    if zero is None and keep_h is None and ln_hh is None:
        return ()
    return (Extensions(zero, keep_h, keep_c, None, ln_hh, ln_c_weight, ln_c_bias),)


def refusal(backend, devices, dtypes, cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why `backend` cannot run the call, in the wording every backend shares, or None: the checks every backend's
    `unsupported` starts with.

    Args:
        backend: the backend's name, for the message.
        devices: device types the backend runs on, or None for any.
        dtypes: floating dtypes the backend runs, or None for any floating dtype.
        cell, gx, w_hh, h0, c0, lengths, w_hr: the call (see `seqfast.kernels.reference`).

    Returns:
        None, or the reason: an unknown cell, a tensor on another device, a floating tensor of another dtype, a
        projection for a cell other than LSTM, or LSTM without `c0`.
    """
    if cell not in GATES:
        return f"unknown cell {cell!r}"
    for name, t in (("gx", gx), ("w_hh", w_hh), ("h0", h0), ("c0", c0), ("lengths", lengths), ("w_hr", w_hr)):
        if t is not None and devices is not None and t.device.type not in devices:
            return f"{name} is on {t.device}; the {backend} backend runs on {' and '.join(devices)} tensors"
    for name, t in (("gx", gx), ("w_hh", w_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr)):
        if t is None or (t.dtype in dtypes if dtypes is not None else t.is_floating_point()):
            continue
        runs = ", ".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes is not None else "floating dtypes"
        return f"{name} has dtype {t.dtype}; the {backend} backend runs {runs}"
    if w_hr is not None and cell != "lstm":
        return f"a projection (w_hr) needs the lstm cell, not {cell}"
    if cell == "lstm" and c0 is None:
        return "the lstm cell needs c0"
    return None


def check_lengths(lengths, T):
    """Raise `ValueError` unless every entry of `lengths [B]` (or None) lies in `[0, T]`: the CPU backends' check,
    worded as the cpp backend's own (on CUDA it would wait for the device, so the triton backend does not make it).
    """
    if lengths is None or not lengths.numel():
        return
    low, high = torch.aminmax(lengths)
    if low < 0 or high > T:
        raise ValueError(f"lengths must lie in [0, {T}]; got {int(low if low < 0 else high)}")


LN_EPS = 1e-5
"""The LayerNorm epsilon of the `layer_norm` option."""


def hidden_size(cell, w_hh):
    """`H` from `w_hh [G*H, P]`."""
    return w_hh.shape[0] // GATES[cell]


def time_index(T, lengths, reverse, device):
    """Processing order of each sequence as indices into time, or None for the identity.

    Args:
        T: number of time steps.
        lengths: `[B]` int64 or None (every sequence has length `T`).
        reverse: walk each sequence from its own last step to its first.
        device: device of the returned index.

    Returns:
        `[T, B]` int64 with `idx[s, b]` the time step processed at step `s`
        (`L_b - 1 - s` while `s < L_b`, else `s`), or None when the order is the identity
        or a plain flip (then the caller flips). The map is its own inverse.
    """
    if not reverse or lengths is None:
        return None
    steps = torch.arange(T, device=device).unsqueeze(1)
    lens = lengths.to(device=device, dtype=torch.int64).unsqueeze(0)
    return torch.where(steps < lens, lens - 1 - steps, steps)


def reorder(seq, lengths, reverse):
    """Put `seq [T, B, *]` into processing order (and back again: the map is an involution)."""
    if not reverse:
        return seq
    idx = time_index(seq.shape[0], lengths, reverse, seq.device)
    if idx is None:
        return seq.flip(0)
    return seq.gather(0, idx.unsqueeze(-1).expand_as(seq))


def active_mask(T, lengths, device):
    """`[T, B, 1]` bool, True where processing step `s < L_b`; None when every step is active."""
    if lengths is None:
        return None
    steps = torch.arange(T, device=device).unsqueeze(1)
    return (steps < lengths.to(device).unsqueeze(0)).unsqueeze(-1)
