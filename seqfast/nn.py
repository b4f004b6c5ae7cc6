"""Drop-in replacements for torch.nn's recurrent modules.

They subclass `torch.nn.RNNBase` / `torch.nn.RNNCellBase` (not `torch.nn.LSTM` & co., which Dynamo refuses), so
parameters, `state_dict`, `repr`, `flatten_parameters`, `all_weights`, hooks and initialisation are torch's own;
only `forward` is replaced. Weights are read from the module at every call, so in-place edits, reassigned
parameters, parametrizations and `torch.func.functional_call` take effect.
"""

import copy
from itertools import chain

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import dispatch, functional, native
from .functional import CELL_OF_MODE
from .kernels.common import empty, extension, poisoning


def _type_name(dtype):
    """torch's C++ scalar type name (`Float`, `Double`, `BFloat16`) used in its error messages."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


_AUTOCAST_DEVICES = ("cuda", "cpu")
_autocast = torch._C._is_any_autocast_enabled
# read once: Dynamo does not trace `torch.backends.mkldnn.is_available`, and a compiled call under autocast asks it
_MKLDNN = torch.backends.mkldnn.is_available()


def _autocast_dtype(tensor):
    """The dtype autocast casts `tensor` to on its device, or None when autocast is off there or leaves `tensor`
    alone (as it does float64)."""
    if not _autocast() or tensor.dtype == torch.float64:
        return None
    device = tensor.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(dtype, *tensors):
    """`tensors` in `dtype` (differentiably), None kept."""
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def _rounded(dtype, *tensors):
    """`tensors` rounded to `dtype` and back in float32 (differentiably), None kept: the operands autocast gives a
    GEMM, in the dtype the CPU kernels compute in."""
    return tuple(t if t is None else t.to(dtype).float() for t in tensors)


def _cpu_autocast_dtypes(cell, dtype, states, onednn, proj):
    """`(h, c)`: the dtypes of torch.nn's outputs and states (`c` for LSTM) under CPU autocast in `dtype`.

    On CPU torch's recurrent ops are not on autocast's lists, only the GEMMs inside them: the gates come out in
    `dtype` and each state follows type promotion with the one it updates (GRU `h`, LSTM `c`; RNN replaces `h` by
    its gates, a projection replaces LSTM's `h` by a GEMM). `onednn`: the LSTM runs oneDNN's `mkldnn_rnn_layer`,
    which is on the list and returns everything in `dtype`.
    """
    if cell in ("rnn_tanh", "rnn_relu") or onednn:
        return dtype, dtype
    state = torch.promote_types(states[-1].dtype, dtype)
    return (dtype if proj else state), state


def _run_autocast(run, cell, x, states, weights, module=False, unpacked=False):
    """`run(x, states, weights) -> (y, hT, cT)` (`y` None for a cell) as torch.nn runs under autocast on `x`'s device.

    CUDA casts the whole recurrent op (every tensor, outputs in the autocast dtype); a module's op that runs on cuDNN
    is cast to float16 whatever the autocast dtype, as torch's autocast wrapper of cuDNN's RNN does. On CPU the GEMM
    operands are rounded to the autocast dtype and the kernels run in float32 with CPU autocast off; the outputs
    take torch.nn's dtypes (see `_cpu_autocast_dtypes`).

    Args:
        weights: `(w_ih, w_hh, b_ih, b_hh)` per layer-direction, plus LSTM's `w_hr` (or None) for a module.
        module: a module's call (default False: a cell's).
        unpacked: a module's unpacked sequence, on which torch.nn runs a float32 LSTM without projection on oneDNN
            (when enabled); default False (cells, `PackedSequence`).
    """
    dtype = _autocast_dtype(x)
    if dtype is None:
        return run(x, states, weights)
    if x.device.type != "cpu":
        if module and x.device.type == "cuda" and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available():
            dtype = torch.float16
        return run(*_cast(dtype, x), _cast(dtype, *states), [_cast(dtype, *w) for w in weights])
    proj = len(weights[0]) == 5 and weights[0][4] is not None
    onednn = cell == "lstm" and unpacked and not proj and x.dtype == torch.float32 and x.numel() != 0
    onednn = onednn and _MKLDNN and torch.backends.mkldnn.enabled
    h_dtype, c_dtype = _cpu_autocast_dtypes(cell, dtype, states, onednn, proj)
    with torch.autocast("cpu", enabled=False):
        y, hT, cT = run(*_rounded(dtype, x), _cast(torch.float32, *states), [_rounded(dtype, *w) for w in weights])
    return None if y is None else y.to(h_dtype), hT.to(h_dtype), None if cT is None else cT.to(c_dtype)


def _native_under_autocast(backend, x, tensors, routed):
    """Whether an eager call of `x` (with `tensors`) under CPU autocast runs torch's own op (`seqfast.native`): where
    asked for (`backend` or `SEQFAST_BACKEND` is `native`), or under automatic selection where `routed()` answers
    True (`seqfast.native.route` or `route_step`). Under CPU autocast oneDNN's LSTM and torch's cell GEMMs take 16-bit
    operands, which on a CPU with AMX ran `LSTM(128, 256)` B16 T32 in 0.9 ms against 1.7 ms for seqfast's float32
    loops on rounded operands (Xeon model 167, 2 threads); a routed call gives torch.nn's own results."""
    if not x.is_cpu or not torch.is_autocast_enabled("cpu") or not functional.eager(x, *tensors, autocast=True):
        return False
    requested = backend or dispatch.env("SEQFAST_BACKEND")
    return requested == "native" or requested is None and routed()


def _check_same_dtype(state, weight, bias=None):
    """Raise torch's own error for `state @ weight.T (+ bias)` with mismatched dtypes (its text depends on `bias`)."""
    if state.dtype != weight.dtype and not torch.is_autocast_enabled(state.device.type):
        torch.nn.functional.linear(state.new_zeros(0, weight.shape[1]), weight, bias)
        raise RuntimeError(
            f"mat1 and mat2 must have the same dtype, but got {_type_name(state.dtype)} and {_type_name(weight.dtype)}"
        )


def _check_packed_lstm_state(hx):
    """torch.nn checks a packed LSTM's `hx` only in its C++ loop; the same failures raise the same exception types."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"LSTM: hx for a PackedSequence must be a tuple (h_0, c_0) of tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")
    if hx[0].dim() != 3 or hx[1].dim() != 3:
        raise IndexError(f"LSTM: h_0 and c_0 for a PackedSequence must be 3-D, got ({hx[0].dim()}-D, {hx[1].dim()}-D)")


def _check_same_device(input, states, weight):
    device = input.device
    for state in states:
        if state.device != device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{device} and hidden tensor at {state.device}"
            )
    if weight.device != device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{device} and parameter tensor at {weight.device}"
        )


def _live(module, names):
    """The module's tensors named `names`, read now: from `_parameters` (where `torch.func.functional_call` swaps
    them in too), else through `getattr` (a parametrized or otherwise computed attribute)."""
    params = module._parameters
    return [params[n] if n in params else getattr(module, n) for n in names]


def _check_options(layer_norm, zoneout):
    """Raise for a bad `layer_norm` or `zoneout` constructor argument."""
    if not isinstance(layer_norm, bool):
        raise TypeError(f"layer_norm must be a bool, got {layer_norm!r}")
    if isinstance(zoneout, bool) or not isinstance(zoneout, (int, float)) or not 0 <= zoneout < 1:
        raise ValueError(f"zoneout must be a number in [0, 1), got {zoneout!r}")


def _layer_norm_parameters(w_ih, hidden, lstm):
    """`(name, tensor)` of one layer-direction's `layer_norm` parameters, in registration order: the gains of the
    input and recurrent products' LayerNorms `[G*H]` (ones, G*H = `w_ih`'s rows), then LSTM's gain (ones) and bias
    (zeros) of the cell state's `[H]`; the names lack the `_l{k}{suffix}` a module adds."""
    ones = {"device": w_ih.device, "dtype": w_ih.dtype}
    params = [
        ("ln_ih_weight", torch.ones(w_ih.shape[0], **ones)),
        ("ln_hh_weight", torch.ones(w_ih.shape[0], **ones)),
    ]
    if lstm:
        params += [("ln_c_weight", torch.ones(hidden, **ones)), ("ln_c_bias", torch.zeros(hidden, **ones))]
    return params


def _reset_layer_norm(module):
    """Put every `layer_norm` parameter of `module` back to its initial value (gains 1, bias 0)."""
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("ln_"):
                param.fill_(0.0 if name.startswith("ln_c_bias") else 1.0)


def _check_no_options_in_onnx(extended):
    """ONNX export runs torch.nn's forward, which has none of seqfast's options: refuse a call that uses them."""
    if extended:
        raise RuntimeError("seqfast: ONNX export of a call with resets, layer_norm or zoneout is not supported")


def _options_repr(module):
    """The `repr` suffix of the options that are on."""
    s = ""
    for name in ("weight_drop", "layer_norm", "zoneout"):
        value = getattr(module, name, None)
        if value:
            s += f", {name}={value}"
    return s


PATCHED = "_seqfast_patched"
"""Name of the instance attribute `seqfast.patch` sets (True) on a module whose class it swapped."""
PATCH_ATTRIBUTES = (PATCHED, "backend")
"""Instance attributes `seqfast.patch` may add, which `unpatch` and saving a patched module drop."""


class _TorchTwin:
    """What the six modules share as twins of a torch.nn class (`_torch_class`).

    A module that `seqfast.patch` made from a torch.nn one pickles (`torch.save`, `pickle`) as that torch.nn module,
    without the attributes the patch added: its checkpoint loads where seqfast is not installed, and under
    `weights_only=True` with torch.nn's classes allow-listed; the loaded module is plain torch.nn, to patch again at
    will. A module built as a seqfast class pickles as itself. Copies (`copy.copy`, `copy.deepcopy`) keep the class
    either way, so a copy of a patched model is patched.

    pickle writes the usual `cls.__new__(cls)` reduction only with an object's own class, so a patched module pickles
    as a call of the torch.nn class with `_meta_args` (a placeholder on the meta device: no memory, no random draws)
    that unpickling then fills with the saved state, as `weights_only` loading allows for an allow-listed class.
    """

    def __reduce_ex__(self, protocol):
        """How pickle saves the module: as its torch.nn class when `seqfast.patch` made it, else as itself."""
        if not self.__dict__.get(PATCHED, False):
            return super().__reduce_ex__(protocol)
        state = {k: v for k, v in self.__getstate__().items() if k not in PATCH_ATTRIBUTES}
        return self._torch_class, self._meta_args, state

    def __prepare_scriptable__(self):
        """What `torch.jit.script` compiles in this module's place (TorchScript cannot compile seqfast's calls): its
        torch.nn twin holding the same parameters, buffers and hooks, which runs torch.nn's own op there. The options
        beyond torch.nn's have no twin: a module using one raises `RuntimeError`."""
        if self.layer_norm or self.zoneout or getattr(self, "weight_drop", 0.0):
            raise RuntimeError(
                f"seqfast: torch.jit.script cannot compile {type(self).__name__} with layer_norm, zoneout or "
                "weight_drop; torch.compile can"
            )
        twin = self._torch_class.__new__(self._torch_class)
        twin.__setstate__({k: v for k, v in self.__getstate__().items() if k not in PATCH_ATTRIBUTES})
        return twin

    def __copy__(self):
        """A shallow copy of the same class (a copy of a patched module is patched)."""
        replica = type(self).__new__(type(self))
        replica.__setstate__(self.__getstate__())
        return replica

    def __deepcopy__(self, memo):
        """A deep copy of the same class (a copy of a patched module is patched)."""
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return replica


class _Recurrent(_TorchTwin, torch.nn.RNNBase):
    """Shared forward of `RNN`, `LSTM` and `GRU`; the subclasses fix the mode and torch's messages."""

    backend = None
    weight_drop = 0.0
    layer_norm = False
    zoneout = 0.0
    _rank_error = "{mode}: Expected input to be 2D or 3D, got {dim}D instead"

    def __init__(self, mode, *args, backend=None, weight_drop=0.0, layer_norm=False, zoneout=0.0, **kwargs):
        """torch.nn.RNNBase's arguments, then `backend`, `weight_drop`, `layer_norm` and `zoneout` (see the
        subclasses' docstrings)."""
        if isinstance(weight_drop, bool) or not isinstance(weight_drop, (int, float)) or not 0 <= weight_drop < 1:
            raise ValueError(f"weight_drop must be a number in [0, 1), got {weight_drop!r}")
        _check_options(layer_norm, zoneout)
        super().__init__(mode, *args, **kwargs)
        if layer_norm and self.proj_size > 0:
            raise ValueError("layer_norm is not defined for an LSTM with proj_size > 0")
        self.backend = backend
        # each option only when on, else the class's default, so that the instance's state stays torch.nn's
        if weight_drop:
            self.weight_drop = float(weight_drop)
        if zoneout:
            self.zoneout = float(zoneout)
        if layer_norm:
            self.layer_norm = True
            self._register_layer_norm()

    def _register_layer_norm(self):
        """Register each layer-direction's `layer_norm` parameters right after its torch.nn ones."""
        params = dict(self._parameters)
        self._parameters.clear()
        for names in self._all_weights:
            for name in names:
                self._parameters[name] = params.pop(name)
            suffix = names[0].removeprefix("weight_ih")
            w_ih = self._parameters[names[0]]
            for name, value in _layer_norm_parameters(w_ih, self.hidden_size, self.mode == "LSTM"):
                self.register_parameter(name + suffix, torch.nn.Parameter(value))
        self._parameters.update(params)

    def reset_parameters(self):
        """torch.nn's initialisation, and the `layer_norm` parameters' (gains 1, bias 0)."""
        super().reset_parameters()
        _reset_layer_norm(self)

    def extra_repr(self):
        """torch.nn's, and the options that are on."""
        return super().extra_repr() + _options_repr(self)

    def _layer_norm_weights(self):
        """`(ln_ih, ln_hh, ln_c_weight, ln_c_bias)` per layer-direction (the last two None unless LSTM), read live."""
        lstm = self.mode == "LSTM"
        names = ("ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias")[: 4 if lstm else 2]
        weights = []
        for layer in self._all_weights:
            suffix = layer[0].removeprefix("weight_ih")
            params = _live(self, [name + suffix for name in names])
            weights.append(tuple(params) + (None, None) * (not lstm))
        return weights

    def _layer_weights(self):
        """`(w_ih, w_hh, b_ih, b_hh, w_hr)` per layer-direction, read live from the module; in training with
        `weight_drop = p`, each `w_hh` times its own Bernoulli(1 - p) mask over 1 - p, drawn in this order."""
        weights = []
        bias, proj = self.bias, self.proj_size > 0
        drop = self.weight_drop if self.training else 0.0
        for names in self._all_weights:
            params = _live(self, names)
            biases = (params[2], params[3]) if bias else (None, None)
            w_hh = params[1]
            if drop:
                w_hh = w_hh * functional.bernoulli_mask(w_hh, w_hh.shape, 1 - drop).div_(1 - drop)
            weights.append((params[0], w_hh, *biases, params[-1] if proj else None))
        return weights

    def _hx_to_batched(self, hx, is_batched):
        """Check `hx`'s rank against the input's and give it a batch dimension when the input has none."""
        expected = 3 if is_batched else 2
        if self.mode == "LSTM":
            if hx[0].dim() != expected or hx[1].dim() != expected:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {expected}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx.dim() != expected:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got {hx.dim()}-D tensor")
        return hx if is_batched else hx.unsqueeze(1)

    def _time_major_resets(self, resets, x, is_batched):
        """`resets` checked against the time-major input `x [T, B, I]` and made `[T, B]`."""
        if not isinstance(resets, torch.Tensor):
            raise TypeError(f"resets must be a bool tensor, got {type(resets).__name__}")
        if resets.dtype != torch.bool:
            raise TypeError(f"resets must be a bool tensor, got dtype {resets.dtype}")
        if resets.device != x.device:
            raise ValueError(f"resets is on {resets.device}, the input on {x.device}")
        T, B = x.shape[0], x.shape[1]
        if not is_batched:
            expected = (T,)
        else:
            expected = (B, T) if self.batch_first else (T, B)
        if tuple(resets.shape) != expected:
            layout = "[T]" if not is_batched else ("[B, T]" if self.batch_first else "[T, B]")
            raise ValueError(f"resets must have shape {layout} = {list(expected)}, got {list(resets.shape)}")
        if not is_batched:
            return resets.unsqueeze(1)
        return resets.transpose(0, 1) if self.batch_first else resets

    def _zero_state(self, input, batch):
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, batch)
        real = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = input.new_zeros(*shape, real)
        if self.mode != "LSTM":
            return h
        return h, input.new_zeros(*shape, self.hidden_size)

    def forward(self, input, hx=None, *, resets=None):
        """Run the stack over a sequence.

        Args:
            input: `[T, B, I]` (`[B, T, I]` when `batch_first`), `[T, I]` unbatched, or a `PackedSequence`.
            hx: `[L*D, B, P]` (`[L*D, P]` unbatched) initial state, `(h0, c0)` for LSTM with `c0 [L*D, B, H]`;
                zeros when None (default).
            resets: bool `[T, B]` (`[B, T]` when `batch_first`, `[T]` unbatched), or None (default): True where an
                episode starts just before that step, which then starts from a zero state (`h` and `c`) instead of
                the previous step's (in a reversed direction the step before it does); not with a `PackedSequence`.

        Returns:
            `(output, h_n)` or, for LSTM, `(output, (h_n, c_n))`, shaped as torch.nn returns them.
        """
        extended = resets is not None or self.layer_norm or self.zoneout
        if functional.onnx_exporting():
            _check_no_options_in_onnx(extended)
            # the ONNX exporters translate torch.nn's ops (aten::lstm into ONNX's LSTM), not seqfast's custom ops
            return self._torch_class.forward(self, input, hx)
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            if resets is not None:
                raise ValueError("resets cannot be used with a PackedSequence input; pass padded input instead")
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
                if is_lstm:
                    _check_packed_lstm_state(hx)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._rank_error.format(mode=self._mode_name, dim=input.dim()))
            batch_sizes = sorted_indices = unsorted_indices = None
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                hx = self._hx_to_batched(hx, is_batched)
            data = input
        cell = CELL_OF_MODE[self.mode]
        weights = key = None
        if not (packed or extended or (self.training and self.weight_drop)):
            # a call whose signature passed the checks below before runs as that call did
            weights = self._layer_weights()
            key = self._call_key(cell, input, hx, weights)
            run = None if key is None else functional.remembered(key)
            if run is not None:
                if hx is None:
                    hx = self._zero_state(input, input.size(0 if self.batch_first else 1))
                h0, c0 = hx if is_lstm else (hx, None)
                y, hn, cn = run(input.transpose(0, 1) if self.batch_first else input, h0, c0, weights, None)
                return self._unpacked_output(y, hn, cn, is_batched)
        try:
            if hx is None:
                # zeros of the expected shapes: of torch.nn's checks only the input's can fail
                self.check_input(data, batch_sizes)
                batch = int(batch_sizes[0]) if packed else input.size(0 if self.batch_first else 1)
                hx = self._zero_state(data, batch)
            else:
                self.check_forward_args(data, hx, batch_sizes)
        except ValueError as e:
            if not (packed and is_lstm):
                raise
            # torch.nn's LSTM skips this check on packed input, whose wrong dtype then fails in its input GEMM
            raise RuntimeError(str(e)) from None
        if is_lstm and len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        states = hx if is_lstm else (hx,)
        if weights is None:
            weights = self._layer_weights()
        w_ih, w_hh, _, b_hh, w_hr = weights[0]
        _check_same_device(data, states, w_ih)
        _check_same_dtype(states[0], w_hh, b_hh)
        if is_lstm:
            _check_same_dtype(states[1], *((w_hh, b_hh) if w_hr is None else (w_hr, None)))

        packed_rows = None
        if packed and functional.eager(data):
            x, lengths, packed_rows = _padded(data, batch_sizes)
        elif packed:
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        else:
            x, lengths = (input.transpose(0, 1) if self.batch_first else input), None
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            if resets is not None:
                resets = self._time_major_resets(resets, x, is_batched)
        layer_norm = self._layer_norm_weights() if self.layer_norm else None

        def run(x, states, weights):
            c0 = states[1] if is_lstm else None
            layers, bidirectional, dropout, training = self.num_layers, self.bidirectional, self.dropout, self.training
            return functional.rnn(
                cell,
                x,
                states[0],
                c0,
                weights,
                layers,
                bidirectional,
                dropout,
                training,
                lengths,
                self.backend,
                resets,
                self.zoneout,
                layer_norm,
                key,
            )

        if _autocast() and not extended:
            y, hn, cn = self._autocast_call(run, cell, x, states, weights, lengths, packed)
        else:
            y, hn, cn = run(x, states, weights)
        hidden = (hn, cn) if is_lstm else hn
        if packed:
            data = pack_padded_sequence(y, lengths).data if packed_rows is None else packed_rows(y)
            output = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        return self._unpacked_output(y, hn, cn, is_batched)

    def _autocast_call(self, run, cell, x, states, weights, lengths, packed):
        """`run(x, states, weights)` under autocast as torch.nn runs it (`_run_autocast`), or torch's own op (see
        `_native_under_autocast`)."""
        h0, c0 = states[0], states[1] if cell == "lstm" else None
        static = (self.num_layers, self.bidirectional, self.dropout, self.training)

        def ours(x, h0, c0, weights, lengths):
            states = (h0,) if c0 is None else (h0, c0)
            return _run_autocast(run, cell, x, states, weights, module=True, unpacked=not packed)

        tensors = (h0, c0, *chain.from_iterable(weights))
        if _native_under_autocast(
            self.backend, x, tensors, lambda: native.route(ours, cell, x, h0, c0, weights, *static, lengths)
        ):
            return native.rnn(cell, x, h0, c0, weights, *static, lengths)
        return ours(x, h0, c0, weights, lengths)

    def _call_key(self, cell, input, hx, weights):
        """The signature of an unpacked call without options (`functional.call_key`) of `input` (batched) from `hx`
        (batched, or None) with `weights` (see `_layer_weights`), or None where it takes the checked path: it adds
        what torch.nn's checks of the arguments read, the module's configuration."""
        if self.mode == "LSTM":
            if hx is not None and (type(hx) not in (tuple, list) or len(hx) != 2):
                return None
            h0, c0 = (None, None) if hx is None else hx
        else:
            h0, c0 = hx, None
        configuration = (self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.bidirectional)
        configuration += (self.batch_first, self.bias, self.dropout, self.training, self._flat_weights[0].dtype)
        tensors = (input, h0, c0, *chain.from_iterable(weights))
        return functional.call_key(tensors, cell, self.backend, *configuration)

    def _unpacked_output(self, y, hn, cn, is_batched):
        """`(output, h_n)` or LSTM's `(output, (h_n, c_n))` of an unpacked call from the stack's time-major `y` and
        batched final states, as torch.nn shapes them."""
        output = y.transpose(0, 1) if self.batch_first else y
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hn, cn = hn.squeeze(1), None if cn is None else cn.squeeze(1)
        return output, ((hn, cn) if self.mode == "LSTM" else hn)


class RNN(_Recurrent):
    """Elman RNN with `tanh` or `relu`, a drop-in for `torch.nn.RNN` running on seqfast's kernels.

    Args:
        input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, device=None, dtype=None: exactly `torch.nn.RNN`'s.
        backend: seqfast backend name, or None (default) for `SEQFAST_BACKEND`, then automatic selection.
        weight_drop: DropConnect on the recurrent weights (AWD-LSTM): in training each call scales every `weight_hh`
            by its own Bernoulli(1 - p) mask over 1 - p, used for all steps; default 0 (off).
        layer_norm: LayerNorm (eps 1e-5) of each layer-direction's input and recurrent products over their `G*H`
            features, times gains `ln_ih_weight_l{k}{suffix}`, `ln_hh_weight_l{k}{suffix}`, before the biases; an LSTM
            also normalises `c_t` before its `tanh` (`ln_c_weight_l{k}{suffix}`, `ln_c_bias_l{k}{suffix}`); default
            False. Not with `proj_size > 0`.
        zoneout: probability `p` that a unit keeps its previous value at a step (`h`, and LSTM's `c` with its own
            mask): Bernoulli(p) masks per step and unit from the default generator in training, `p h_prev + (1 - p)
            h_new` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.RNN
    _meta_args = (1, 1, 1, "tanh", True, False, 0.0, False, 0, "meta")
    _mode_name = "RNN"
    _rank_error = "{mode}: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def __init__(self, *args, **kwargs):
        """`torch.nn.RNN`'s arguments, then `backend`, `weight_drop`, `layer_norm` and `zoneout` (see the class
        docstring)."""
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if self.nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[self.nonlinearity], *args, **kwargs)


class LSTM(_Recurrent):
    """LSTM (optionally projected), a drop-in for `torch.nn.LSTM` running on seqfast's kernels.

    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
        proj_size=0, device=None, dtype=None: exactly `torch.nn.LSTM`'s.
        backend: seqfast backend name, or None (default) for `SEQFAST_BACKEND`, then automatic selection.
        weight_drop: DropConnect on the recurrent weights (AWD-LSTM): in training each call scales every `weight_hh`
            by its own Bernoulli(1 - p) mask over 1 - p, used for all steps; default 0 (off).
        layer_norm: LayerNorm (eps 1e-5) of each layer-direction's input and recurrent products over their `G*H`
            features, times gains `ln_ih_weight_l{k}{suffix}`, `ln_hh_weight_l{k}{suffix}`, before the biases; an LSTM
            also normalises `c_t` before its `tanh` (`ln_c_weight_l{k}{suffix}`, `ln_c_bias_l{k}{suffix}`); default
            False. Not with `proj_size > 0`.
        zoneout: probability `p` that a unit keeps its previous value at a step (`h`, and LSTM's `c` with its own
            mask): Bernoulli(p) masks per step and unit from the default generator in training, `p h_prev + (1 - p)
            h_new` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.LSTM
    _meta_args = (1, 1, 1, True, False, 0.0, False, 0, "meta")
    _mode_name = "LSTM"

    def __init__(self, *args, **kwargs):
        """`torch.nn.LSTM`'s arguments, then `backend`, `weight_drop`, `layer_norm` and `zoneout` (see the class
        docstring)."""
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input, batch_sizes):
        """`(L*D, B, H)`, the size `c_0` must have for `input` (`batch_sizes`: a PackedSequence's, else None)."""
        return torch.nn.LSTM.get_expected_cell_size(self, input, batch_sizes)

    def check_forward_args(self, input, hidden, batch_sizes):
        """Raise torch.nn.LSTM's error when `input` or `hidden = (h_0, c_0)` has the wrong size."""
        torch.nn.LSTM.check_forward_args(self, input, hidden, batch_sizes)

    def permute_hidden(self, hx, permutation):
        """`hx = (h, c)` reordered along the batch dimension by `permutation` (as given when None)."""
        return torch.nn.LSTM.permute_hidden(self, hx, permutation)


class GRU(_Recurrent):
    """GRU, a drop-in for `torch.nn.GRU` running on seqfast's kernels.

    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
        device=None, dtype=None: exactly `torch.nn.GRU`'s.
        backend: seqfast backend name, or None (default) for `SEQFAST_BACKEND`, then automatic selection.
        weight_drop: DropConnect on the recurrent weights (AWD-LSTM): in training each call scales every `weight_hh`
            by its own Bernoulli(1 - p) mask over 1 - p, used for all steps; default 0 (off).
        layer_norm: LayerNorm (eps 1e-5) of each layer-direction's input and recurrent products over their `G*H`
            features, times gains `ln_ih_weight_l{k}{suffix}`, `ln_hh_weight_l{k}{suffix}`, before the biases; an LSTM
            also normalises `c_t` before its `tanh` (`ln_c_weight_l{k}{suffix}`, `ln_c_bias_l{k}{suffix}`); default
            False. Not with `proj_size > 0`.
        zoneout: probability `p` that a unit keeps its previous value at a step (`h`, and LSTM's `c` with its own
            mask): Bernoulli(p) masks per step and unit from the default generator in training, `p h_prev + (1 - p)
            h_new` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.GRU
    _meta_args = (1, 1, 1, True, False, 0.0, False, 0, "meta")
    _mode_name = "GRU"

    def __init__(self, *args, **kwargs):
        """`torch.nn.GRU`'s arguments, then `backend`, `weight_drop`, `layer_norm` and `zoneout` (see the class
        docstring)."""
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


def _padded(data, batch_sizes):
    """`pad_packed_sequence` of a `PackedSequence`'s `data [N, *]` and `batch_sizes [T]` on the eager path.

    On the CPU, where `seqfast._C` is built, its `pad_packed`: one copy of each step's rows, the output gathered back by
    `unpad_packed`, each the other's backward (`_PadPacked`, `_UnpadPacked`; without grad called directly). Before,
    an index copy and its indices took about 60 of the 140 us of an inference call of a 2-layer `RNN(200, 32)` at B32
    T5, and 240 of 900 us of a bidirectional `RNN(256, 16)` at B128 T20 in float64.

    Elsewhere one index copy into `common.empty`'s memory (a large padded input, allocated afresh, faulted its pages in
    on every call: 5 of the 9 ms of an RNN(300, 16) call at B = 128, T = 100 in float64). torch's pad records a copy per
    step, whose backward copies all of `x` again at many of them (15 copies of 3.3 MB in one call at T = 100, B = 32,
    H = 256); an index copy's backward is one gather.

    Returns:
        `x [T, B, *]` (zeros past each length), `lengths [B]` (int64, CPU) and the function that takes an output
        `y [T, B, *]` to the packed order of `data`'s rows.
    """
    if data.is_cpu and (C := extension()) is not None:
        if not torch.is_grad_enabled():
            x, lengths = C.pad_packed(data, batch_sizes, poisoning())
            return x, lengths, lambda y: C.unpad_packed(y, batch_sizes, poisoning())
        x, lengths = _PadPacked.apply(data, batch_sizes)
        return x, lengths, lambda y: _UnpadPacked.apply(y, batch_sizes)
    T, B = len(batch_sizes), int(batch_sizes[0])
    filled = (torch.arange(B) < batch_sizes.unsqueeze(1)).flatten()  # [T * B]: row b runs at step t
    rows, padding = filled.nonzero().squeeze(1).to(data.device), (~filled).nonzero().squeeze(1).to(data.device)
    x = empty((T * B, *data.shape[1:]), data.dtype, data.device).index_fill_(0, padding, 0).index_copy_(0, rows, data)
    return x.view(T, B, *data.shape[1:]), filled.view(T, B).sum(0), lambda y: y.flatten(0, 1).index_select(0, rows)


class _PadPacked(torch.autograd.Function):
    """`seqfast._C.pad_packed(data, batch_sizes)`: `(x [T, B, *], lengths [B])`; the gradient of `data` is `dx`'s rows
    that `data` filled (`_UnpadPacked`), so a second backward runs too."""

    @staticmethod
    def forward(ctx, data, batch_sizes):
        ctx.batch_sizes = batch_sizes
        x, lengths = extension().pad_packed(data, batch_sizes, poisoning())
        ctx.mark_non_differentiable(lengths)
        return x, lengths

    @staticmethod
    def backward(ctx, dx, _):
        return _UnpadPacked.apply(dx, ctx.batch_sizes), None


class _UnpadPacked(torch.autograd.Function):
    """`seqfast._C.unpad_packed(y, batch_sizes)`: `y [T, B, *]`'s rows in packed order; the gradient of `y` is the
    padded batch of the gradient's rows (`_PadPacked`)."""

    @staticmethod
    def forward(ctx, y, batch_sizes):
        ctx.batch_sizes = batch_sizes
        return extension().unpad_packed(y, batch_sizes, poisoning())

    @staticmethod
    def backward(ctx, d_data):
        return _PadPacked.apply(d_data, ctx.batch_sizes)[0], None


_CELL_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _Cell(_TorchTwin, torch.nn.RNNCellBase):
    """Shared forward of the cells: one step of the same recurrence, `T = 1`."""

    backend = None
    layer_norm = False
    zoneout = 0.0
    _cell_name = None

    def _cell(self):
        return self._cell_name

    def _set_options(self, backend, layer_norm, zoneout):
        """Keep `backend`; turn on `layer_norm` (registering its parameters after torch.nn's) and `zoneout` when
        asked, else leave the class's defaults, so that the instance's state stays torch.nn's."""
        _check_options(layer_norm, zoneout)
        self.backend = backend
        if zoneout:
            self.zoneout = float(zoneout)
        if layer_norm:
            self.layer_norm = True
            lstm = self._torch_class is torch.nn.LSTMCell
            for name, value in _layer_norm_parameters(self.weight_ih, self.hidden_size, lstm):
                self.register_parameter(name, torch.nn.Parameter(value))

    def reset_parameters(self):
        """torch.nn's initialisation, and the `layer_norm` parameters' (gains 1, bias 0)."""
        super().reset_parameters()
        _reset_layer_norm(self)

    def extra_repr(self):
        """torch.nn's, and the options that are on."""
        return super().extra_repr() + _options_repr(self)

    def _extensions(self, cell, x):
        """The step's options (`seqfast.kernels.common.Extensions`) for input `x [B, I]`."""
        layer_norm = None
        if self.layer_norm:
            names = ("ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias")[: 4 if cell == "lstm" else 2]
            layer_norm = (*_live(self, names), None, None)[:4]
        H = self.hidden_size
        return functional.extensions(cell, x.unsqueeze(0), H, H, False, None, self.zoneout, self.training, layer_norm)

    def forward(self, input, hx=None):
        """One step.

        Args:
            input: `[B, I]` or `[I]` unbatched.
            hx: `[B, H]` (`[H]` unbatched) hidden state, or `(h, c)` for `LSTMCell`; zeros when None (default).

        Returns:
            `h' [B, H]` (`[H]` unbatched), or `(h', c')` for `LSTMCell`.
        """
        if functional.onnx_exporting():
            _check_no_options_in_onnx(self.layer_norm or self.zoneout)
            return self._torch_class.forward(self, input, hx)
        is_lstm = self._cell_name == "lstm"
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"{type(self).__name__}: Expected input to be 1D or 2D, got {dim}D instead")
        if hx is not None:
            for i, state in enumerate(hx if is_lstm else (hx,)):
                if state.dim() not in (1, 2):
                    which = f"hx[{i}]" if is_lstm else "hidden"
                    raise ValueError(
                        f"{type(self).__name__}: Expected {which} to be 1D or 2D, got {state.dim()}D instead"
                    )
        is_batched = dim == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            states = (zeros, zeros) if is_lstm else (zeros,)
        else:
            if is_lstm and is_batched:
                if not isinstance(hx, (tuple, list)):
                    raise TypeError(
                        f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not {type(hx).__name__}"
                    )
                if len(hx) != 2:
                    raise RuntimeError("lstm_cell expects two hidden states")
            states = (hx[0], hx[1]) if is_lstm else (hx,)
            if not is_batched:
                states = tuple(s.unsqueeze(0) for s in states)
        cell = self._cell()
        w_ih, w_hh, b_ih, b_hh = _live(self, _CELL_PARAMETERS)
        h0, c0 = states[0], states[1] if is_lstm else None
        key = run = None
        if not (self.layer_norm or self.zoneout):
            # a call whose signature passed the checks below before runs as that call did
            tensors = (input, h0, c0, w_ih, w_hh, b_ih, b_hh)
            key = functional.call_key(tensors, cell, self.backend, self.input_size, self.hidden_size)
            run = None if key is None else functional.remembered(key)
        if run is not None:
            hT, cT = run(cell, input, h0, c0, w_ih, w_hh, b_ih, b_hh)
        else:
            hT, cT = self._checked_step(cell, input, states, (w_ih, w_hh, b_ih, b_hh), key)
        if is_lstm:
            return (hT, cT) if is_batched else (hT.squeeze(0), cT.squeeze(0))
        return hT if is_batched else hT.squeeze(0)

    def _checked_step(self, cell, input, states, weights, key):
        """`forward`'s step after torch.nn's checks of its arguments: `input [B, I]`, `states` `(h,)` or LSTM's
        `(h, c)`, each `[B, H]`, `weights` `(w_ih, w_hh, b_ih, b_hh)`; `key` as in `functional.step`.

        Returns:
            `(h [B, H], c [B, H] or None)`.
        """
        batch, features = input.shape
        w_ih, w_hh, b_ih, b_hh = weights
        if features != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {features} expected {self.input_size}")
        shape = (batch, self.hidden_size)
        for i, state in enumerate(states):
            if state.shape != shape:
                if batch != state.size(0):
                    raise RuntimeError(f"Input batch size {batch} doesn't match hidden{i} batch size {state.size(0)}")
                raise RuntimeError(
                    f"hidden{i} has inconsistent hidden_size: got {state.size(1)}, expected {self.hidden_size}"
                )
        _check_same_device(input, states, w_ih)
        _check_same_dtype(input, w_ih, b_ih)
        _check_same_dtype(states[0], w_hh, b_hh)
        ext = self._extensions(cell, input) if self.layer_norm or self.zoneout else None
        is_lstm = cell == "lstm"
        if is_lstm and states[1].dtype != states[0].dtype and ext is None and not _autocast():
            # torch.nn's cell takes `c` in any dtype, `c'` and `h'` in the promoted one: its own op runs that step
            return native.step(cell, input, *states, *weights)
        if is_lstm:
            _check_same_dtype(states[1], w_hh, b_hh)

        def run(x, states, weights):
            (w_ih, w_hh, b_ih, b_hh), h0, c0 = weights[0], states[0], states[1] if is_lstm else None
            fast = functional.eager(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
            return None, *functional.step(fast, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, self.backend, ext, key)

        if _autocast() and ext is None:
            return self._autocast_step(run, cell, input, states, weights)
        _, hT, cT = run(input, states, [weights])
        return hT, cT

    def _autocast_step(self, run, cell, x, states, weights):
        """`run(x, states, [weights])`'s `(h, c)` under autocast as torch.nn runs it (`_run_autocast`), or torch's own
        op (see `_native_under_autocast`)."""
        h0, c0 = states[0], states[1] if cell == "lstm" else None

        def ours(cell, x, h0, c0, *weights):
            return _run_autocast(run, cell, x, (h0,) if c0 is None else (h0, c0), [weights])[1:]

        if _native_under_autocast(
            self.backend, x, (h0, c0, *weights), lambda: native.route_step(ours, cell, x, h0, c0, *weights)
        ):
            return native.step(cell, x, h0, c0, *weights)
        return ours(cell, x, h0, c0, *weights)


class RNNCell(_Cell):
    """Elman RNN cell, a drop-in for `torch.nn.RNNCell`.

    Args:
        input_size, hidden_size, bias=True, nonlinearity='tanh', device=None, dtype=None: exactly torch's.
        backend: seqfast backend name, or None (default).
        layer_norm: LayerNorm (eps 1e-5) of the input and recurrent products over their `G*H` features, times gains
            `ln_ih_weight`, `ln_hh_weight`, before the biases (an LSTM cell also normalises `c'` before its `tanh`:
            `ln_c_weight`, `ln_c_bias`); default False.
        zoneout: probability `p` that a unit keeps its value from `hx` (and LSTM's `c`, own mask): Bernoulli(p)
            masks from the default generator in training, `p h + (1 - p) h'` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.RNNCell
    _meta_args = (1, 1, True, "tanh", "meta")

    def __init__(
        self,
        input_size,
        hidden_size,
        bias=True,
        nonlinearity="tanh",
        device=None,
        dtype=None,
        *,
        backend=None,
        layer_norm=False,
        zoneout=0.0,
    ):
        """`torch.nn.RNNCell`'s arguments, then `backend`, `layer_norm` and `zoneout` (see the class docstring)."""
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity
        self._set_options(backend, layer_norm, zoneout)

    def _cell(self):
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return "rnn_" + self.nonlinearity


class LSTMCell(_Cell):
    """LSTM cell, a drop-in for `torch.nn.LSTMCell`.

    Args:
        input_size, hidden_size, bias=True, device=None, dtype=None: exactly torch's.
        backend: seqfast backend name, or None (default).
        layer_norm: LayerNorm (eps 1e-5) of the input and recurrent products over their `G*H` features, times gains
            `ln_ih_weight`, `ln_hh_weight`, before the biases (an LSTM cell also normalises `c'` before its `tanh`:
            `ln_c_weight`, `ln_c_bias`); default False.
        zoneout: probability `p` that a unit keeps its value from `hx` (and LSTM's `c`, own mask): Bernoulli(p)
            masks from the default generator in training, `p h + (1 - p) h'` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.LSTMCell
    _meta_args = (1, 1, True, "meta")
    _cell_name = "lstm"

    def __init__(
        self,
        input_size,
        hidden_size,
        bias=True,
        device=None,
        dtype=None,
        *,
        backend=None,
        layer_norm=False,
        zoneout=0.0,
    ):
        """`torch.nn.LSTMCell`'s arguments, then `backend`, `layer_norm` and `zoneout` (see the class docstring)."""
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self._set_options(backend, layer_norm, zoneout)


class GRUCell(_Cell):
    """GRU cell, a drop-in for `torch.nn.GRUCell`.

    Args:
        input_size, hidden_size, bias=True, device=None, dtype=None: exactly torch's.
        backend: seqfast backend name, or None (default).
        layer_norm: LayerNorm (eps 1e-5) of the input and recurrent products over their `G*H` features, times gains
            `ln_ih_weight`, `ln_hh_weight`, before the biases (an LSTM cell also normalises `c'` before its `tanh`:
            `ln_c_weight`, `ln_c_bias`); default False.
        zoneout: probability `p` that a unit keeps its value from `hx` (and LSTM's `c`, own mask): Bernoulli(p)
            masks from the default generator in training, `p h + (1 - p) h'` in evaluation; default 0 (off).
    """

    _torch_class = torch.nn.GRUCell
    _meta_args = (1, 1, True, "meta")
    _cell_name = "gru"

    def __init__(
        self,
        input_size,
        hidden_size,
        bias=True,
        device=None,
        dtype=None,
        *,
        backend=None,
        layer_norm=False,
        zoneout=0.0,
    ):
        """`torch.nn.GRUCell`'s arguments, then `backend`, `layer_norm` and `zoneout` (see the class docstring)."""
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)
        self._set_options(backend, layer_norm, zoneout)
