"""Benchmark building blocks shared by the runner, the pytest-benchmark suite and the plot: providers, problem
set-up, the correctness gate, timing, FLOP and token counts, the GEMM reference rate and the run environment.

Providers: `torch` (torch.nn), `seqfast-<backend>` for every backend of the device's dispatch table that loads here
(forced with `backend=` under `SEQFAST_STRICT=1`), and optionally `torch-compile` (`torch.compile` of the torch.nn
module with Dynamo's `allow_rnn`, which unrolls the recurrence; compiling takes minutes per shape on a CPU).

Modules: the sequence modules (`RNN`, `LSTM`, `GRU`), for a shape with `module="cell"` the cells (`RNNCell`,
`LSTMCell`, `GRUCell`), fed `[B, I]` for one step, and for `module="decoder"` a greedy decoder (`Decoder`): an
embedding, the provider's sequence module and an output head, run one token at a time.

Modes of the sequence modules and cells (`MODES`): `fwd` (forward with autograd recording), `fwdbwd` (forward, then
the gradients of the input and every parameter for fixed random cotangents on every output), `infer` (forward under
`torch.no_grad`). `kernel`: a seqfast backend's forward time loop alone (`fwd(..., need_saved=False)`) on one layer's
tensors, the persistent kernel's cost per step without the input GEMM and the module around it. Decoder modes
(`DECODE_MODES`), one call decoding `T` tokens under `torch.no_grad`: `decode` (eager), `decode-graph` (one
decoding step captured in a CUDA graph, replayed `T` times; CUDA only) and `decode-compile` (the step under
`torch.compile(mode="reduce-overhead")`, compiled during set-up).

`first_call` runs `benchmarks.first_call` in a fresh interpreter: the cold start a user meets (imports, backend
loading, numba's compile or on-disk cache, the first forward and backward).
"""

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
from seqfast import dispatch
from seqfast.kernels.common import GATES
from seqfast.linear import dense
from seqfast.native import cpu_facts, cpuinfo

from .cell_loop import LOOP_MODULES
from .shapes import DECODER_VOCAB, DTYPES

MODES = ("fwd", "fwdbwd", "infer")
DECODE_MODES = ("decode", "decode-graph", "decode-compile")
KERNEL = "kernel"
ALL_MODES = MODES + (KERNEL,) + DECODE_MODES

# Relative RMS tolerance of the gate per benchmark dtype; the oracle is torch.nn in float64 for float64 input, on CUDA
# and for an option's cell loop, in float32 otherwise, built from the same (rounded) weights and inputs. float64: the
# two sides differ only in summation order, u = 1.1e-16 times sqrt(I + H) <= 1e2 per dot product, kept over T steps of a
# contractive recurrence and the B*T-term weight-gradient sums: ~1e-13, bound 1e-10. float32: the same with u = 6e-8
# gives <= 1e-5 at H = 4096 (measured 1e-7 to 7e-7 up to H = 2048, T = 150), bound 1e-4. bfloat16 / float16: outputs and
# gradients are stored in the narrow type, a rounding of u / sqrt(3) RMS each (u = 2^-8 / 2^-11), on top of the rounded
# gate pre-activations; measured up to 2.8u for torch.nn itself (GRU, 2 layers, bidirectional), bound 8u.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

GEMM_SIZE = 2048
# torch's CPU float16 GEMM has no fast kernel (2.3 GFLOP/s at 512^3 on AMD Zen 4, against 250 for bfloat16): 2048^3
# takes about 17 s a product there
CPU_FLOAT16_GEMM_SIZE = 512
GEMM_MIN_RUN_TIME = 1.0

# Timed samples per CPU measurement at least: p20 and p80 then fall between the 2nd-3rd and 8th-9th fastest.
MIN_SAMPLES = 10

_TORCH_MODULES = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
_SEQFAST_MODULES = {"rnn_tanh": seqfast.RNN, "rnn_relu": seqfast.RNN, "lstm": seqfast.LSTM, "gru": seqfast.GRU}
_TORCH_CELLS = {
    "rnn_tanh": torch.nn.RNNCell,
    "rnn_relu": torch.nn.RNNCell,
    "lstm": torch.nn.LSTMCell,
    "gru": torch.nn.GRUCell,
}
_SEQFAST_CELLS = {
    "rnn_tanh": seqfast.RNNCell,
    "rnn_relu": seqfast.RNNCell,
    "lstm": seqfast.LSTMCell,
    "gru": seqfast.GRUCell,
}

# what a first call may fill on disk for the next process: numba's and triton's compiled kernels, and the automatic
# choice's calibrations (`seqfast.native.cache_path`, under `$XDG_CACHE_HOME`)
_KEPT_CACHES = {"numba": "NUMBA_CACHE_DIR", "triton": "TRITON_CACHE_DIR", "auto": "XDG_CACHE_HOME"}

_ROOT = Path(__file__).resolve().parent.parent


class Provider(NamedTuple):
    """One implementation under test.

    Args:
        name: `torch`, `torch-compile`, `seqfast` (automatic selection) or `seqfast-<backend>`.
        backend: the seqfast backend name, `auto` for automatic selection, None for the torch providers.
        compiled: wrap the module in `torch.compile`.
    """

    name: str
    backend: str | None = None
    compiled: bool = False


TORCH = Provider("torch")
TORCH_COMPILE = Provider("torch-compile", compiled=True)
# seqfast's automatic selection, what a user who names no backend gets (on CPU it may route an LSTM call to torch's
# own op, see seqfast.native)
AUTO = Provider("seqfast", "auto")


class Timing(NamedTuple):
    """Seconds per call: `median`, `p20`, `p80`, and how many timed samples they summarise (None where the timer
    does not say: `triton.testing.do_bench`)."""

    median: float
    p20: float
    p80: float
    samples: int | None


class GateResult(NamedTuple):
    """Outcome of `gate`: `passed`, the worst relative RMS error `error` (None if the call raised), the tolerance
    `tol` and a one-line `message` (the worst tensor, or the exception)."""

    passed: bool
    error: float | None
    tol: float
    message: str


@dataclass
class Problem:
    """A ready-to-call benchmark instance (see `setup`).

    Attributes:
        module: the provider's module (compiled for `torch-compile`), the `Decoder` in the decode modes, None in
            `kernel` mode.
        arg: its input, `[T, B, I]` (`[B, I]` for a cell) or a `PackedSequence` of it; the start tokens `[B]` in the
            decode modes; `gx [T, B, G*H]` in `kernel` mode.
        x: the leaf tensor behind `arg`: `arg` itself, or the packed data `[sum(lengths), I]`.
        step: zero-argument callable running one call in the requested mode.
    """

    module: torch.nn.Module | None
    arg: torch.Tensor | PackedSequence
    x: torch.Tensor
    step: object


def configure(cudnn_fp32=None):
    """Settings every benchmark runs under: strict dispatch (`SEQFAST_STRICT=1`), no TF32 in `torch.matmul`, and
    cuDNN RNNs' float32 precision.

    Args:
        cudnn_fp32: `tf32` or `ieee`, set as `torch.backends.cudnn.rnn.fp32_precision` (seqfast's triton backend
            follows the same flag); None (default) leaves torch's default, `tf32`.
    """
    os.environ["SEQFAST_STRICT"] = "1"
    torch.backends.cuda.matmul.allow_tf32 = False
    if cudnn_fp32 is not None:
        torch.backends.cudnn.rnn.fp32_precision = cudnn_fp32


def providers(device_type, compile=False):
    """Providers for `device_type`: torch first, then seqfast's automatic selection (`AUTO`) and its backends in
    dispatch priority order.

    Args:
        device_type: `cpu` or `cuda`.
        compile: include `torch-compile` (default False).

    Returns:
        `(usable, unusable)`: `list[Provider]`, and `list[(name, reason)]` for backends that do not load here.
    """
    usable, unusable = [TORCH], []
    if compile:
        usable.append(TORCH_COMPILE)
    usable.append(AUTO)
    for name in dispatch.names(device_type):
        try:
            dispatch.load(name)
        except RuntimeError as e:
            unusable.append((f"seqfast-{name}", str(e)))
            continue
        usable.append(Provider(f"seqfast-{name}", name))
    return usable, unusable


def set_threads(threads):
    """Use `threads` intra-op threads in torch and, when it is already imported, numba (first: starting numba's
    OpenMP pool sets the OpenMP thread count, which torch reads as its own)."""
    numba = sys.modules.get("numba")
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)


def flops(shape, mode):
    """Floating point operations of one call, GEMM work only.

    Per layer `l` and direction, each real token costs the input GEMM and the recurrence GEMM,
    `2 * G * H * (I_l + H)` with `G` gates (1, 4 LSTM, 3 GRU) and `I_l = I` for layer 0, `D * H` above it. `fwd`
    and `infer` count that once, `fwdbwd` three times (backward = one GEMM for the state/input gradient and one for
    the weight gradient per forward GEMM). Pointwise gate math is not counted. Padding of a packed batch is not
    counted: tokens are the sum of the lengths.

    A decoder's token costs its recurrent module's `infer` work for one token plus the head, `2 * H * V`
    (`V = DECODER_VOCAB`; the embedding is a lookup). `kernel` mode counts the recurrence GEMM of one layer and
    direction alone, `2 * G * H * H` per token.

    Args:
        shape: `Shape`.
        mode: a mode of `ALL_MODES`.

    Returns:
        `float` FLOPs: `factor * sum_l D * 2 * G * H * (I_l + H) * tokens`.
    """
    G, H, D = GATES[shape.cell], shape.hidden, shape.directions
    if mode == KERNEL:
        return 2 * G * H * H * shape.tokens()
    if shape.is_decoder:
        return (flops(shape.decoder_step(), "infer") / shape.batch + 2 * H * DECODER_VOCAB) * shape.tokens()
    per_token = sum(D * 2 * G * H * ((shape.input_size if layer == 0 else D * H) + H) for layer in range(shape.layers))
    return (3 if mode == "fwdbwd" else 1) * per_token * shape.tokens()


def _module_class(shape, provider):
    """The class `shape` runs through for `provider`: torch.nn's or seqfast's sequence module or cell; for a shape
    with an option, torch's providers run `benchmarks.cell_loop`'s loop of torch ops."""
    if shape.option is not None and provider.backend is None:
        return LOOP_MODULES[shape.cell]
    if shape.is_cell:
        return (_TORCH_CELLS if provider.backend is None else _SEQFAST_CELLS)[shape.cell]
    return (_TORCH_MODULES if provider.backend is None else _SEQFAST_MODULES)[shape.cell]


def _module_kwargs(shape):
    kwargs = {}
    if not shape.is_cell:
        kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional, batch_first=shape.batch_first)
    if shape.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = shape.cell[4:]
    return kwargs | shape.options()


def _state_dict(shape, seed):
    """torch.nn's default initialisation for `shape` in float32 on the CPU, reproducible from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _module_class(shape, TORCH)(shape.input_size, shape.hidden, **_module_kwargs(shape)).state_dict()


def _requested(provider):
    """The `backend=` a seqfast provider's modules get: its backend's name, None for automatic selection."""
    return None if provider == AUTO else provider.backend


def _build(shape, provider, dtype, device, state_dict):
    """The provider's module for `shape` in `dtype` on `device`, loaded (strictly) from `state_dict`."""
    kwargs = _module_kwargs(shape)
    if provider.backend is not None:
        kwargs["backend"] = _requested(provider)
    module = _module_class(shape, provider)(shape.input_size, shape.hidden, dtype=dtype, device=device, **kwargs)
    module.load_state_dict(state_dict, strict=True)
    if provider.compiled:
        import torch._dynamo

        torch._dynamo.config.allow_rnn = True
        module = torch.compile(module)
    return module


def _input(shape, dtype, device, requires_grad, seed, rounding=None):
    """`(leaf, arg)`: what the module is called with, `[T, B, I]` (`[B, T, I]` when `batch_first`, `[B, I]` for a
    cell) or a `PackedSequence` of it, and its leaf tensor (`arg` itself, or the packed data `[sum(lengths), I]`).

    The values are drawn in float32 and rounded through `rounding` (default `dtype`) before the cast to `dtype`.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    if shape.is_cell:
        size = (shape.batch,)
    elif shape.batch_first:
        size = (shape.batch, shape.time)
    else:
        size = (shape.time, shape.batch)
    x = torch.randn(*size, shape.input_size, generator=generator)
    x = x.to(rounding or dtype).to(dtype=dtype, device=device)
    if not shape.packed:
        return x.requires_grad_(requires_grad), x
    packed = pack_padded_sequence(x, shape.lengths(seed), batch_first=shape.batch_first, enforce_sorted=False)
    leaf = packed.data.requires_grad_(requires_grad)
    return leaf, PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def _flatten(out):
    """Every tensor of a module's output in a fixed order, a `PackedSequence` as its data."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)]


def _cotangents(outputs, seed, rounding):
    """Fixed random cotangents for `outputs`, drawn in float32 and rounded through `rounding`."""
    generator = torch.Generator().manual_seed(seed + 2)
    return [torch.randn(o.shape, generator=generator).to(rounding).to(dtype=o.dtype, device=o.device) for o in outputs]


class Decoder(torch.nn.Module):
    """A greedy decoder: token embedding, recurrent module, output head.

    Args:
        embedding: `nn.Embedding(V, I)`.
        rnn: the sequence module (`RNN`, `LSTM`, `GRU`; torch.nn's or seqfast's), time-major.
        head: `nn.Linear(H, V)`.
    """

    def __init__(self, embedding, rnn, head):
        super().__init__()
        self.embedding, self.rnn, self.head = embedding, rnn, head

    def forward(self, token, hx):
        """One decoding step: embed, one `T = 1` call of the recurrent module, the argmax of the head.

        Args:
            token: `[B]` int64.
            hx: the recurrent module's state, `[L, B, H]` (a pair of them for LSTM).

        Returns:
            `(next_token [B], hx)`.
        """
        y, hx = self.rnn(self.embedding(token)[None], hx)
        return self.head(y[0]).argmax(-1), hx


def _decoder(shape, provider, dtype, device, seed):
    """`(decoder, start)`: the `Decoder` of a decoder shape in `dtype` on `device`, its recurrent module the
    provider's (`_build`), embedding and head drawn from `seed`; the start tokens `[B]`, one per row."""
    rnn = _build(shape, provider, dtype, device, _state_dict(shape, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        embedding = torch.nn.Embedding(DECODER_VOCAB, shape.input_size)
        head = torch.nn.Linear(shape.hidden, DECODER_VOCAB)
        start = torch.randint(DECODER_VOCAB, (shape.batch,))
    decoder = Decoder(embedding, rnn, head).to(dtype=dtype, device=device)
    return decoder.eval(), start.to(device)


def _zero_state(shape, dtype, device):
    """The recurrent module's initial state: zeros `[L, B, H]`, a pair of them for LSTM."""
    h = torch.zeros(shape.layers, shape.batch, shape.hidden, dtype=dtype, device=device)
    return (h, torch.zeros_like(h)) if shape.cell == "lstm" else h


def _clone_state(hx):
    """A copy of a recurrent state, outside the memory a CUDA graph replay overwrites."""
    return tuple(h.clone() for h in hx) if isinstance(hx, tuple) else hx.clone()


def _states(hx):
    """The tensors of a recurrent state, `hx` itself or its pair, as a tuple."""
    return tuple(hx) if isinstance(hx, tuple) else (hx,)


def _decode_step(shape, provider, mode, dtype, device, seed):
    """`(decoder, start, step)` for one of `DECODE_MODES`: `step()` decodes `T` tokens from `start`."""
    decoder, start = _decoder(shape, provider, dtype, device, seed)
    state = _zero_state(shape, dtype, device)
    if mode == "decode":

        def step():
            with torch.no_grad():
                token, hx = start, state
                for _ in range(shape.time):
                    token, hx = decoder(token, hx)
            return token

    elif mode == "decode-graph":
        token_in = start.clone()

        def one():
            token, hx = decoder(token_in, state)
            token_in.copy_(token)
            for dst, src in zip(_states(state), _states(hx), strict=True):
                dst.copy_(src)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                one()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            one()

        def step():
            token_in.copy_(start)
            for h in _states(state):
                h.zero_()
            for _ in range(shape.time):
                graph.replay()
            return token_in

    else:
        from torch._dynamo import config as dynamo_config

        torch.compiler.reset()
        dynamo_config.allow_rnn = True
        compiled = torch.compile(decoder, mode="reduce-overhead")

        def step():
            with torch.no_grad():
                token, hx = start, state
                for _ in range(shape.time):
                    torch.compiler.cudagraph_mark_step_begin()
                    token, hx = compiled(token, hx)
                    token, hx = token.clone(), _clone_state(hx)
            return token

        for _ in range(2):
            step()
    return decoder, start, step


def _kernel_tensors(shape, dtype, device, seed):
    """One layer's forward-loop inputs in `dtype` on `device`: `gx [T, B, G*H]`, `w_hh [G*H, H]` and `b_hh [G*H]`
    uniform in `+-1/sqrt(H)` (torch.nn's initialisation), `h0 [B, H]`, `c0 [B, H]` (LSTM, else None), random
    normal; `lengths [B]` for a packed shape, else None."""
    G, H, T, B = GATES[shape.cell], shape.hidden, shape.time, shape.batch
    generator = torch.Generator().manual_seed(seed + 4)
    bound = H**-0.5

    def uniform(*size):
        return ((torch.rand(*size, generator=generator) * 2 - 1) * bound).to(dtype=dtype, device=device)

    def normal(*size):
        return torch.randn(*size, generator=generator).to(dtype=dtype, device=device)

    c0 = normal(B, H) if shape.cell == "lstm" else None
    lengths = shape.lengths(seed).to(device) if shape.packed else None
    return normal(T, B, G * H), uniform(G * H, H), uniform(G * H), normal(B, H), c0, lengths


def unfit(shape, provider, mode, device="cpu"):
    """Why `mode` does not apply to this shape and provider, whatever the backend says (see `unsupported`).

    Args:
        shape: `Shape`; provider: `Provider`; mode: a mode of `ALL_MODES`; device: default `cpu`.

    Returns:
        The reason as a string, or None when the mode applies.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    if mode in DECODE_MODES and not shape.is_decoder:
        return f"{mode} decodes with a decoder shape (module='decoder')"
    if shape.is_decoder and mode not in DECODE_MODES:
        return f"a decoder shape runs in the modes {', '.join(DECODE_MODES)}"
    if mode == "decode-graph" and torch.device(device).type != "cuda":
        return "CUDA graphs need a CUDA device"
    if mode == KERNEL and provider.backend is None:
        return "torch.nn's time loop is not a separate call"
    if mode in DECODE_MODES and provider.compiled:
        return "the decode modes build their own step (decode-compile compiles it)"
    return None


def gate_problem(shape, mode):
    """The shape and mode the gate checks before `mode` is timed on `shape`.

    Returns:
        `(shape, mode)`: a decoder's recurrent module at one step (`shape.decoder_step()`) in `infer`; the shape's
        module in `fwd` for `kernel`; else `shape` and `mode` themselves.
    """
    if shape.is_decoder:
        return shape.decoder_step(), "infer"
    return shape, "fwd" if mode == KERNEL else mode


def setup(shape, provider, mode, dtype=torch.float32, device="cpu", seed=0):
    """Build a module and input for one benchmark, and the callable that runs one call in `mode`.

    Args:
        shape: `Shape`.
        provider: `Provider`.
        mode: a mode of `ALL_MODES` that fits the shape and provider (`unfit` says None).
        dtype: parameter and input dtype (default float32).
        device: `torch.device` or string (default `cpu`).
        seed: weights, input, lengths and cotangents are drawn from it (default 0).

    Returns:
        `Problem`; `step()` runs one forward (`fwd`, `infer`), forward plus `torch.autograd.grad` of the input and
        every parameter (`fwdbwd`), the backend's forward loop on one layer (`kernel`), or decodes `T` tokens (the
        decode modes; `decode-graph` captures its graph and `decode-compile` compiles here, before the first call).

    Raises:
        ValueError: unknown mode, or one that does not fit (the reason from `unfit`).
    """
    reason = unfit(shape, provider, mode, device)
    if reason is not None:
        raise ValueError(f"{mode} on {shape.id} with {provider.name}: {reason}")
    device = torch.device(device)
    if mode in DECODE_MODES:
        decoder, start, step = _decode_step(shape, provider, mode, dtype, device, seed)
        return Problem(decoder, start, start, step)
    if mode == KERNEL:
        gx, w_hh, b_hh, h0, c0, lengths = _kernel_tensors(shape, dtype, device, seed)
        _, backend = dispatch.select_remembered(shape.cell, gx, w_hh, h0, c0, lengths, backend=_requested(provider))

        def step():
            return backend.fwd(shape.cell, gx, w_hh, b_hh, h0, c0, lengths, need_saved=False)

        return Problem(None, gx, gx, step)
    module = _build(shape, provider, dtype, device, _state_dict(shape, seed))
    x, arg = _input(shape, dtype, device, mode != "infer", seed)
    kwargs = shape.call_kwargs(device, seed)
    if mode == "infer":

        def step():
            with torch.no_grad():
                return module(arg, **kwargs)

    elif mode == "fwd":

        def step():
            return module(arg, **kwargs)

    else:
        wrt = [x, *module.parameters()]
        with torch.no_grad():
            cotangents = _cotangents(_flatten(module(arg, **kwargs)), seed, dtype)

        def step():
            return torch.autograd.grad(_flatten(module(arg, **kwargs)), wrt, cotangents)

    return Problem(module, arg, x, step)


def unsupported(shape, provider, dtype=torch.float32, device="cpu"):
    """Why a seqfast provider's backend declines `shape`, asked through dispatch with the first layer's tensors.

    Args:
        shape: `Shape`; provider: `Provider`; dtype: default float32; device: default `cpu`.

    Returns:
        The reason as a string, or None when it can run (always None for the torch providers).
    """
    if provider.backend is None:
        return None
    device = torch.device(device)
    G, H, T, B = GATES[shape.cell], shape.hidden, shape.time, shape.batch
    gx = torch.empty(T, B, G * H, dtype=dtype, device=device)
    w_hh = torch.empty(G * H, H, dtype=dtype, device=device)
    h0 = torch.zeros(B, H, dtype=dtype, device=device)
    c0 = h0 if shape.cell == "lstm" else None
    lengths = shape.lengths().to(device) if shape.packed else None
    options = () if shape.option is None else (shape.option,)
    try:
        dispatch.select(shape.cell, gx, w_hh, h0, c0, lengths, None, backend=_requested(provider), options=options)
    except RuntimeError as e:
        return str(e)
    return None


def _gate_values(shape, provider, mode, dtype, device, seed, rounding):
    """Outputs, and for `fwdbwd` the input and parameter gradients, of one call, with their names.

    Weights, input and cotangents are rounded through `rounding`, so runs in different dtypes see the same values;
    the call starts from the same random state for every provider (zoneout's masks).
    """
    state_dict = {k: v.to(rounding) for k, v in _state_dict(shape, seed).items()}
    module = _build(shape, provider, dtype, device, state_dict)
    x, arg = _input(shape, dtype, device, mode == "fwdbwd", seed, rounding)
    torch.manual_seed(seed + 4)
    with torch.set_grad_enabled(mode != "infer"):
        outputs = _flatten(module(arg, **shape.call_kwargs(device, seed)))
    names = (["h'", "c'"] if shape.is_cell else ["output", "h_n", "c_n"])[: len(outputs)]
    if mode != "fwdbwd":
        return [o.detach() for o in outputs], names
    params = list(module.named_parameters())
    grads = torch.autograd.grad(outputs, [x] + [p for _, p in params], _cotangents(outputs, seed, rounding))
    return [o.detach() for o in outputs] + list(grads), names + ["grad input"] + [f"grad {n}" for n, _ in params]


def _oracle_dtype(dtype, device, shape):
    """The oracle's dtype: float64 for float64, on CUDA (cuDNN in double) and for a shape with an option (the cell
    loop of `benchmarks.cell_loop` in float32 is no closer to exact than the kernels: LayerNorm's division by each
    row's spread magnifies float32 rounding over the steps); float32 otherwise."""
    exact = dtype == torch.float64 or device.type == "cuda" or shape.option is not None
    return torch.float64 if exact else torch.float32


@functools.lru_cache(maxsize=1)
def _oracle(shape, mode, dtype, device, seed):
    """torch.nn's `_gate_values` in `_oracle_dtype`; cached for the providers of one problem."""
    return _gate_values(shape, TORCH, mode, _oracle_dtype(dtype, device, shape), device, seed, dtype)


def _compare(actual, expected, names):
    """`(error, name, failure)`: the worst relative RMS error of `actual` against `expected` and its tensor's name,
    or `failure`, a message, when a tensor is missing, of another shape or not finite (then `error` is None)."""
    worst, worst_name = 0.0, names[0]
    for a, e, name in zip(actual, expected, names, strict=True):
        if a is None or a.shape != e.shape:
            return None, name, f"{name}: {None if a is None else tuple(a.shape)} != {tuple(e.shape)}"
        if not torch.isfinite(a).all():
            return None, name, f"{name}: non-finite values"
        diff = (a.double() - e.double()).norm()
        scale = e.double().norm()
        err = (diff / scale).item() if scale > 0 else diff.item()
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name, None


@functools.lru_cache(maxsize=1)
def _torch_error(shape, mode, dtype, device, seed):
    """`(error, name, failure)` of `_compare` for torch.nn itself in `dtype` against the oracle (`0.0` without
    computing when the oracle is torch.nn in `dtype`); cached like `_oracle`."""
    expected, names = _oracle(shape, mode, dtype, device, seed)
    if _oracle_dtype(dtype, device, shape) == dtype:
        return 0.0, names[0], None
    try:
        actual, _ = _gate_values(shape, TORCH, mode, dtype, device, seed, dtype)
    except Exception as e:  # noqa: BLE001 - torch.nn's own failure is the torch provider's gate result
        return None, names[0], f"{type(e).__name__}: {e}".splitlines()[0]
    return _compare(actual, expected, names)


def gate(shape, provider, mode, dtype=torch.float32, device="cpu", seed=0):
    """Correctness gate: the provider against torch.nn on this shape, before any timing.

    The oracle is torch.nn (for a shape with an option, the same math as a cell loop) in float64 for float64, on CUDA
    (cuDNN in double) and for an option's shape, in float32 otherwise, built from the same weights and fed the same
    input and cotangents, rounded to `dtype` first. Compared by relative RMS error: the
    outputs (`output`, `h_n`, `c_n`; a cell's `h'`, `c'`), and for `fwdbwd` also the gradients of the input and every
    parameter.

    torch.nn itself (the `torch` provider) is always timed; its own error against the oracle is its `error`. Any
    other provider passes when its error is at most `max(TOLERANCES[dtype], 2 * torch.nn's own error)` on the same
    problem in the same dtype: float32 on CUDA runs cuDNN's products in TF32 by default and long bfloat16 sequences
    accumulate rounding, so torch.nn's own error exceeds the fixed tolerances there, and seqfast promises parity
    with torch.nn, not exact arithmetic. On the CPU in float32 the oracle is torch.nn in float32, its own error 0,
    so the fixed tolerance applies (but for an option's shape, whose cell loop's own float32 error counts as on CUDA).

    Args:
        shape: `Shape`; provider: `Provider`; mode: `fwd`, `fwdbwd` or `infer` (see `gate_problem` for the others).
        dtype: default float32; device: default `cpu`; seed: default 0.

    Returns:
        `GateResult`; a provider whose call raises fails with the exception as its message.
    """
    device = torch.device(device)
    base = TOLERANCES[dtype]
    own, own_name, own_failure = _torch_error(shape, mode, dtype, device, seed)
    if provider == TORCH:
        if own_failure is not None:
            return GateResult(False, None, base, own_failure)
        oracle = str(_oracle_dtype(dtype, device, shape)).removeprefix("torch.")
        return GateResult(True, own, base, f"torch.nn's own error: {own_name}: rel RMS {own:.2e} vs {oracle}")
    tol = base if own is None else max(base, 2 * own)
    expected, names = _oracle(shape, mode, dtype, device, seed)
    try:
        actual, _ = _gate_values(shape, provider, mode, dtype, device, seed, dtype)
    except Exception as e:  # noqa: BLE001 - any failure of the provider fails its gate, with the reason
        return GateResult(False, None, tol, f"{type(e).__name__}: {e}".splitlines()[0])
    worst, worst_name, failure = _compare(actual, expected, names)
    if failure is not None:
        return GateResult(False, None, tol, failure)
    passed = worst <= tol
    own_text = "failed" if own is None else f"{own:.2e}"
    return GateResult(
        passed,
        worst,
        tol,
        f"{worst_name}: rel RMS {worst:.2e} {'<=' if passed else '>'} {tol:.2e} = max({base:.0e}, 2 x torch.nn's "
        f"own {own_text})",
    )


def time_fn(fn, device="cpu", threads=None, min_run_time=0.2):
    """Time a zero-argument callable after one warm-up call.

    CPU: `torch.utils.benchmark.Timer.blocked_autorange`, then more blocks of the same size until there are
    `MIN_SAMPLES`; the median and the 20th / 80th percentiles of the per-block times. CUDA: `triton.testing.do_bench`
    with quantiles `(0.5, 0.2, 0.8)`.

    Args:
        fn: the callable.
        device: where it runs (default `cpu`).
        threads: CPU intra-op threads, None (default) for the current `torch.get_num_threads()`.
        min_run_time: seconds of CPU timing to collect (default 0.2).

    Returns:
        `Timing` in seconds.
    """
    device = torch.device(device)
    fn()
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(median * 1e-3, p20 * 1e-3, p80 * 1e-3, None)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < MIN_SAMPLES:
        times += timer.timeit(m.number_per_run).times
    return _summary(times)


def time_in_turns(fns, device="cpu", threads=None, min_run_time=0.2):
    """Time zero-argument callables against each other: `time_fn` for each on CUDA or when there is one; on CPU in
    rounds, one block of calls of each per round, the first callable of a round moving on by one each time, until
    each has `MIN_SAMPLES` blocks and `min_run_time` seconds of them. A machine whose speed drifts over seconds (a
    shared VM's) then slows all of them alike, and none always runs right after the same other; the medians of
    callables timed one after the other, each in its own 0.2 s, moved 20-50% between runs on such a machine.

    Args:
        fns: the callables; device, threads, min_run_time: as in `time_fn`.

    Returns:
        `list[Timing]`, in the order of `fns`.
    """
    device = torch.device(device)
    if device.type == "cuda" or len(fns) < 2:
        return [time_fn(fn, device, threads, min_run_time) for fn in fns]
    from torch.utils.benchmark import Timer

    timers = [Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads()) for fn in fns]
    for fn in fns:
        fn()
    # each callable's block size, from a short run that also warms it up
    blocks = [timer.blocked_autorange(min_run_time=min_run_time / MIN_SAMPLES).number_per_run for timer in timers]
    times, spent = [[] for _ in fns], [0.0] * len(fns)
    while min(map(len, times)) < MIN_SAMPLES or min(spent) < min_run_time:
        first = len(times[0]) % len(fns)
        for i in [*range(first, len(fns)), *range(first)]:
            (seconds,) = timers[i].timeit(blocks[i]).times
            times[i].append(seconds)
            spent[i] += seconds * blocks[i]
    return [_summary(t) for t in times]


def _summary(times):
    """`Timing` of per-call `times`, one per block: their median and 20th / 80th percentiles."""
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(quantiles).tolist()
    return Timing(median, p20, p80, len(times))


def time_provider(shape, provider, mode, dtype=torch.float32, device="cpu", threads=None, min_run_time=0.2):
    """Time one provider on one shape and mode (no gate; see `gate`).

    Args:
        shape: `Shape`; provider: `Provider`; mode: a mode of `ALL_MODES` that fits them (see `setup`).
        dtype: default float32; device: default `cpu`; threads: default current; min_run_time: default 0.2 s.

    Returns:
        `Timing` in seconds per call.
    """
    return time_fn(setup(shape, provider, mode, dtype, device).step, device, threads, min_run_time)


def gemm_size(dtype, device):
    """The matrix size `gemm_rate` times for `dtype` on `device` (a `torch.device` or its type): `GEMM_SIZE`, or
    `CPU_FLOAT16_GEMM_SIZE` for float16 on CPU."""
    on_cpu = torch.device(device).type == "cpu"
    return CPU_FLOAT16_GEMM_SIZE if on_cpu and dtype == torch.float16 else GEMM_SIZE


def gemm_rate(dtype=torch.float32, device="cpu", threads=None, min_run_time=0.2, n=None):
    """The reference GEMM rate: the faster of `torch.mm` and seqfast's own GEMM (`seqfast.linear.dense`, oneDNN for CPU
    float32, about twice MKL's rate on AMD CPUs) on two `[n, n]` matrices in `dtype`.

    Args:
        dtype: default float32; device: default `cpu`; threads: default current;
        min_run_time: CPU seconds timed, at least `GEMM_MIN_RUN_TIME` = 1 s (default 0.2);
        n: matrix size (default `gemm_size(dtype, device)`).

    Returns:
        `float` GFLOP/s at the median time, `2 n^3 / t`.
    """
    n = gemm_size(dtype, device) if n is None else n
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(dtype=dtype, device=device) for _ in range(2))
    run_time = max(min_run_time, GEMM_MIN_RUN_TIME)
    best = min(time_fn(fn, device, threads, run_time).median for fn in (lambda: torch.mm(a, b), lambda: dense(a, b.T)))
    return 2 * n**3 / best / 1e9


def cache_dir():
    """seqfast's folder in the user's cache: `$XDG_CACHE_HOME/seqfast`, or `~/.cache/seqfast` when that is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqfast"


def gemm_record_path():
    """The file keeping the best `gemm_rate` measured on this machine, `cache_dir() / "gemm-rates.json"`."""
    return cache_dir() / "gemm-rates.json"


def _gemm_key(device, threads, dtype_name):
    return f"{device} {threads} threads {dtype_name} torch {torch.__version__}"


def _gemm_records():
    path = gemm_record_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def best_gemm_rate(device, threads, dtype_name):
    """The best GEMM rate recorded on this machine by `record_gemm_rate`.

    Args:
        device: device name (`device_name`); threads: thread count; dtype_name: e.g. `float32`.

    Returns:
        `float` GFLOP/s, or None before the first record for this device, thread count, dtype and torch version.
    """
    return _gemm_records().get(_gemm_key(device, threads, dtype_name))


def record_gemm_rate(device, threads, dtype_name, rate):
    """Keep `rate` (GFLOP/s) in `gemm_record_path()` when it beats the best one recorded for this device, thread
    count, dtype and torch version.

    Args:
        device: device name (`device_name`); threads: thread count; dtype_name: e.g. `float32`; rate: GFLOP/s.
    """
    records = _gemm_records()
    key = _gemm_key(device, threads, dtype_name)
    if rate <= records.get(key, 0.0):
        return
    records[key] = rate
    path = gemm_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    scratch.replace(path)


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device="cpu"):
    """A file-name-safe device name: `cpu-<model>` or `cuda-<model>`, e.g. `cpu-amd-epyc`.

    Args:
        device: `torch.device` or string (default `cpu`).

    Returns:
        `str`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    model = cpuinfo().get("model name") or platform.processor() or platform.machine()
    return "cpu-" + _slug(model)


def _git_sha():
    """Short HEAD commit of the checkout holding this file, `+dirty` with uncommitted tracked changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@functools.cache
def _driver_version():
    """The NVIDIA driver's version from `nvidia-smi`, `""` where it does not answer."""
    try:
        process = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = process.stdout.strip().splitlines()
    return lines[0].strip() if process.returncode == 0 and lines else ""


def gpu_facts(device="cpu"):
    """The GPU and its software as the figures depend on them.

    Args:
        device: `torch.device` or string (default `cpu`).

    Returns:
        `dict` with `gpu` (name), `driver`, `cuda` (torch's CUDA version), `cudnn`, `triton` (versions) and
        `fp32_precision` (`torch.backends.cudnn.rnn.fp32_precision` now: cuDNN RNNs run float32 products in TF32 when
        it is `tf32`, torch's default); all empty strings on a CPU device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return dict.fromkeys(("gpu", "driver", "cuda", "cudnn", "triton", "fp32_precision"), "")
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    return dict(
        gpu=torch.cuda.get_device_name(device),
        driver=_driver_version(),
        cuda=torch.version.cuda or "",
        cudnn=str(torch.backends.cudnn.version() or ""),
        triton=triton,
        fp32_precision=torch.backends.cudnn.rnn.fp32_precision,
    )


def environment(device="cpu"):
    """Facts recorded with every result row.

    Args:
        device: `torch.device` or string (default `cpu`).

    Returns:
        `dict` with `timestamp` (UTC, ISO 8601), `device`, `torch`, `python`, `seqfast`, `git_sha`, the
        `cpu_facts()` and the `gpu_facts(device)`.
    """
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device),
        torch=torch.__version__,
        python=platform.python_version(),
        seqfast=seqfast.__version__,
        git_sha=_git_sha(),
        **cpu_facts(),
        **gpu_facts(device),
    )


def measure(shape, provider, mode, dtype=torch.float32, device="cpu", threads=None, min_run_time=0.2):
    """`measure_in_turns` of one provider.

    Returns:
        The provider's `dict`.
    """
    return measure_in_turns(shape, [provider], mode, dtype, device, threads, min_run_time)[0]


def measure_in_turns(shape, providers, mode, dtype=torch.float32, device="cpu", threads=None, min_run_time=0.2):
    """Gate each provider on one shape and mode, then time those that pass against each other (`time_in_turns`).

    The gate checks `gate_problem(shape, mode)`: a decoder's recurrent module at one step, the module in `fwd` for
    `kernel` mode.

    Args:
        shape: `Shape`; providers: `Provider`s; mode: a mode of `ALL_MODES`.
        dtype: default float32; device: default `cpu`; threads: default current; min_run_time: default 0.2 s.

    Returns:
        A `dict` per provider, in order, with `status` (`ok`, `UNSUPPORTED`, `FAILED-GATE` or `ERROR`), `message`,
        `gate_err`, `gate_tol`, and when `ok` also `median_ms`, `p20_ms`, `p80_ms`, `samples`, `tokens_per_s` (real
        tokens per second), `gflops` (`flops(shape, mode)` per second, in GFLOP/s) and `step_us` (microseconds per
        time step: per decoded token in the decode modes).
    """
    rows, steps = [], {}
    for i, provider in enumerate(providers):
        row = dict(status="ok", message="", gate_err=None, gate_tol=TOLERANCES[dtype])
        rows.append(row)
        reason = unfit(shape, provider, mode, device) or unsupported(shape, provider, dtype, device)
        if reason is not None:
            row |= dict(status="UNSUPPORTED", message=reason)
            continue
        gate_shape, gate_mode = gate_problem(shape, mode)
        result = gate(gate_shape, provider, gate_mode, dtype, device)
        row |= dict(gate_err=result.error, gate_tol=result.tol, message=result.message)
        if not result.passed:
            row["status"] = "FAILED-GATE"
            continue
        try:
            step = setup(shape, provider, mode, dtype, device).step
            step()
        except Exception as e:  # noqa: BLE001 - a provider that passes its gate but fails when run is reported
            row |= dict(status="ERROR", message=f"{type(e).__name__}: {e}".splitlines()[0])
            continue
        steps[i] = step
    timings = time_in_turns(list(steps.values()), device, threads, min_run_time)
    for i, timing in zip(steps, timings, strict=True):
        rows[i] |= dict(
            median_ms=timing.median * 1e3,
            p20_ms=timing.p20 * 1e3,
            p80_ms=timing.p80 * 1e3,
            samples=timing.samples,
            tokens_per_s=shape.tokens() / timing.median,
            gflops=flops(shape, mode) / timing.median / 1e9,
            step_us=timing.median * 1e6 / shape.time,
        )
    return rows


def warm(shape, provider, mode, dtype_name, device, cudnn_fp32=None):
    """Run a provider once on a copy of `shape` at most two steps long, timing nothing: it compiles the kernel
    variants a timed run of `shape` uses (they do not depend on `T`) into the on-disk caches. The runner's `--warm`
    calls it in worker processes.

    Args:
        shape: `Shape`; provider: `Provider`; mode: a mode of `ALL_MODES`; dtype_name: a key of `DTYPES`;
        device: `torch.device` or string; cudnn_fp32: as in `configure` (default None).

    Returns:
        None, or the failure's text (the timed run gates and reports it again).
    """
    configure(cudnn_fp32)
    short = dataclasses.replace(shape, time=min(shape.time, 2))
    dtype = DTYPES[dtype_name]
    if unfit(short, provider, mode, device) or unsupported(short, provider, dtype, device):
        return None
    try:
        setup(short, provider, mode, dtype, device).step()
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised, from a worker process
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def kept_cache_variable(provider):
    """The environment variable naming the on-disk cache a provider's first call fills (`NUMBA_CACHE_DIR`,
    `TRITON_CACHE_DIR`; `XDG_CACHE_HOME` for automatic selection, whose calibrations live there), None for a
    provider that keeps nothing between processes."""
    return _KEPT_CACHES.get(provider.backend)


def first_call(provider, device="cpu", threads=None, cache_dir=None, timeout=900):
    """One cold start of `provider` in a fresh interpreter (`python -m benchmarks.first_call`), under strict
    dispatch.

    Args:
        provider: `Provider` (`torch`, `seqfast` or `seqfast-<backend>`; `torch-compile` is not measured).
        device: `cpu` (default) or `cuda`.
        threads: torch intra-op threads in that process, None (default) for its default.
        cache_dir: the provider's kept cache folder for that process (`kept_cache_variable`): a fresh one for
            a cold start, one filled by an earlier run for a warm one; None (default) inherits this process's.
        timeout: seconds before the process is killed (default 900).

    Returns:
        The `dict` of `benchmarks.first_call.measure`.

    Raises:
        RuntimeError: the process failed or timed out; the message ends with its last line of stderr.
    """
    env = os.environ | {"SEQFAST_STRICT": "1"}
    if cache_dir is not None:
        env[kept_cache_variable(provider)] = str(cache_dir)
    device = torch.device(device)
    command = [sys.executable, "-m", "benchmarks.first_call", "--provider", provider.name, "--device", str(device)]
    if threads is not None:
        command += ["--threads", str(threads)]
    try:
        process = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{provider.name} first call still running after {timeout} s") from e
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{provider.name} first call exited with {process.returncode}: {last}")
    return json.loads(process.stdout.strip().splitlines()[-1])
