"""Named benchmark shape sets, the one place that defines them.

Every set is a tuple of `Shape`s in `SETS`; the runner (`python -m benchmarks --set NAME`) and the pytest-benchmark
suite (`pytest benchmarks --bench-set NAME`) read them from here. Input size equals hidden size unless a shape says
otherwise, inputs are time-major, `hx` is left to the module's zero default, and a shape runs in the runner's dtypes
unless it names its own.

The `overhead` set times what users call one small step at a time, where per-call cost rather than arithmetic
decides: the cells at `B = 1`, one generation step of a 2-layer model, the `LSTMCell(51, 51)` float64 batch of
PyTorch's time-sequence-prediction example, and the fixed cost of a module call on a tiny problem.

The `clients` set is the shapes of the classic programs users run: a word-level language model (2 layers, 200 units,
B = 20, T = 35), an MNIST-row classifier `LSTM(28, 64)`, a time-series `LSTM(8, 32)` at B = 256, a recurrent RL policy
`GRU(64, 128)` one step and 32 steps at a time, and a 2-layer bidirectional `LSTM(100, 128)` tagger over packed
mixed lengths. The `small` set is the grid H in {32, 64, 128} x B in {1, 8, 64} x T in {1, 32} for the three cells.

The `packed` set runs `PackedSequence` batches: LSTM and GRU at H in {256, 512} x B in {16, 64}, T = 64, a 2-layer
bidirectional LSTM(256), and where padding costs most against torch.nn's packed loop, which skips it: a short
2-layer batch of small H from wide inputs (`LSTM(200, 32)`, `RNN(200, 32)`, B = 32, T = 5), `GRU(300, 100)` at B = 128,
T = 50, and a 3-layer float64 `RNN(300, 16)` at B = 128, T = 100.

The DeepBench sets follow `code/kernels/rnn_problems.h` of baidu-research/DeepBench: `training_set`,
`inference_server_set` and `inference_device_set` as `(hidden, batch, timesteps, type)`, where DeepBench's
`vanilla` RNN is cuDNN's ReLU RNN (`rnn_relu` here).

The GPU sets: `flashrnn` is FlashRNN's published shape (H = 768, B = 16, T = 1024, LSTM and GRU); `gpu-train` a
sample of DeepBench's training set at T >= 100 (LSTM H in {1024, 1536, 2048, 2560} x B in {16, 32, 64} at T = 100,
GRU H in {1024, 2048, 2560} at B = 32, T = 187); `gpu-infer` inference at B in {1, 2, 4} (LSTM H in {512, 1024,
2048} at T = 100, GRU H in {1024, 2048} at T = 187); `decode` greedy decoding of T = 256 tokens with a 2-layer
decoder of H = 1024 (`module="decoder"`, LSTM and GRU, B in {1, 8, 64}), for the modes `decode`, `decode-graph` and
`decode-compile`. `decode-small` is its CPU-sized counterpart: a 2-layer word-level language model of H = 200
generating 256 tokens one call each at B = 1 (LSTM, GRU, tanh RNN).

The `extensions` set times seqfast's options beyond torch.nn (`option`: `resets`, `layer_norm`, `zoneout`) at
H = 256, B = 16, T = 32 and B = 64, T = 100 (LSTM and GRU), each beside the same call without the option, and a
recurrent RL policy `GRU(64, 128)` at B = 64, T = 32 with and without resets. For a shape with an option the `torch`
provider is the same math as a Python loop of torch ops over the steps (`benchmarks.cell_loop`, what users write
today), since torch.nn has no such option.
"""

from dataclasses import dataclass, replace

import torch

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")

MODULES = ("sequence", "cell", "decoder")

OPTIONS = ("resets", "layer_norm", "zoneout")

# Zoneout's probability, and the chance that an episode starts at a given step of a row, in the `extensions` set.
ZONEOUT = 0.1
RESET_RATE = 0.05

# Vocabulary of a decoder shape's embedding and output head: a word-level language model's.
DECODER_VOCAB = 10000

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        hidden: hidden size `H`.
        batch: batch size `B`.
        time: sequence length `T` (the longest length of a packed batch).
        input: input size `I`; None (default) means `I = H`.
        layers: stacked layers `L` (default 1).
        bidirectional: two directions per layer (default False).
        packed: feed a `PackedSequence` of lengths drawn uniformly from `[T // 4, T]`, one of them `T`
            (default False).
        batch_first: modules built with `batch_first=True` and fed `[B, T, I]` (default False).
        module: `sequence` (default): `RNN` / `LSTM` / `GRU` over `T` steps; `cell`: `RNNCell` / `LSTMCell` /
            `GRUCell`, one step of input `[B, I]`, which needs `T = 1` and one layer, one direction, unpacked;
            `decoder`: greedy decoding of `T` tokens, one `T = 1` call of the sequence module per token between an
            `Embedding(DECODER_VOCAB, I)` and a `Linear(H, DECODER_VOCAB)` head (unidirectional, unpacked,
            time-major).
        dtype: the one dtype this shape runs in, a key of `DTYPES`; None (default): the runner's dtypes.
        option: one of `OPTIONS` the sequence module runs with (`layer_norm=True`, `zoneout=ZONEOUT` in training, or
            `resets` drawn at `RESET_RATE`), or None (default).
    """

    cell: str
    hidden: int
    batch: int
    time: int
    input: int | None = None
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    batch_first: bool = False
    module: str = "sequence"
    dtype: str | None = None
    option: str | None = None

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {', '.join(CELLS)}")
        if self.module not in MODULES:
            raise ValueError(f"unknown module {self.module!r}; choose from {', '.join(MODULES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.is_cell and (
            self.time != 1 or self.layers != 1 or self.bidirectional or self.packed or self.batch_first
        ):
            raise ValueError(f"{self.cell} cell: one step of one layer, one direction, unpacked (T = 1)")
        if self.is_decoder and (self.bidirectional or self.packed or self.batch_first):
            raise ValueError(f"{self.cell} decoder: one direction, unpacked, time-major")
        if self.option is not None and (self.option not in OPTIONS or self.module != "sequence"):
            raise ValueError(f"option {self.option!r}: one of {', '.join(OPTIONS)}, of a sequence module")
        if self.option == "resets" and self.packed:
            raise ValueError("resets: not with packed sequences")

    @property
    def is_cell(self):
        """True for a cell module (`module="cell"`)."""
        return self.module == "cell"

    @property
    def is_decoder(self):
        """True for a greedy decoder (`module="decoder"`)."""
        return self.module == "decoder"

    def decoder_step(self):
        """The recurrent module's call per decoded token: this shape as a `sequence` shape of `T = 1`."""
        return replace(self, time=1, module="sequence")

    def dtypes(self, default):
        """Names of the dtypes this shape runs in.

        Args:
            default: `list[str]`, the runner's dtype names (keys of `DTYPES`).

        Returns:
            `[self.dtype]` when the shape names its own, else `default`.
        """
        return [self.dtype] if self.dtype is not None else list(default)

    @property
    def input_size(self):
        """`I`: the explicit input size, or `H`."""
        return self.hidden if self.input is None else self.input

    @property
    def directions(self):
        """`D`: 2 when bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def id(self):
        """A stable readable id such as `lstm-H512-B16-T25`, `gru-H256-I128-B8-T64-L2-bi-packed`, for a cell
        with its own dtype `lstm-cell-H51-B97-float64`, for a decoder `lstm-decoder-H1024-B8-T256-L2`."""
        parts = [self.cell, f"H{self.hidden}"]
        if self.module != "sequence":
            parts.insert(1, self.module)
        if self.input is not None and self.input != self.hidden:
            parts.append(f"I{self.input}")
        parts.append(f"B{self.batch}")
        if not self.is_cell:
            parts.append(f"T{self.time}")
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.packed:
            parts.append("packed")
        if self.batch_first:
            parts.append("bf")
        if self.dtype is not None:
            parts.append(self.dtype)
        if self.option is not None:
            parts.append(self.option.replace("_", "-"))
        return "-".join(parts)

    def options(self):
        """The module's keyword arguments for `option`."""
        return {"layer_norm": {"layer_norm": True}, "zoneout": {"zoneout": ZONEOUT}}.get(self.option, {})

    def call_kwargs(self, device="cpu", seed=0):
        """The module call's keyword arguments: `resets` (`[T, B]`, or `[B, T]` when `batch_first`, bool, each step
        of each row an episode start with probability `RESET_RATE`, from `seed`) for the `resets` option."""
        if self.option != "resets":
            return {}
        generator = torch.Generator().manual_seed(seed + 3)
        resets = torch.rand(self.time, self.batch, generator=generator) < RESET_RATE
        return {"resets": (resets.T if self.batch_first else resets).to(device)}

    def lengths(self, seed=0):
        """Per-sequence lengths.

        Args:
            seed: generator seed (default 0); the same seed gives the same lengths.

        Returns:
            `[B]` int64 on the CPU: all `T` unless `packed`, else uniform in `[max(1, T // 4), T]` with
            `lengths[0] = T`, so the padded length is exactly `T`.
        """
        if not self.packed:
            return torch.full((self.batch,), self.time, dtype=torch.int64)
        generator = torch.Generator().manual_seed(seed)
        low = max(1, self.time // 4)
        lengths = torch.randint(low, self.time + 1, (self.batch,), generator=generator, dtype=torch.int64)
        lengths[0] = self.time
        return lengths

    def tokens(self):
        """Real (non-padding) tokens of one call: `B * T` (tokens decoded, for a decoder), or the sum of the lengths
        when `packed`."""
        return int(self.lengths().sum()) if self.packed else self.batch * self.time


def _deepbench(rows):
    """`Shape`s from DeepBench `(hidden, batch, timesteps, type)` rows."""
    cells = {"vanilla": "rnn_relu", "lstm": "lstm", "gru": "gru"}
    return tuple(Shape(cells[kind], hidden, batch, time) for hidden, batch, time, kind in rows)


def _grid(cells, hiddens, batches, times, **kwargs):
    return tuple(Shape(c, h, b, t, **kwargs) for c in cells for h in hiddens for b in batches for t in times)


_DEEPBENCH_TRAIN = (
    [(h, b, 50, "vanilla") for h in (1760, 2048, 2560) for b in (16, 32, 64, 128)]
    + [(h, b, 25, "lstm") for h in (512, 1024, 2048, 4096) for b in (16, 32, 64, 128)]
    + [(1536, b, 50, "lstm") for b in (8, 16, 32)]
    + [(256, b, 150, "lstm") for b in (16, 32, 64)]
    + [(h, 32, t, "gru") for h in (2816,) for t in (750, 375, 187)]
    + [(h, 32, t, "gru") for h in (2048, 1536, 2560) for t in (1500, 750, 375, 187)]
    + [(512, 32, 1, "gru"), (1024, 32, 1500, "gru"), (1024, 64, 1500, "gru")]
)

_DEEPBENCH_INFER = (
    [(h, b, 25, "lstm") for h in (512, 1024, 2048) for b in (1, 2, 4)]
    + [(1536, b, 50, "lstm") for b in (1, 2, 4)]
    + [(256, b, 150, "lstm") for b in (1, 2, 4)]
    + [(h, b, t, "gru") for h in (2816, 2048, 1536, 2560) for b in (1, 2, 4) for t in (1500, 750, 375, 187)]
    + [(512, b, 1, "gru") for b in (1, 2, 4)]
    + [(1024, b, 1500, "gru") for b in (1, 2, 4)]
)

_DEEPBENCH_DEVICE = [(32, 1, 672, "vanilla"), (64, 1, 96, "vanilla"), (256, 1, 150, "lstm")]

SETS = {
    "quick": (
        Shape("lstm", 256, 16, 32),
        Shape("gru", 256, 16, 32),
        Shape("rnn_tanh", 256, 16, 32),
        Shape("lstm", 512, 1, 32),
        Shape("lstm", 512, 64, 16),
        Shape("gru", 128, 8, 32, layers=2, bidirectional=True),
        Shape("lstm", 256, 16, 32, packed=True),
    ),
    "deepbench-train": _deepbench(_DEEPBENCH_TRAIN),
    "deepbench-infer": _deepbench(_DEEPBENCH_INFER + _DEEPBENCH_DEVICE),
    "latency": _grid(("lstm", "gru", "rnn_tanh"), (256, 512, 1024), (1, 4), (64,)),
    "throughput": _grid(("lstm", "gru"), (256, 512, 1024), (32, 64, 128), (64,)),
    "packed": _grid(("lstm", "gru"), (256, 512), (16, 64), (64,), packed=True)
    + _grid(("lstm",), (256,), (16,), (64,), layers=2, bidirectional=True, packed=True)
    + _grid(("lstm", "rnn_tanh"), (32,), (32,), (5,), input=200, layers=2, packed=True)
    + (
        Shape("gru", 100, 128, 50, input=300, packed=True),
        Shape("rnn_tanh", 16, 128, 100, input=300, layers=3, packed=True, dtype="float64"),
    ),
    "multilayer": _grid(("lstm", "gru"), (256, 512), (16,), (64,), layers=2, bidirectional=True)
    + _grid(("lstm", "gru"), (512,), (16,), (64,), layers=4)
    + _grid(("lstm",), (1024,), (32,), (32,), layers=3, bidirectional=True),
    "clients": _grid(("lstm", "gru", "rnn_tanh"), (200,), (20,), (35,), layers=2)
    + (
        Shape("lstm", 64, 64, 28, input=28),
        Shape("lstm", 32, 256, 50, input=8),
        Shape("gru", 128, 64, 1, input=64),
        Shape("gru", 128, 64, 32, input=64),
        Shape("lstm", 128, 32, 40, input=100, layers=2, bidirectional=True, packed=True),
    ),
    "small": _grid(("lstm", "gru", "rnn_tanh"), (32, 64, 128), (1, 8, 64), (1, 32)),
    "overhead": _grid(("rnn_tanh", "lstm", "gru"), (8, 32, 128), (1,), (1,), module="cell")
    + _grid(("rnn_tanh", "lstm", "gru"), (200,), (1,), (1,), layers=2)
    + (Shape("lstm", 51, 97, 1, module="cell", dtype="float64"),)
    + _grid(("rnn_tanh", "lstm", "gru"), (8,), (1,), (1,)),
    "flashrnn": (Shape("lstm", 768, 16, 1024), Shape("gru", 768, 16, 1024)),
    "gpu-train": _grid(("lstm",), (1024, 1536, 2048, 2560), (16, 32, 64), (100,))
    + _grid(("gru",), (1024, 2048, 2560), (32,), (187,)),
    "gpu-infer": _grid(("lstm",), (512, 1024, 2048), (1, 2, 4), (100,))
    + _grid(("gru",), (1024, 2048), (1, 2, 4), (187,)),
    "decode": _grid(("lstm", "gru"), (1024,), (1, 8, 64), (256,), layers=2, module="decoder"),
    "decode-small": _grid(("lstm", "gru", "rnn_tanh"), (200,), (1,), (256,), layers=2, module="decoder"),
    "extensions": tuple(
        Shape(cell, 256, batch, time, option=option)
        for cell in ("lstm", "gru")
        for batch, time in ((16, 32), (64, 100))
        for option in (None, *OPTIONS)
    )
    + (Shape("gru", 128, 64, 32, input=64), Shape("gru", 128, 64, 32, input=64, option="resets")),
}
