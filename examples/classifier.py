"""Sequence classification: a GRU reads a snippet of Python source, character by character, and names the standard
library package it comes from.

Snippets are a few consecutive lines of the packages' own files (every tenth snippet held out, a sample of the rest
to train on), of their own lengths, run as a `PackedSequence`; the GRU's last state goes into a linear head. The GRU
is built as `seqfast.GRU` or `torch.nn.GRU` by `--backend` (`--cell lstm` for an LSTM).

    python examples/classifier.py               # train on seqfast, report accuracy
    python examples/classifier.py --compare     # torch.nn and seqfast from the same seed, one table
    python examples/classifier.py --smoke       # a few seconds
"""

import importlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from common import fit, groups, parser, run_backends, setup
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

PACKAGES = ("asyncio", "email", "http", "json", "logging", "unittest", "urllib", "xml")
LINES_PER_SNIPPET = 4
MAX_CHARS = 200


def snippets():
    """`(text, package index)` for each run of `LINES_PER_SNIPPET` non-blank lines of each package's files."""
    out = []
    for label, name in enumerate(PACKAGES):
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for i in range(0, len(rows) - LINES_PER_SNIPPET + 1, LINES_PER_SNIPPET):
                text = "\n".join(rows[i : i + LINES_PER_SNIPPET])[:MAX_CHARS]
                out.append((text, label))
    return out


def encode(text):
    """Character codes, anything outside ASCII as 127."""
    return [min(ord(c), 127) for c in text]


class Classifier(nn.Module):
    """Character embedding, a GRU (or LSTM) over the packed batch, its last state into a linear head."""

    def __init__(self, rnn, embed=64, hidden=256):
        super().__init__()
        self.embed = nn.Embedding(128, embed)
        self.rnn = rnn(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(PACKAGES))

    def forward(self, chars, lengths):
        """Logits `[B, packages]` of `chars [B, L]` (padded past `lengths [B]`)."""
        packed = pack_padded_sequence(self.embed(chars), lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


def batches(data, batch, rng=None):
    """`(chars [B, L], lengths [B], labels [B])`."""
    for chunk in groups(data, batch, rng):
        codes = [encode(text) for text, _ in chunk]
        lengths = torch.tensor([len(c) for c in codes])
        width = int(lengths.max())
        chars = torch.tensor([c + [0] * (width - len(c)) for c in codes])
        yield chars, lengths, torch.tensor([label for _, label in chunk])


def run(backend, args):
    """Train and evaluate on `backend`; returns the metrics."""
    data = snippets()
    train = [d for i, d in enumerate(data) if i % 10 != 9]
    test = data[9::10]
    sample = random.Random(args.seed)
    train = sample.sample(train, min(args.train, len(train)))
    if args.smoke:
        test = sample.sample(test, 128)

    torch.manual_seed(args.seed)
    if backend == "seqfast":
        import seqfast

        rnn = seqfast.LSTM if args.cell == "lstm" else seqfast.GRU
    else:
        rnn = nn.LSTM if args.cell == "lstm" else nn.GRU
    model = Classifier(rnn, args.embed, args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def loss_of(batch):
        chars, lengths, labels = batch
        return F.cross_entropy(model(chars.to(args.device), lengths), labels.to(args.device)), int(lengths.sum())

    rng = random.Random(args.seed)
    count = -(-len(train) // args.batch)
    training = fit(model, optimizer, lambda: batches(train, args.batch, rng), count, loss_of, args, backend, 1.0)

    model.eval()
    correct = 0
    with torch.no_grad():
        for chars, lengths, labels in batches(test, 256):
            correct += int((model(chars.to(args.device), lengths).argmax(-1).cpu() == labels).sum())
    largest = max(sum(label == k for _, label in test) for k in range(len(PACKAGES)))
    return training | {"accuracy": correct / len(test), "chance (largest class)": largest / len(test)}


def arguments(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--train", type=int, default=6000, help="training snippets, drawn from the training part")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.train, args.epochs = 64, 512, 1
    return args


if __name__ == "__main__":
    args = arguments()
    setup(args)
    run_backends(args, run)
