"""Sequence labelling: a bidirectional LSTM tags each token of Python source lines with its token type.

The lines come from the standard library's own sources, cut into tokens by the `tokenize` module, which also gives
the tags (NAME, KEYWORD, OP, NUMBER, STRING, COMMENT). The model sees each token only as one of the training set's
frequent tokens or as "unknown" (most names, numbers and strings), so it must tag those from their context. Lines
have their own lengths and run as a `PackedSequence`. seqfast comes in through `seqfast.patch(model)`.

    python examples/tagger.py               # train on seqfast, report token accuracy
    python examples/tagger.py --compare     # torch.nn and seqfast from the same seed, one table
    python examples/tagger.py --smoke       # a few seconds
"""

import importlib
import io
import keyword
import random
import tokenize
from collections import Counter

import torch
import torch.nn.functional as F
from common import fit, groups, parser, run_backends, setup
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MODULES = (
    "argparse",
    "ast",
    "calendar",
    "collections",
    "configparser",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "inspect",
    "ipaddress",
    "logging",
    "pathlib",
    "pprint",
    "shutil",
    "statistics",
    "string",
    "tarfile",
    "tempfile",
    "textwrap",
    "typing",
    "zipfile",
)
TAGS = ["NAME", "KEYWORD", "OP", "NUMBER", "STRING", "COMMENT"]
_TAGGED = {tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING, tokenize.COMMENT}
MAX_TOKENS = 80


def lines():
    """Each source line of `MODULES` as `(tokens, tags)`, lines without a tagged token left out."""
    out = []
    for name in MODULES:
        module = importlib.import_module(name)
        with open(module.__file__, encoding="utf-8") as f:
            source = f.read()
        by_line = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in _TAGGED:
                continue
            tag = tokenize.tok_name[tok.type]
            if tag == "NAME" and (keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string)):
                tag = "KEYWORD"
            by_line.setdefault(tok.start[0], []).append((tok.string, TAGS.index(tag)))
        for pairs in by_line.values():
            pairs = pairs[:MAX_TOKENS]
            out.append(([t for t, _ in pairs], [g for _, g in pairs]))
    return out


class Tagger(nn.Module):
    """Embedding, a 2-layer bidirectional LSTM over a packed batch, a linear layer per token."""

    def __init__(self, vocab, embed=100, hidden=128, layers=2, dropout=0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, len(TAGS))

    def forward(self, tokens, lengths):
        """Tag logits `[B, L, tags]` of `tokens [B, L]` (padded past `lengths [B]`)."""
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.head(out)


def batches(data, batch, vocab, rng=None):
    """`(tokens [B, L], lengths [B], tags [B, L])`, tags -100 on padding."""
    for chunk in groups(data, batch, rng):
        lengths = torch.tensor([len(t) for t, _ in chunk])
        width = int(lengths.max())
        tokens = torch.tensor([[vocab.get(t, 1) for t in ts] + [0] * (width - len(ts)) for ts, _ in chunk])
        tags = torch.tensor([gs + [-100] * (width - len(gs)) for _, gs in chunk])
        yield tokens, lengths, tags


def run(backend, args):
    """Train and evaluate on `backend`; returns the metrics."""
    data = lines()
    train = [d for i, d in enumerate(data) if i % 10 != 9]
    test = data[9::10]
    if args.smoke:
        train, test = train[:1024], test[:256]
    counts = Counter(t for tokens, _ in train for t in tokens)
    vocab = {t: i + 2 for i, (t, _) in enumerate(counts.most_common(args.vocab))}  # 0 padding, 1 unknown

    torch.manual_seed(args.seed)
    model = Tagger(len(vocab) + 2, args.embed, args.hidden, args.layers, args.dropout).to(args.device)
    if backend == "seqfast":
        import seqfast

        seqfast.patch(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def loss_of(batch):
        tokens, lengths, tags = batch
        logits = model(tokens.to(args.device), lengths)
        loss = F.cross_entropy(logits.flatten(0, 1), tags.to(args.device).flatten(), ignore_index=-100)
        return loss, int(lengths.sum())

    rng = random.Random(args.seed)
    count = -(-len(train) // args.batch)
    training = fit(model, optimizer, lambda: batches(train, args.batch, vocab, rng), count, loss_of, args, backend)

    model.eval()
    correct = unknown_correct = total = unknown = 0
    with torch.no_grad():
        for tokens, lengths, tags in batches(test, 256, vocab):
            predicted = model(tokens.to(args.device), lengths).argmax(-1).cpu()
            valid, rare = tags != -100, tokens == 1
            correct += int((predicted == tags)[valid].sum())
            unknown_correct += int((predicted == tags)[valid & rare].sum())
            total += int(valid.sum())
            unknown += int((valid & rare).sum())
    return training | {
        "token accuracy": correct / total,
        "accuracy on unknown tokens": unknown_correct / max(unknown, 1),
    }


def arguments(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=2000, help="most frequent training tokens the model can tell apart")
    p.add_argument("--embed", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.epochs = 32, 1
    return args


if __name__ == "__main__":
    args = arguments()
    setup(args)
    run_backends(args, run)
