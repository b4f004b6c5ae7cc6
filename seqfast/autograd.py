"""The recurrence as `torch.library` custom ops (forward, backward, fake kernels, autograd) and its eager twin.

`seqfast::recurrence` runs one layer-direction's time loop on a named backend; its backward runs
`seqfast::recurrence_backward` on the same backend, then forms the `w_hh`/`b_hh` gradients as one GEMM and one
reduction over all steps (`seqfast::hidden_grads`). The ops are opaque to `torch.compile`, which traces them
through their fake kernels.

`Layer` is the same layer-direction (input projection included) as a `torch.autograd.Function` that calls the
backend and the GEMMs directly: eager calls that need none of the custom ops' machinery take it (see
`seqfast.functional`), at a fraction of the custom ops' per-call cost, with bitwise the same results.

A backward with `create_graph=True` on the eager path (`Layer`, and the cpp backend's own node through
`seqfast::layer_grads`) forms the gradients by `differentiable_grads` instead, so that they can be differentiated
again.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .kernels import reference
from .kernels.common import CELL_IDS, GATES, Extensions, compute_dtype, fused_arg
from .linear import bias_sum, preactivations, project_backward, weight_grad


def _recurrence(
    backend: str,
    cell: str,
    reverse: bool,
    need_saved: bool,
    gx: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    lengths: Tensor | None,
    w_hr: Tensor | None,
    zero: Tensor | None,
    keep_h: Tensor | None,
    keep_c: Tensor | None,
    keep: float,
    ln_hh: Tensor | None = None,
    ln_c_weight: Tensor | None = None,
    ln_c_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer-direction forward.

    Args:
        backend: backend name from `seqfast.dispatch`.
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        reverse: walk each sequence from its own last step.
        need_saved: keep the backend's workspace for backward (False under `no_grad`).
        gx: `[T, B, G*H]` input pre-activations; w_hh: `[G*H, P]`; b_hh: `[G*H]` or None;
        h0: `[B, P]`; c0: `[B, H]` (LSTM) or None; lengths: `[B]` int64 or None; w_hr: `[P, H]` or None.
        zero, keep_h, keep_c, keep, ln_hh, ln_c_weight, ln_c_bias: the options a fused backend runs (`resets`,
            `zoneout`, `layer_norm`), as `seqfast.kernels.common.Extensions.fused` and `.gains` give them.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` (`[0]` unless LSTM), `saved` (`[0]` unless `need_saved`).
    """
    module = dispatch.load(backend)
    ext = fused_arg(zero, keep_h, keep_c, keep, ln_hh, ln_c_weight, ln_c_bias)
    y, hT, cT, saved = module.fwd(cell, gx, w_hh, b_hh, h0, c0, lengths, w_hr, reverse, need_saved, *ext)
    if cT is None:
        cT = h0.new_empty(0)
    return y, hT, cT, saved


recurrence = torch.library.custom_op("seqfast::recurrence", _recurrence, mutates_args=())


@recurrence.register_fake
def _(
    backend,
    cell,
    reverse,
    need_saved,
    gx,
    w_hh,
    b_hh,
    h0,
    c0,
    lengths,
    w_hr,
    zero,
    keep_h,
    keep_c,
    keep,
    ln_hh=None,
    ln_c_weight=None,
    ln_c_bias=None,
):
    T, B, _ = gx.shape
    H, P = w_hh.shape[0] // GATES[cell], w_hh.shape[1]
    # a backend that runs an option takes its keyword
    options = {"zoneout": keep_h is not None or keep, "layer_norm": ln_hh is not None}
    options = {name: True for name, used in options.items() if used}
    saved_shape = dispatch.load(backend).saved_shape(cell, T, B, H, P, **options) if need_saved else (0,)
    y = gx.new_empty((T, B, P))
    cT = c0.new_empty((B, H)) if cell == "lstm" else h0.new_empty(0)
    return y, h0.new_empty((B, P)), cT, gx.new_empty(saved_shape, dtype=compute_dtype(gx.dtype))


def _recurrence_backward(
    backend: str,
    cell: str,
    reverse: bool,
    dy: Tensor,
    dhT: Tensor,
    dcT: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    lengths: Tensor | None,
    y: Tensor,
    saved: Tensor,
    zero: Tensor | None,
    keep_h: Tensor | None,
    keep_c: Tensor | None,
    keep: float,
    ln_hh: Tensor | None = None,
    ln_c_weight: Tensor | None = None,
    ln_c_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer-direction backward on the backend that ran the forward.

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`; `[0]` unless GRU or `layer_norm`: for the other cells it is `dgx`; with
        `layer_norm` the gradient of the product before its LN), `dh0 [B, P]`, `dc0 [B, H]` (`[0]` unless LSTM),
        `dw_hr [P, H]` (`[0]` without projection), then with `layer_norm` the gradients of `b_hh`, `ln_hh`,
        `ln_c_weight` and `ln_c_bias` (each `[0]` where absent).
    """
    module = dispatch.load(backend)
    ext = fused_arg(zero, keep_h, keep_c, keep, ln_hh, ln_c_weight, ln_c_bias)
    dgx, dgh, dh0, dc0, dw_hr, *gains = module.bwd(
        cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse, *ext
    )
    gains = gains[0] if gains else (None,) * 4
    return (
        dgx,
        dy.new_empty(0) if dgh is None else dgh,
        dh0,
        h0.new_empty(0) if dc0 is None else dc0,
        w_hh.new_empty(0) if dw_hr is None else dw_hr,
        *(dy.new_empty(0) if g is None else g for g in gains),
    )


recurrence_backward = torch.library.custom_op("seqfast::recurrence_backward", _recurrence_backward, mutates_args=())


@recurrence_backward.register_fake
def _(backend, cell, reverse, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, *options):
    ln_hh, ln_c_weight, ln_c_bias = (*options[4:], None, None, None)[:3]  # after zero, keep_h, keep_c, keep
    T, B, _ = dy.shape
    G = w_hh.shape[0]
    dc0 = c0.new_empty(c0.shape) if cell == "lstm" else h0.new_empty(0)
    dw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0)
    dgh = dy.new_empty((T, B, G) if cell == "gru" or ln_hh is not None else 0)
    ct = saved.dtype
    gains = [dy.new_empty(0) for _ in range(4)]
    if ln_hh is not None:
        gains = [
            dy.new_empty(0) if t is None else dy.new_empty(t.shape, dtype=ct)
            for t in (b_hh, ln_hh, ln_c_weight, ln_c_bias)
        ]
    return dy.new_empty((T, B, G)), dgh, h0.new_empty(h0.shape), dc0, dw_hr, *gains


def h_prev(y, h0, lengths, reverse, zero=None):
    """The state each step's recurrent product used: `[T, B, P]` from `y [T, B, P]` and `h0 [B, P]`.

    Forward: `h0` then `y[:-1]`. Reverse: `y[1:]` then `h0`, with `h0` at each sequence's own last step. Zeros at
    the steps `zero [T, B]` marks (resets). Entries at steps past a sequence's length are never used (their `dgh` is
    zero).
    """
    h0 = h0.to(y.dtype).unsqueeze(0)
    if y.shape[0] == 1:
        prev = h0
    elif not reverse:
        prev = torch.cat([h0, y[:-1]])
    else:
        prev = torch.cat([y[1:], h0])
        if lengths is not None:
            last = (lengths.to(y.device) - 1).clamp(min=0)
            prev = torch.index_put(prev, (last, torch.arange(y.shape[1], device=y.device)), h0[0])
    if zero is None:
        return prev
    if y.shape[0] == 1:
        return prev.masked_fill(zero.unsqueeze(-1), 0)
    # more than one step: `prev` is a new tensor, zeroed in place; on CPU row by row (a broadcast mask costs 10x
    # more), elsewhere by the mask (finding the rows would wait for the device)
    if not prev.is_cpu:
        return prev.masked_fill_(zero.unsqueeze(-1), 0)
    prev.view(-1, prev.shape[2]).index_fill_(0, zero.flatten().nonzero().squeeze(1), 0)
    return prev


def _hidden_grads(
    dgh: Tensor, y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool, zero: Tensor | None, need_db: bool
) -> tuple[Tensor, Tensor]:
    """`w_hh`'s and `b_hh`'s gradients summed over all steps: `dgh^T h_prev` and `dgh`'s sum.

    The step that starts from `h0` (the first; in reverse each sequence's own last) is one product and every other
    step's `h_prev` is `y` shifted by one step, read in place: `y` is zero past a sequence's length, where `dgh` is
    zero too. With resets `h_prev` is formed (`h_prev`), in the same two products unless with `lengths` too.

    Args:
        dgh: `[T, B, G*H]`; y: `[T, B, P]`; h0: `[B, P]`; lengths: `[B]` int64 or None; reverse: as the forward ran;
            zero: `[T, B]` bool (resets) or None; need_db: whether to form `b_hh`'s gradient.

    Returns:
        `dw_hh [G*H, P]` in `dgh`'s dtype, `db_hh [G*H]` (`[0]` unless `need_db`).
    """
    db = dgh.flatten(0, 1).sum(0) if need_db else dgh.new_empty(0)
    if zero is not None and lengths is not None:
        return weight_grad((dgh.flatten(0, 1), h_prev(y, h0, lengths, reverse, zero).flatten(0, 1))), db
    T, B, _ = dgh.shape
    if not reverse:
        first = dgh[0]
    elif lengths is None:
        first = dgh[T - 1]
    else:
        first = dgh[(lengths.to(dgh.device) - 1).clamp(min=0), torch.arange(B, device=dgh.device)]
    if zero is None:
        first_state, states = h0.to(y.dtype), (y[1:] if reverse else y[:-1])
    else:
        prev = h_prev(y, h0, None, reverse, zero)
        first_state, states = (prev[T - 1], prev[:-1]) if reverse else (prev[0], prev[1:])
    pairs = [(first, first_state)]
    if T > 1:
        pairs.append(((dgh[:-1] if reverse else dgh[1:]).flatten(0, 1), states.flatten(0, 1)))
    return weight_grad(*pairs), db


hidden_grads = torch.library.custom_op("seqfast::hidden_grads", _hidden_grads, mutates_args=())


@hidden_grads.register_fake
def _(dgh, y, h0, lengths, reverse, zero, need_db):
    return dgh.new_empty((dgh.shape[2], y.shape[2])), dgh.new_empty(dgh.shape[2] if need_db else 0)


def _grads(run_backward, run_hidden_grads, backend, cell, reverse, saved_tensors, keep, dy, dhT, dcT):
    """The recurrence's input gradients from its output gradients (None where not given).

    Args:
        run_backward, run_hidden_grads: `recurrence_backward` and `hidden_grads`, as custom ops or as the
            plain functions behind them.
        saved_tensors: `(w_hh, b_hh, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c, ln_hh, ln_c_weight,
            ln_c_bias)` kept by the forward.
        keep: zoneout's constant weight (see `seqfast.kernels.common.Extensions.fused`).

    Returns:
        `dgx [T, B, G*H]`, `dw_hh`, `db_hh` (None without `b_hh`), `dh0`, `dc0` (None unless LSTM), `dw_hr` (None
        without projection), and the gradients of `ln_hh`, `ln_c_weight`, `ln_c_bias` (None where absent).
    """
    w_hh, b_hh, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c, *gains = saved_tensors
    layer_norm = gains[0] is not None
    is_lstm = cell == "lstm"
    dy = torch.zeros_like(y) if dy is None else dy
    dhT = torch.zeros_like(h0) if dhT is None else dhT
    if is_lstm and dcT is None:
        dcT = torch.zeros_like(c0)
    grads = run_backward(
        backend,
        cell,
        reverse,
        dy,
        dhT,
        dcT if is_lstm else None,
        w_hh,
        b_hh,
        w_hr,
        h0,
        c0,
        lengths,
        y,
        saved,
        zero,
        keep_h,
        keep_c,
        keep,
        *gains,
    )[: 5 + 4 * layer_norm]
    dgx, dgh, dh0, dc0, dw_hr = grads[:5]
    # with layer_norm the backend sums b_hh's gradient (after the LN) and `dgh` is the product's (before it)
    dgh = dgh if cell == "gru" or layer_norm else dgx
    dw_hh, db_hh = run_hidden_grads(dgh, y, h0, lengths, reverse, zero, b_hh is not None and not layer_norm)
    d_gains = [None] * 3
    if layer_norm:
        db_hh = grads[5]
        d_gains = [None if t is None else d.to(t.dtype) for t, d in zip(gains, grads[6:], strict=True)]
    dw_hh, db_hh = dw_hh.to(w_hh.dtype), db_hh.to(w_hh.dtype)
    return (
        dgx,
        dw_hh,
        db_hh if b_hh is not None else None,
        dh0,
        dc0 if is_lstm else None,
        dw_hr if w_hr is not None else None,
        *d_gains,
    )


def _setup_context(ctx, inputs, output):
    backend, cell, reverse, need_saved, gx, w_hh, b_hh, h0, c0, lengths, w_hr, zero, keep_h, keep_c, keep = inputs[:15]
    gains = inputs[15:]
    y, _, _, saved = output
    ctx.backend, ctx.cell, ctx.reverse, ctx.need_saved, ctx.keep = backend, cell, reverse, need_saved, keep
    # with layer_norm `gx` too, for a backward with create_graph=True (see `_second_order`)
    kept_gx = gx if gains[0] is not None else None
    ctx.save_for_backward(w_hh, b_hh, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c, *gains, kept_gx)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(saved, *(() if cell == "lstm" else (output[2],)))


def _backward(ctx, dy, dhT, dcT, _dsaved):
    return _backward_on(recurrence_backward, hidden_grads, ctx, dy, dhT, dcT)


def _backward_on(run_backward, run_hidden_grads, ctx, dy, dhT, dcT):
    """The gradients of `recurrence`'s inputs (see `_grads` for `run_backward` and `run_hidden_grads`)."""
    if not ctx.need_saved:
        raise RuntimeError(
            "seqfast: this recurrence ran without saving its workspace (no input required grad when it ran); "
            "run the forward with gradients enabled to differentiate it"
        )
    *tensors, gx = ctx.saved_tensors
    if gx is not None and torch.is_grad_enabled():
        dgx, dw_hh, db_hh, dh0, dc0, dw_hr, *d_gains = _second_order(ctx, gx, tensors, dy, dhT, dcT)
    else:
        dgx, dw_hh, db_hh, dh0, dc0, dw_hr, *d_gains = _grads(
            run_backward,
            run_hidden_grads,
            ctx.backend,
            ctx.cell,
            ctx.reverse,
            tensors,
            ctx.keep,
            dy,
            dhT,
            dcT,
        )
    return None, None, None, None, dgx, dw_hh, db_hh, dh0, dc0, None, dw_hr, None, None, None, None, *d_gains


def _second_order(ctx, gx, tensors, dy, dhT, dcT):
    """`_grads`' gradients with `create_graph=True`: the reference's forward from `gx` differentiated by autograd, so
    that a second backward flows through them (at the reference's speed); `tensors` as `_grads` takes them."""
    w_hh, b_hh, h0, c0, lengths, w_hr, _, _, zero, keep_h, keep_c, *gains = tensors
    (ext,) = fused_arg(zero, keep_h, keep_c, ctx.keep, *gains)
    inputs = (gx, w_hh, b_hh, h0, c0, w_hr, *gains)
    wanted = ctx.needs_input_grad  # trailing arguments left at their defaults have no entry
    need = [i < len(wanted) and wanted[i] for i in (4, 5, 6, 7, 8, 10, 15, 16, 17)]
    with torch.enable_grad():
        outputs = reference.fwd(ctx.cell, gx, w_hh, b_hh, h0, c0, lengths, w_hr, ctx.reverse, False, ext)[:3]
        return _autograd_grads(outputs, (dy, dhT, dcT), inputs, need)


def _autograd_grads(outputs, grad_outputs, inputs, need):
    """The gradients of `outputs` (None where absent) along `grad_outputs` (None where not given) with respect to
    the `inputs` whose `need` is set, with `create_graph=True`; None for the others."""
    wrt = [t for t, wanted in zip(inputs, need, strict=True) if wanted]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o is not None and g is not None]
    if not pairs or not wrt:
        return [None] * len(need)
    outputs, grad_outputs = zip(*pairs, strict=True)
    grads = iter(torch.autograd.grad(outputs, wrt, grad_outputs, create_graph=True, allow_unused=True))
    return [next(grads) if wanted else None for wanted in need]


recurrence.register_autograd(_backward, setup_context=_setup_context)


class Recurrence(torch.autograd.Function):
    """`seqfast::recurrence` on the eager path: the same forward and backward (the plain functions behind the custom
    ops), without the custom ops' dispatch, which costs about 0.5 ms a call (GRU H256 B16 T32, Ice Lake).

    `apply` takes all of `recurrence`'s arguments, the `layer_norm` gains included; returns as `recurrence`.
    """

    @staticmethod
    def forward(ctx, *inputs):
        output = _recurrence(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, dhT, dcT, _dsaved):
        return _backward_on(_recurrence_backward, _hidden_grads, ctx, dy, dhT, dcT)


def folded_biases(cell, b_ih, b_hh):
    """`(b_x, b_h)`: the bias the input projection adds and the one the recurrence adds. Outside GRU's n gate `b_ih`
    and `b_hh` add to the same pre-activations, so the recurrence adds their sum and the projection's GEMM writes its
    product without first copying a bias into every row (0.05-2 ms of the calls timed in the README); one reduction
    gives both bias gradients. GRU's `b_ih` stays with the projection and `b_hh` in the recurrence."""
    return projection_bias(cell, b_ih), b_hh if cell == "gru" else bias_sum(b_ih, b_hh)


def projection_bias(cell, b_ih):
    """`folded_biases(cell, b_ih, b_hh)[0]`, without forming the recurrence's sum."""
    return b_ih if cell == "gru" else None


def differentiable_grads(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr, dy, dhT, dcT, need, ext=None):
    """A layer-direction's input gradients as differentiable functions of its inputs and of the output gradients:
    the forward run again on the reference's torch ops and differentiated by autograd with `create_graph=True`, so
    that a second backward flows through them (the first runs at the reference's speed).

    Args:
        cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr: as in `seqfast.functional.layer`.
        dy: `[T, B, P]`, dhT: `[B, P]`, dcT: `[B, H]` (LSTM), each None where the output got no gradient.
        need: 8 bools, whether the gradient of `x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr` is wanted (a wanted
            tensor requires grad).
        ext: the call's fused options (`seqfast.kernels.common.Extensions`), or None (default).

    Returns:
        The 8 gradients, None where not wanted.
    """
    with torch.enable_grad():
        b_x, b_h = folded_biases(cell, b_ih, b_hh)
        gx = F.linear(x, w_ih, b_x)
        outputs = reference.fwd(cell, gx, w_hh, b_h, h0, c0, lengths, w_hr, reverse, False, ext)[:3]
        return _autograd_grads(outputs, (dy, dhT, dcT), (x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr), need)


_CELL_NAMES = {i: name for name, i in CELL_IDS.items()}
_library = torch.library.Library("seqfast", "FRAGMENT")
_library.define(
    "layer_grads(int cell, bool reverse, Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, "
    "Tensor? c0, Tensor? w_hr, Tensor? zero, Tensor? lengths, Tensor? dy, Tensor? dhT, Tensor? dcT, bool[] need) "
    "-> Tensor[]"
)


def _layer_grads(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, zero, lengths, dy, dhT, dcT, need):
    """`differentiable_grads` for a cell id, resets' `zero` and `lengths` (either or both None), the wanted gradients
    only (zeros for one the outputs do not reach): the op the cpp backend's node calls back when its backward must be
    differentiable."""
    inputs = (x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr)
    ext = None if zero is None else Extensions(zero=zero)
    grads = differentiable_grads(_CELL_NAMES[cell], reverse, *inputs[:7], lengths, w_hr, dy, dhT, dcT, need, ext)
    return [torch.zeros_like(t) if g is None else g for t, g, wanted in zip(inputs, grads, need, strict=True) if wanted]


_library.impl("layer_grads", _layer_grads, "CompositeImplicitAutograd")


class Layer(torch.autograd.Function):
    """One layer-direction, input projection included, without the custom ops: the eager path.

    `apply(backend, cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr, zero, keep_h, keep_c, keep)`
    with the arguments of `seqfast.functional.layer` (`backend` as requested) and the fused options as
    `seqfast.kernels.common.Extensions.fused` gives them; returns `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` (None
    unless LSTM).
    """

    @staticmethod
    def forward(
        ctx, backend, cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr, zero, keep_h, keep_c, keep
    ):
        b_x, b_h = folded_biases(cell, b_ih, b_hh)
        ext = fused_arg(zero, keep_h, keep_c, keep)
        options = ext[0].options() if ext else ()
        # x stands for gx in the choice: same dtype and device (the eager path runs without autocast)
        backend, kernels = dispatch.select_remembered(cell, x, w_hh, h0, c0, lengths, w_hr, backend, options)
        gx = preactivations(kernels, x, w_ih, b_x)
        y, hT, cT, saved = kernels.fwd(cell, gx, w_hh, b_h, h0, c0, lengths, w_hr, reverse, True, *ext)
        ctx.backend, ctx.cell, ctx.reverse, ctx.keep = backend, cell, reverse, keep
        ctx.save_for_backward(x, w_ih, b_ih, w_hh, b_hh, b_h, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c)
        ctx.set_materialize_grads(False)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dy, dhT, dcT):
        x, w_ih, b_ih, w_hh, b_hh, b_h, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c = ctx.saved_tensors
        no_options = (None,) * 4
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr)
            need = [ctx.needs_input_grad[3 + i] for i in (0, 1, 2, 3, 4, 5, 6, 8)]
            ext = fused_arg(zero, keep_h, keep_c, ctx.keep)
            dx, dw_ih, db_ih, dw_hh, db_hh, dh0, dc0, dw_hr = differentiable_grads(
                ctx.cell, ctx.reverse, *inputs, dy, dhT, dcT, need, ext[0] if ext else None
            )
            return None, None, None, dx, dw_ih, db_ih, dw_hh, db_hh, dh0, dc0, None, dw_hr, *no_options
        b_x = projection_bias(ctx.cell, b_ih)
        dgx, dw_hh, db_h, dh0, dc0, dw_hr, *_ = _grads(
            _recurrence_backward,
            _hidden_grads,
            ctx.backend,
            ctx.cell,
            ctx.reverse,
            (w_hh, b_h, h0, c0, lengths, w_hr, y, saved, zero, keep_h, keep_c, None, None, None),
            ctx.keep,
            dy,
            dhT,
            dcT,
        )
        need_x, need_w_ih, need_b_ih, _, need_b_hh = ctx.needs_input_grad[3:8]
        dx, dw_ih, db_x = project_backward(dgx, x, w_ih, need_x, need_w_ih, need_b_ih and b_x is not None)
        db_ih = db_x if b_x is not None else db_h
        return (
            None,
            None,
            None,
            dx if need_x else None,
            dw_ih if need_w_ih else None,
            db_ih if b_ih is not None and need_b_ih else None,
            dw_hh,
            db_h if b_hh is not None and need_b_hh else None,
            dh0,
            dc0,
            None,
            dw_hr,
            *no_options,
        )
