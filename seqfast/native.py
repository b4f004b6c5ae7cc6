"""The `native` backend: torch's own recurrent op (ATen: oneDNN's fused LSTM on CPU, cuDNN on CUDA) for a whole
module call, so the results are torch.nn's own.

Automatic selection routes a module call here only where torch's op is the faster one on this machine: an eager
call (see `seqfast.functional.eager`) of an LSTM on CPU in float32, without projection, unpacked, with oneDNN
enabled (the case torch runs on oneDNN's fused kernel), for which a calibration timed both. The calibration runs on
the first such call of a shape class (`_key`): a warm-up and three runs each way on the call's own tensors (forwards,
and with grad the backward of the output too, leaving every `.grad` and the random state as they were), the faster
kept when it wins by more than `_MARGIN`. Its answers are kept per machine in
`$XDG_CACHE_HOME/seqfast/native.json` (default `~/.cache/seqfast/`), keyed by CPU model, torch version and thread
count. `SEQFAST_NATIVE=0` never routes here, `SEQFAST_NATIVE=1` routes every call that can run here, unset
calibrates. `backend="native"` (or `SEQFAST_BACKEND=native`) runs a module's call here whatever its shape; the cells
and single layers run seqfast's kernels only, so this backend declines them.
"""

import json
import os
import time
from pathlib import Path

import torch
from torch import _VF
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import dispatch

DEVICES = ("cpu", "cuda")

_OPS = {"rnn_tanh": _VF.rnn_tanh, "rnn_relu": _VF.rnn_relu, "lstm": _VF.lstm, "gru": _VF.gru}

# torch's op must beat seqfast's by this share to be chosen: on a tie seqfast's kernels run.
_MARGIN = 0.05
_TIMED_RUNS = 3


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """The dispatch table's question for one layer's time loop, which this backend never runs.

    Returns:
        The reason, always.
    """
    return "native runs whole module calls (RNN, LSTM, GRU) through torch's own op, not one layer's time loop"


def rnn(cell, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths):
    """`seqfast.functional.rnn` through torch's own op (same arguments, no backend).

    Returns:
        `y [T, B, D*P]` (zeros past each length), `hn [L*D, B, P]`, `cn [L*D, B, H]` or None.
    """
    flat = [t for w in weights for t in w if t is not None]
    has_biases = weights[0][2] is not None
    hx = (h0, c0) if cell == "lstm" else h0
    args = (hx, flat, has_biases, num_layers, dropout, training, bidirectional)
    if lengths is None:
        out = _OPS[cell](x, *args, False)
        y = out[0]
    else:
        packed = pack_padded_sequence(x, lengths.cpu())
        out = _OPS[cell](packed.data, packed.batch_sizes, *args)
        y, _ = pad_packed_sequence(type(packed)(out[0], packed.batch_sizes), total_length=x.shape[0])
    return y, out[1], out[2] if cell == "lstm" else None


def route(cell, x, h0, c0, weights, num_layers, bidirectional, lengths, ours, theirs):
    """Whether an automatic eager module call runs on torch's own op (see the module docstring).

    Args:
        cell, x, h0, c0, weights, num_layers, bidirectional, lengths: the call's, as in `seqfast.functional.rnn`.
        ours, theirs: zero-argument callables running the call on seqfast's kernels and on torch's op, returning its
            outputs; timed when the shape class has not been calibrated yet.

    Returns:
        `bool`.
    """
    setting = dispatch.env("SEQFAST_NATIVE")
    if setting == "0" or not _torch_is_fused(cell, x, weights, lengths):
        return False
    if setting == "1":
        return True
    key = _key(x, h0, weights, num_layers, bidirectional)
    choices = _choices()
    if key not in choices:
        tensors = (x, h0, c0, *(t for w in weights for t in w))
        wrt = [t for t in tensors if t is not None and t.requires_grad] if torch.is_grad_enabled() else []
        choices[key] = _calibrate(ours, theirs, wrt)
        _save(choices)
    return choices[key]


def _torch_is_fused(cell, x, weights, lengths):
    """torch.nn runs this call on oneDNN's fused LSTM: CPU, float32, no projection, unpacked, oneDNN enabled."""
    return (
        cell == "lstm"
        and lengths is None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weights[0][4] is None
        and x.numel() != 0
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
    )


def _bucket(n):
    """`n` rounded up to a power of two: shapes in one bucket share a calibration."""
    return 1 << max(n - 1, 0).bit_length()


def _key(x, h0, weights, num_layers, bidirectional):
    T, B, I = x.shape
    H = weights[0][1].shape[1]
    bias = weights[0][2] is not None
    return f"I{I}-H{H}-B{_bucket(B)}-T{_bucket(T)}-L{num_layers}-D{2 if bidirectional else 1}-bias{int(bias)}-" + (
        f"threads{torch.get_num_threads()}-grad{int(torch.is_grad_enabled())}"
    )


def _calibrate(ours, theirs, wrt):
    """True when `theirs` is faster than `ours` by more than `_MARGIN`: the best of `1 + _TIMED_RUNS` runs each (the
    first warms up), a run being a forward and, when `wrt` is not empty, the gradients of the output's sum with respect to `wrt` (returned, not
    accumulated), under a forked random state (dropout draws none of the caller's numbers)."""

    def timed(run):
        start = time.perf_counter()
        with torch.set_grad_enabled(bool(wrt)):
            y = run()[0]
            if wrt:
                torch.autograd.grad(y.sum(), wrt, allow_unused=True)
        return time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):
        best = [min(timed(run) for _ in range(1 + _TIMED_RUNS)) for run in (ours, theirs)]
    return best[1] < (1 - _MARGIN) * best[0]


def cache_path():
    """Where the calibrations are kept: `$XDG_CACHE_HOME/seqfast/native.json` (default `~/.cache/seqfast/`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqfast" / "native.json"


_machine_choices = None


def _machine():
    """This machine's entry in the cache file: CPU model and torch version."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or os.uname().machine} torch {torch.__version__}"


def _choices():
    """This machine's calibrations, `{key: bool}`, read from the cache file on first use."""
    global _machine_choices
    if _machine_choices is None:
        try:
            saved = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            saved = {}
        _machine_choices = saved.get(_machine(), {}) if isinstance(saved, dict) else {}
    return _machine_choices


def _save(choices):
    """Write this machine's calibrations back, keeping other machines' entries; a cache that cannot be written only
    costs a calibration per process."""
    path = cache_path()
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(saved, dict):
            saved = {}
        saved[_machine()] = choices
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(saved, indent=1, sort_keys=True))
        temporary.replace(path)
    except (OSError, ValueError):
        pass
