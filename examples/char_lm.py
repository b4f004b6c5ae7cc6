"""Character-level language model with generation, over the standard library's docstrings.

A 2-layer LSTM (or GRU) reads characters; training is truncated back-propagation through time, the state carried
(detached) from one batch to the next along each of the batch's text streams; then the model samples text one
character per call. seqfast comes in through `seqfast.patch(model)`: the model is written against torch.nn.

    python examples/char_lm.py                    # train on seqfast, report bits per character, generate
    python examples/char_lm.py --compare          # torch.nn and seqfast from the same seed, one table
    python examples/char_lm.py --cell gru --smoke # a few seconds
"""

import importlib
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from common import fit, parser, run_backends, setup, timed
from torch import nn

# Modules whose docstrings make the text (each module's own and its public members'), in this order.
MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)


def docstrings():
    """The docstrings of `MODULES` and of their public members, in order."""
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # reading deprecated members (typing.io) warns
        for name in MODULES:
            module = importlib.import_module(name)
            texts.append(inspect.getdoc(module) or "")
            for attr in sorted(vars(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                doc = inspect.getdoc(obj)
                if doc:
                    texts.append(doc)
    return texts


class CharLM(nn.Module):
    """Embedding, a stacked LSTM or GRU, a linear head over the characters."""

    def __init__(self, vocab, cell="lstm", embed=64, hidden=256, layers=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(embed, hidden, layers, dropout=dropout, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        """`x [B, T]` character ids, `state` the stack's; returns logits `[B, T, V]` and the new state."""
        y, state = self.rnn(self.embed(x), state)
        return self.head(y), state


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def streams(ids, batch):
    """`ids [N]` cut into `batch` contiguous streams, `[batch, N // batch]`."""
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n)


def windows(data, steps):
    """`(x, y)` windows of `steps` characters along `data [B, L]`, y one character ahead."""
    for t in range(0, data.shape[1] - 1, steps):
        width = min(steps, data.shape[1] - 1 - t)
        yield data[:, t : t + width], data[:, t + 1 : t + 1 + width]


@torch.no_grad()
def bits_per_char(model, data, steps):
    """Mean cross-entropy over `data [B, L]` in bits, the state carried through."""
    model.eval()
    state, total, count = None, 0.0, 0
    for x, y in windows(data, steps):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


@torch.no_grad()
def generate(model, start, length, temperature, generator):
    """Sample `length` character ids after `start [1, 1]`, one model call per character."""
    model.eval()
    x, state, out = start, None, []
    for _ in range(length):
        logits, state = model(x, state)
        probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
        x = torch.multinomial(probs, 1, generator=generator)
        out.append(x.item())
    model.train()
    return out


def run(backend, args):
    """Train and sample on `backend`; returns the metrics."""
    texts = docstrings()
    chars = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(chars)}

    def encode(part):
        return torch.tensor([index[c] for c in "\n\n".join(part)])

    # every tenth docstring is held out, so that both parts cover every module
    train = streams(encode(texts[i] for i in range(len(texts)) if i % 10 != 9), args.batch).to(args.device)
    held_out = streams(encode(texts[9::10]), 8).to(args.device)
    if args.smoke:
        train, held_out = train[:, : 8 * args.steps + 1], held_out[:, : 4 * args.steps + 1]

    torch.manual_seed(args.seed)
    model = CharLM(len(chars), args.cell, args.embed, args.hidden, args.layers, args.dropout).to(args.device)
    if backend == "seqfast":
        import seqfast

        seqfast.patch(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    state = None  # carried from one window to the next, each epoch from zeros

    def epoch_windows():
        nonlocal state
        state = None
        yield from windows(train, args.steps)

    def loss_of(batch):
        nonlocal state
        x, y = batch
        logits, state = model(x, state)
        state = detach(state)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), y.numel()

    count = -(-(train.shape[1] - 1) // args.steps)
    training = fit(model, optimizer, epoch_windows, count, loss_of, args, backend, 1.0)

    bpc = bits_per_char(model, held_out, args.steps)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start_id = torch.tensor([[index["\n"]]], device=args.device)
    generate(model, start_id, 8, args.temperature, generator)  # warm up
    sample, generate_s = timed(
        args.device, lambda: generate(model, start_id, args.generate, args.temperature, generator)
    )
    print(f"--- {backend} sample ---\n{''.join(chars[i] for i in sample)}\n---")
    return training | {"held-out bits/char": bpc, "generation tokens/s": args.generate / generate_s}


def arguments(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=64, help="characters per window of truncated backpropagation")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--generate", type=int, default=500, help="characters to sample")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.epochs, args.generate = 64, 1, 40
    return args


if __name__ == "__main__":
    args = arguments()
    setup(args)
    run_backends(args, run)
