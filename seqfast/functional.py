"""Recurrent layers as functions: one layer-direction, and the multi-layer (bi)directional stack.

The input projection of every step is one GEMM, whose backward forms `dx` and `dW_ih` as one GEMM each; the
sequential part runs on the selected backend. Eager calls reach both through `seqfast.autograd.Layer` (or, without
grad, directly); calls that need torch's op machinery (see `eager`) go through the `seqfast::linear` and
`seqfast::recurrence` custom ops.
"""

import functools
from itertools import chain

import torch
import torch.nn.functional as F

from . import dispatch, native
from .autograd import Layer, Recurrence, folded_biases, projection_bias
from .kernels import reference
from .kernels.common import GATES, LN_EPS, Extensions, empty, time_index
from .linear import fused, input_layer_norm, linear, plain, preactivations

CELL_OF_MODE = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


def eager(*tensors, autocast=False):
    """True when a call can take the eager path (`seqfast.autograd.Layer` or the kernels directly) instead of the
    custom ops: not compiling, tracing or exporting, no functorch transform, no `TorchDispatchMode` or
    `TorchFunctionMode`, no autocast (unless `autocast`: default False), no forward-mode AD (see `by_autograd`),
    `tensors` plain tensors (or parameters, or None), the first (the input) off the meta device (the callers give every
    tensor the input's device or fail on it)."""
    if _compiling() or _tracing() or _dispatch_modes() or _transform() is not None or _forward_ad():
        return False
    if _autocast() and not autocast:
        return False
    return not tensors[0].is_meta and _PLAIN.issuperset(map(type, tensors)) and not _has_torch_function(tensors)


def onnx_exporting():
    """True while `torch.onnx.export` captures the model, with either exporter (`dynamo=True`, the default, runs
    `torch.export`; `dynamo=False` runs `torch.jit.trace`)."""
    return (_exporting() or _tracing()) and torch.onnx.is_in_onnx_export()


def by_autograd():
    """True where a call runs as the reference's torch ops, differentiated by autograd: under forward-mode AD
    (`torch.autograd.forward_ad`) and `torch.func`'s `grad`, `vjp`, `jacrev` and `jvp` transforms, which seqfast's
    autograd nodes have no rules for; never while compiling (the custom ops' own rules serve there)."""
    if _compiling():
        return False
    if _forward_ad():
        return True
    interpreter = _transform()
    return interpreter is not None and interpreter.key() in _AUTOGRAD_TRANSFORMS


def _forward_ad():
    return _forward_ad_module._current_level >= 0


_AUTOGRAD_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
_forward_ad_module = torch.autograd.forward_ad
_PLAIN = {torch.Tensor, torch.nn.Parameter, type(None)}
_exporting = torch.compiler.is_exporting
_compiling = torch.compiler.is_compiling
_tracing = torch.jit.is_tracing  # Dynamo knows it (torch._C._is_tracing breaks its graph)
_has_torch_function = torch._C._has_torch_function  # also True under a TorchFunctionMode
_dispatch_modes = torch._C._len_torch_dispatch_stack
_transform = torch._C._functorch.peek_interpreter_stack
_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled


def layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, w_hr=None, lengths=None, reverse=False, backend=None, ext=None):
    """One layer in one direction.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        x: `[T, B, I]` time-major input.
        w_ih: `[G*H, I]`; w_hh: `[G*H, P]`; b_ih, b_hh: `[G*H]` or None.
        h0: `[B, P]`; c0: `[B, H]` for `lstm`, else None (default).
        w_hr: `[P, H]` LSTM projection or None (default).
        lengths: `[B]` int64 per-sequence lengths on `x`'s device, or None (default: all `T`).
        reverse: walk each sequence from its own last step (default False).
        backend: backend name, or None (default) for `SEQFAST_BACKEND`, then automatic selection.
        ext: the options beyond torch.nn's cell (`seqfast.kernels.common.Extensions`), or None (default).

    Returns:
        `y [T, B, P]` (zeros past each length), `hT [B, P]`, `cT [B, H]` or None.
    """
    fast = eager(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths)
    return _layer(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, backend, ext=ext)


def step(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, backend, ext=None, key=None):
    """One step of a cell, on the eager path when `fast` (see `eager`): with options (`ext`) `layer` over one step,
    else the function `_step_runner` picks.

    Args:
        x: `[B, I]`; h0: `[B, H]`; c0: `[B, H]` for `lstm`, else None; ext: as in `layer`, one step's; the rest as in
            `layer`.
        key: the call's signature (see `call_key`), under which an eager step without options keeps the function
            it ran with for `remembered`; default None.

    Returns:
        `(h [B, H], c [B, H] or None)`.
    """
    if ext is not None:
        _, h, c = _layer(
            fast, cell, x.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, h0, c0, None, None, False, backend, ext=ext
        )
        return h, c
    run = _step_runner(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, backend)
    if fast and key is not None:
        _remember(key, run)
    return run(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def _step_runner(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, backend):
    """The function that runs a step without options, `run(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> (h, c)`:
    torch's own op (`seqfast.native`) when `backend` (or `SEQFAST_BACKEND`) is `native` or automatic selection routes
    an eager step with grad there; on the eager path the backend's step without grad, or its own node with grad,
    where it has them; else `layer` over one step. `fast` as in `step`."""
    requested = backend or dispatch.env("SEQFAST_BACKEND")
    if requested == "native":
        return native.step
    grad = _grad_enabled()
    if fast and not grad:
        # without grad a step is too small for the native choice to pay for itself (and seqfast's is the faster)
        kernels = _eager_kernels(cell, x, w_hh, h0, c0, None, None, backend)
        if hasattr(kernels, "step") and fused(kernels, x, w_ih, projection_bias(cell, b_ih)):
            return kernels.step
    ours = functools.partial(_layer_step, fast, backend)
    if fast and grad:
        if _needs_grad(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
            kernels = _own_node(cell, x, w_ih, w_hh, h0, c0, None, backend)
            if kernels is not None:
                ours = functools.partial(_node_step, kernels)
        if requested is None and native.route_step(ours, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
            return native.step
    return ours


def _node_step(kernels, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    return kernels.layer(cell, False, x, w_ih, b_ih, w_hh, b_hh, h0, c0, None)[1:]


def _layer_step(fast, backend, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    return _layer(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, None, None, False, backend)[1:]


def call_key(tensors, *facts):
    """The signature of an eager call on which the choice of the function running it depends, or None when the call
    cannot take the eager path (see `eager`) or seqfast runs without its extension: the extension's packed facts of
    `tensors` (the input first; None allowed) as `seqfast._C.call_signature` forms them (grad mode, the thread count,
    each tensor's dtype, layout, device, sizes and whether it requires grad), the settings read on every call, then
    `facts`: the request and whatever else the caller's checks of the arguments and the choice read besides.
    `remembered` answers for a call whose key matches one that ran (`step`'s or `rnn`'s `key`)."""
    global _signature
    if _compiling() or _forward_ad():
        return None
    if _signature is None:
        _signature = _extension_signature()
    if not _signature:
        return None
    packed = _signature(*tensors)
    return None if packed is None else (packed, dispatch.settings(), *facts)


def remembered(key):
    """The function a call of signature `key` (see `call_key`) ran with, or None: kept while the tables its choice
    came from (the loaded backends, the native route's answers in this process) stay the same, at most
    `_MAX_REMEMBERED` of them."""
    return _runners.get(key) if _same_tables() else None


def _remember(key, run):
    global _runners_for
    if len(_runners) >= _MAX_REMEMBERED or not _same_tables():
        _runners.clear()
        _runners_for = (dispatch._loaded, native._routes)
    _runners[key] = run


def _same_tables():
    return _runners_for[0] is dispatch._loaded and _runners_for[1] is native._routes


_runners = {}
_runners_for = (None, None)
_MAX_REMEMBERED = 1024
_signature = None  # `seqfast._C.call_signature` from the first `call_key` on, False without the extension


def _extension_signature():
    """`seqfast._C.call_signature`, imported on a process's first call (`import seqfast` loads no extension), or
    False when seqfast runs without it: every call then takes its checked path."""
    try:
        from ._C import call_signature
    except ImportError:
        return False
    return call_signature


def _eager_kernels(cell, x, w_hh, h0, c0, lengths, w_hr, backend):
    """The backend module an eager call runs on; `x` stands for `gx` in the choice (same dtype and device, the eager
    path running without autocast). The choice depends on nothing that differs between the layers of a stack (see
    `seqfast.kernels.reference`), so one answer serves them all."""
    return dispatch.select_remembered(cell, x, w_hh, h0, c0, lengths, w_hr, backend)[1]


def _needs_grad(*tensors):
    """Whether grad mode is on and any of `tensors` (None allowed) requires grad."""
    return _grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _own_node(cell, x, w_ih, w_hh, h0, c0, w_hr, backend, width=None, lengths=None):
    """The backend module whose own autograd node (bitwise the same as `Layer`) runs an eager call with grad (of
    `lengths`, default None): the eager call's backend, when it has one and the call's products are all plain GEMMs
    (see `seqfast.linear.plain`; `width`: the input's features they count, default `x`'s); else None."""
    kernels = _eager_kernels(cell, x, w_hh, h0, c0, lengths, w_hr, backend)
    width = x.shape[-1] if width is None else width
    macs = x.shape[:-1].numel() * w_ih.shape[0] * max(width, w_hh.shape[1])
    return kernels if hasattr(kernels, "layer") and plain(macs) else None


def _layer(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, backend, kernels=None, ext=None):
    """`layer`, on the eager path when `fast` (see `eager`), else through the custom ops; without grad the eager path
    runs on `kernels` when given (see `_eager_kernels`). With options (`ext`) see `_extended`. `x` may also be a
    cell's step, `[B, I]` (`step`'s, without `ext`): the backend's own node takes it as it is (see
    `seqfast.kernels.cpp.layer`), the other paths as `[1, B, I]`."""
    if not fast and by_autograd():
        return _reference_layer(
            cell, x.unsqueeze(0) if x.dim() == 2 else x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, ext
        )
    need_grad = _needs_grad(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr)
    if ext is not None:
        return _extended(fast, need_grad, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, backend, ext)
    if fast and need_grad:
        node = _own_node(cell, x, w_ih, w_hh, h0, c0, w_hr, backend, lengths=lengths)
        if node is not None:
            return node.layer(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, lengths=lengths)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if fast and need_grad:
        return Layer.apply(backend, cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr, *_NO_OPTIONS)
    b_x, b_h = folded_biases(cell, b_ih, b_hh)
    if fast:
        if kernels is None:
            kernels = _eager_kernels(cell, x, w_hh, h0, c0, lengths, w_hr, backend)
        return _infer(kernels, cell, x, w_ih, b_x, w_hh, b_h, h0, c0, w_hr, lengths, reverse, None)
    gx = linear(x, w_ih, b_x)
    name = dispatch.select(cell, gx, w_hh, h0, c0, lengths, w_hr, backend)
    # a trace keeps the flag as a constant, so a traced module saves the workspace whether or not it will need it
    need_saved = need_grad or torch.jit.is_tracing()
    y, hT, cT, _ = torch.ops.seqfast.recurrence(
        name, cell, reverse, need_saved, gx, w_hh, b_h, h0, c0, lengths, w_hr, *_NO_OPTIONS
    )
    return y, hT, cT if cell == "lstm" else None


# The fused options' arguments of `Layer` and the custom ops (`Extensions.fused`) when a call has none.
_NO_OPTIONS = (None, None, None, 0.0)


def _given(ext):
    """`ext` as the trailing argument of a backend call: none when None, so that a backend without options is called
    as before."""
    return () if ext is None else (ext,)


def _extended(fast, need_grad, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, backend, ext):
    """`layer` with options (`ext`), on the backend dispatch picks among those that run them all. A fused backend
    (one that runs the call's options) takes `_layer`'s paths with them passed along, but for `layer_norm`, whose
    input LayerNorm torch runs around the input GEMM (differentiated by autograd) before the recurrence (`Recurrence`
    on the eager path, else the custom op); the reference runs the same projection and its forward, differentiated
    by autograd."""
    options = ext.options()
    name = dispatch.select(cell, x, w_hh, h0, c0, lengths, w_hr, backend, options)  # x stands for gx
    if name == "reference":
        return _reference_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, ext)
    b_x, b_h = folded_biases(cell, b_ih, b_hh)
    if fast and ext.ln_hh is None:
        if need_grad:
            fused = ext.fused()
            return Layer.apply(backend, cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, lengths, w_hr, *fused)
        kernels = dispatch.load(name)
        return _infer(kernels, cell, x, w_ih, b_x, w_hh, b_h, h0, c0, w_hr, lengths, reverse, ext)
    gx = _input_projection(x, w_ih, b_x, ext, linear, eager=fast)
    need_saved = need_grad or torch.jit.is_tracing()
    run = Recurrence.apply if fast else torch.ops.seqfast.recurrence
    args = (name, cell, reverse, need_saved, gx, w_hh, b_h, h0, c0, lengths, w_hr, *ext.fused(), *ext.gains())
    y, hT, cT, _ = run(*args)
    return y, hT, cT if cell == "lstm" else None


def _reference_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, ext):
    """`layer` as the reference's torch ops, which autograd differentiates (see `by_autograd`); `x [T, B, I]`."""
    b_x, b_h = folded_biases(cell, b_ih, b_hh)
    gx = _input_projection(x, w_ih, b_x, ext, F.linear)
    y, hT, cT, _ = reference.fwd(cell, gx, w_hh, b_h, h0, c0, lengths, w_hr, reverse, False, *_given(ext))
    return y, hT, cT if cell == "lstm" else None


def _input_projection(x, w_ih, bias, ext, product, eager=None):
    """`gx`: `x`'s product with `w_ih` by `product` (`F.linear`'s arguments) plus `bias`, with `layer_norm` (`ext`)
    the LayerNorm of the product before the bias: `input_layer_norm` on an `eager` call or not (a bool), or torch's
    (None, default; the reference's)."""
    if ext is not None and ext.ln_ih is not None:
        z = F.linear(x, w_ih)
        if eager is None:
            return F.layer_norm(z, w_ih.shape[:1], ext.ln_ih, bias, LN_EPS)
        return input_layer_norm(z, ext.ln_ih, bias, eager)
    return product(x, w_ih, bias)


def bernoulli_mask(like, shape, p):
    """A mask of `shape`, 1 with probability `p` and else 0, in `like`'s dtype and on its device: one float32
    `torch.rand` draw per element from the default generator, compared with `p` (on CPU about 3x faster than
    `bernoulli_`, and as fine-grained in every dtype).

    Returns:
        `[shape]` tensor.
    """
    return torch.rand(shape, dtype=torch.float32, device=like.device).lt_(p).to(like.dtype)


def extensions(cell, x, hidden_size, proj_size, reverse, resets=None, zoneout=0.0, training=False, layer_norm=None):
    """The options of one layer-direction (`seqfast.kernels.common.Extensions`), or None when it uses none.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        x: `[T, B, *]` the layer's input (its device and dtype, `T` and `B`).
        hidden_size: `H`; proj_size: `P` (`H` without projection).
        reverse: the direction walks each sequence backwards: a reset before step `t` then zeroes the state
            step `t - 1` starts from.
        resets: `[T, B]` bool or None (default): True where an episode starts at that step.
        zoneout: probability `p` of keeping each unit's previous state (default 0: off); in training each step and
            unit draws its own Bernoulli(p) mask from the default generator (`h`'s, then LSTM's `c`'s), in
            evaluation every unit keeps `p` of it.
        training: draw zoneout's masks (default False).
        layer_norm: `(ln_ih, ln_hh, ln_c_weight, ln_c_bias)` gains (and LSTM's bias) of the layer-direction, or
            None (default).
    """
    zero = keep_h = keep_c = None
    if resets is not None:
        zero = torch.cat([resets[1:], resets.new_zeros((1, resets.shape[1]))]) if reverse else resets
    if zoneout:
        T, B = x.shape[0], x.shape[1]
        if training:
            keep_h = bernoulli_mask(x, (T, B, proj_size), zoneout)
            keep_c = bernoulli_mask(x, (T, B, hidden_size), zoneout) if cell == "lstm" else None
        else:
            keep_h = keep_c = float(zoneout)
    if zero is None and keep_h is None and layer_norm is None:
        return None
    return Extensions(zero, keep_h, keep_c, *(layer_norm or (None,) * 4))


# Without grad the input projection is formed about this many bytes at a time, so a long sequence holds one chunk
# of it, not all T steps' (4x the output for LSTM); a chunk is one backend call of at least `_INFER_MIN_STEPS` steps,
# so that the backends pick the same per-step product for it as for the whole sequence (they switch on the steps
# and rows of a call).
_INFER_CHUNK_BYTES = 16 << 20
_INFER_MIN_STEPS = 32


def _infer_chunks(x, w_ih):
    """How many chunks of steps `_infer` runs `x [T, B, I]` in (below 2: one call)."""
    T, B = x.shape[:2]
    if T < 2 * _INFER_MIN_STEPS:
        return 1
    return min(-(-T * B * w_ih.shape[0] * x.element_size() // _INFER_CHUNK_BYTES), T // _INFER_MIN_STEPS)


def _infer(kernels, cell, x, w_ih, b_x, w_hh, b_h, h0, c0, w_hr, lengths, reverse, ext):
    """The forward on the eager path without grad, on `kernels` (a backend module): the input projection and the
    recurrence a chunk of steps at a time, each chunk from the state the one before left, so that every step
    groups the same rows as one call would. A reversed walk goes chunk by chunk from the end, or, with `lengths`,
    through each sequence's steps gathered from its own last one (the order the kernels walk it in). `ext`: the
    options the backend runs (`seqfast.kernels.common.Extensions`), or None.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None.
    """
    T, B = x.shape[0], x.shape[1]
    chunks = _infer_chunks(x, w_ih)
    if chunks < 2:
        gx = preactivations(kernels, x, w_ih, b_x)
        return kernels.fwd(cell, gx, w_hh, b_h, h0, c0, lengths, w_hr, reverse, False, *_given(ext))[:3]
    steps = -(-T // chunks)
    order = time_index(T, lengths, reverse, x.device)  # [T, B] time of each processing step, or None
    backwards = reverse and order is None
    starts = range(0, T, steps)
    y, h, c = None, h0, c0
    for s0 in reversed(starts) if backwards else starts:
        s1 = min(s0 + steps, T)
        at = slice(s0, s1) if order is None else (order[s0:s1], torch.arange(B, device=x.device))
        gx = preactivations(kernels, x[at], w_ih, b_x)
        chunk_lengths = None if lengths is None else (lengths - s0).clamp(0, s1 - s0)
        options = _given(None if ext is None else ext.steps(at))
        y_chunk, h, c, _ = kernels.fwd(cell, gx, w_hh, b_h, h, c, chunk_lengths, w_hr, backwards, False, *options)
        if y is None:
            y = y_chunk.new_empty((T, *y_chunk.shape[1:]))
        y[at] = y_chunk
        del gx, y_chunk  # before the next chunk's are formed
    return y, h, c


def rnn(
    cell,
    x,
    h0,
    c0,
    weights,
    num_layers,
    bidirectional,
    dropout=0.0,
    training=False,
    lengths=None,
    backend=None,
    resets=None,
    zoneout=0.0,
    layer_norm=None,
    key=None,
):
    """A stack of `num_layers` recurrent layers, each one or two directions, dropout between layers.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        x: `[T, B, I]` time-major input.
        h0: `[L*D, B, P]`; c0: `[L*D, B, H]` for `lstm`, else None.
        weights: `L*D` tuples `(w_ih, w_hh, b_ih, b_hh, w_hr)` in torch's layer-direction order (None for absent).
        num_layers: `L`; bidirectional: `D = 2` when True.
        dropout: probability applied to every layer's output but the last, only when `training` (default 0).
        lengths: `[B]` int64 per-sequence lengths (any device), or None (default).
        backend: backend name or None (default): `native` runs torch's own op (see `seqfast.native`), which automatic
            selection also picks for an eager call where it calibrated it faster.
        resets, zoneout: as in `extensions` (`resets` with `lengths` None), for every layer; default off.
        layer_norm: `L*D` tuples `(ln_ih, ln_hh, ln_c_weight, ln_c_bias)` (see `extensions`), or None (default).
        key: the call's signature (see `call_key`), under which an eager call without `lengths` or options keeps
            the function it ran with for `remembered`; default None.

    Returns:
        `y [T, B, D*P]`, `hn [L*D, B, P]`, `cn [L*D, B, H]` or None.
    """
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    options = (resets, zoneout, layer_norm)
    extended = resets is not None or zoneout > 0 or layer_norm is not None
    requested = backend or dispatch.env("SEQFAST_BACKEND")
    if requested == "native" and extended:
        raise RuntimeError("seqfast backend 'native' (torch's own op) cannot run resets, zoneout or layer_norm")
    fast = eager(x, h0, c0, lengths, *chain.from_iterable(weights))
    args = (cell, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths)
    if extended:
        # resets alone run on the backend's own node where a call without options would
        alone = fast and lengths is None and zoneout == 0 and layer_norm is None
        node = _own_nodes(cell, x, h0, c0, weights, bidirectional, backend) if alone else None
        return _stack(fast, *args, backend, options, node)
    run = _rnn_runner(fast, requested, *args, backend)
    if fast and key is not None and lengths is None:
        _remember(key, run)
    return run(x, h0, c0, weights, lengths)


def _rnn_runner(
    fast, requested, cell, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths, backend
):
    """The function that runs `rnn` without options, `run(x, h0, c0, weights, lengths) -> (y, hn, cn)`: torch's own
    op (`seqfast.native`) when `requested` is `native` or automatic selection routes an eager call there; on the
    eager path without grad the backend's whole stack in one call where it has one (see `_one_call`); else `_stack`,
    with grad every layer-direction on the backend's own node where `_own_nodes` finds one. The other arguments are
    `rnn`'s, `fast` as in `_stack`."""
    static = (num_layers, bidirectional, dropout, training)
    theirs = functools.partial(_native_rnn, cell, static)
    if requested == "native":
        return theirs
    node = None
    if fast:
        node = _own_nodes(cell, x, h0, c0, weights, bidirectional, backend, lengths)
    ours = functools.partial(_stack_call, fast, cell, static, backend, node)
    if fast and not torch.is_grad_enabled():
        # the stacked states stand for each layer's in the choice: same dtypes and devices
        kernels = _eager_kernels(cell, x, weights[0][1], h0, c0, lengths, weights[0][4], backend)
        dropped = num_layers > 1 and dropout > 0 and training
        if _one_call(kernels, cell, x, weights, 2 if bidirectional else 1, dropped):
            ours = functools.partial(_whole_stack, kernels, cell, bidirectional)
    if fast and requested is None and native.route(ours, cell, x, h0, c0, weights, *static, lengths):
        return theirs
    return ours


def _native_rnn(cell, static, x, h0, c0, weights, lengths):
    return native.rnn(cell, x, h0, c0, weights, *static, lengths)


def _whole_stack(kernels, cell, bidirectional, x, h0, c0, weights, lengths):
    return kernels.stack(cell, x, h0, c0, weights, bidirectional, lengths)


def _stack_call(fast, cell, static, backend, node, x, h0, c0, weights, lengths):
    return _stack(fast, cell, x, h0, c0, weights, *static, lengths, backend, None, node)


def _own_nodes(cell, x, h0, c0, weights, bidirectional, backend, lengths=None):
    """The backend whose own node `_layer` runs every layer-direction of an eager stack (of `lengths`, default None)
    on (see `_own_node`): each needs grad (the first layer's by its own tensors, the others as the first did) and its
    products are plain GEMMs; else None."""
    directions = 2 if bidirectional else 1
    w_ih, w_hh, _, _, w_hr = weights[0]
    if not all(_needs_grad(x, *w, h0, c0) for w in weights[:directions]):
        return None
    width = max(x.shape[-1], directions * w_hh.shape[1])  # the widest input of the layers
    return _own_node(cell, x, w_ih, w_hh, h0[0], None if c0 is None else c0[0], w_hr, backend, width, lengths)


def _stack(
    fast, cell, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths, backend, options, node=None
):
    """`rnn` on seqfast's kernels, on the eager path when `fast` (see `eager`); `lengths` int64 on `x`'s device;
    `options`: `(resets, zoneout, layer_norm)` as `rnn` takes them, or None when all are off; `node`: the backend
    whose own node runs every layer-direction (see `_own_nodes`), or None (default) for `_layer`'s choice each."""
    directions = 2 if bidirectional else 1
    kernels = None
    if fast and not torch.is_grad_enabled() and options is None:
        kernels = _eager_kernels(cell, x, weights[0][1], h0, c0, lengths, weights[0][4], backend)
    h0s = h0.unbind(0)
    c0s = (None,) * len(h0s) if c0 is None else c0.unbind(0)
    hn, cn = [], []
    for i in range(num_layers):
        outputs = []
        for d in range(directions):
            k = i * directions + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            ext = None
            if options is not None:
                resets, zoneout, layer_norm = options
                ln = None if layer_norm is None else layer_norm[k]
                hidden = w_hh.shape[0] // GATES[cell]
                ext = extensions(cell, x, hidden, w_hh.shape[1], d == 1, resets, zoneout, training, ln)
            if node is not None:
                # the last layer's output, which its node keeps, handed out as a copy (see below)
                copy_y = directions == 1 and i == num_layers - 1 and lengths is None
                zero = None if ext is None else ext.zero
                args = (x, w_ih, b_ih, w_hh, b_hh, h0s[k], c0s[k], w_hr, copy_y, zero, lengths)
                y, hT, cT = node.layer(cell, d == 1, *args)
            else:
                y, hT, cT = _layer(
                    fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0s[k], c0s[k], w_hr, lengths, d == 1, backend, kernels, ext
                )
            outputs.append(y)
            hn.append(hT)
            cn.append(cT)
        x = outputs[0] if directions == 1 else _side_by_side(fast, outputs)
        if dropout > 0 and training and i < num_layers - 1:
            x = F.dropout(x, dropout, training=True) if lengths is None else _dropout_packed(x, lengths, dropout)
    if directions == 1 and lengths is None and node is None and (x.requires_grad or _tracing()):
        # the last layer's backward reads its output: the caller gets a copy, which torch.nn lets it change in place
        # (a trace, which fixes the choice, always copies)
        x = x.clone()
    return x, torch.stack(hn), None if c0 is None else torch.stack(cn)


def _side_by_side(fast, outputs):
    """The directions' outputs `[T, B, P]` side by side, `[T, B, 2P]`; on the eager path without grad in
    `common.empty`'s memory (a large output allocated afresh faulted its pages in on every call: two-layer
    BiLSTM(256) B64 T100 without grad, 119.9 -> 111.8 ms)."""
    if not fast or (torch.is_grad_enabled() and any(y.requires_grad for y in outputs)):
        return torch.cat(outputs, dim=2)
    T, B, P = outputs[0].shape
    return torch.cat(outputs, dim=2, out=empty((T, B, 2 * P), outputs[0].dtype, outputs[0].device))


def _one_call(kernels, cell, x, weights, directions, dropped):
    """Whether `kernels.stack` runs a stack without grad as `_layer` would layer by layer: the backend has one, and no
    dropout between layers (`dropped`), every layer's input projection formed by the backend, in one chunk (see
    `_infer`)."""
    if dropped or not hasattr(kernels, "stack"):
        return False
    w_ih, w_hh, b_ih, b_hh, _ = weights[0]
    T, B, I = x.shape
    widest = T * B * max(I, directions * w_hh.shape[1])
    return _infer_chunks(x, w_ih) < 2 and fused(kernels, x, w_ih, projection_bias(cell, b_ih), widest)


def _dropout_packed(x, lengths, p):
    """Dropout on the valid steps of `x [T, B, F]` (batch sorted by length, longest first) in `PackedSequence` data
    order, the tensor torch.nn drops out, so the same seed draws the same mask; padding stays zero."""
    valid = (torch.arange(x.shape[0], device=x.device)[:, None] < lengths[None, :]).unsqueeze(2).expand_as(x)
    data = F.dropout(x[valid].view(-1, x.shape[2]), p, training=True)
    return x.new_zeros(x.shape).masked_scatter(valid, data)
