"""Encoder-decoder with attention: dates written out in words, translated into ISO form.

"the twenty-third of march, nineteen ninety-four" -> "1994-03-23". A bidirectional GRU encodes the characters of the
source (variable lengths, packed); a GRU decoder with Luong attention over the encoder's outputs writes the target,
with teacher forcing in training and greedy decoding one step per call at test. The recurrent layers are built as
`seqfast.GRU` or `torch.nn.GRU` by `--backend`; the rest of the model is the same.

    python examples/seq2seq.py               # train on seqfast, report exact match and decoding speed
    python examples/seq2seq.py --compare     # torch.nn and seqfast from the same seed, one table
    python examples/seq2seq.py --smoke       # a few seconds
"""

import datetime
import random

import torch
import torch.nn.functional as F
from common import fit, groups, parser, run_backends, setup, timed
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MONTHS = "january february march april may june july august september october november december".split()
UNITS = "one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL_UNITS = "first second third fourth fifth sixth seventh eighth ninth".split()
ORDINAL_TEENS = "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth"
ORDINAL_TEENS = ORDINAL_TEENS.split()


def number(n, ordinal=False):
    """1 <= n <= 99 in words, as a cardinal or (`ordinal`) an ordinal number."""
    units, teens = (ORDINAL_UNITS, ORDINAL_TEENS) if ordinal else (UNITS, TEENS)
    if n < 10:
        return units[n - 1]
    if n < 20:
        return teens[n - 10]
    tens, unit = divmod(n, 10)
    if unit:
        return TENS[tens - 2] + "-" + units[unit - 1]
    return TENS[tens - 2][:-1] + "ieth" if ordinal else TENS[tens - 2]


def year(y):
    """1950 <= y <= 2049 in words, as it is read aloud."""
    if y < 2000:
        return "nineteen " + number(y - 1900)
    if y < 2010:
        return "two thousand" + ("" if y == 2000 else " and " + number(y - 2000))
    return "twenty " + number(y - 2000)


FORMATS = (
    "{day} of {month} {year}",
    "the {day} of {month}, {year}",
    "{month} the {day}, {year}",
    "{month} {day} {year}",
)


def pairs(count, rng):
    """`count` (words, ISO) pairs of random dates from 1950 to 2049 in random formats."""
    first, span = datetime.date(1950, 1, 1).toordinal(), 100 * 365 + 24
    out = []
    for _ in range(count):
        d = datetime.date.fromordinal(first + rng.randrange(span))
        words = rng.choice(FORMATS).format(
            day=number(d.day, ordinal=True), month=MONTHS[d.month - 1], year=year(d.year)
        )
        out.append((words, d.isoformat()))
    return out


SOURCE = ["<pad>", *sorted(set("abcdefghijklmnopqrstuvwxyz -,"))]
TARGET = ["<pad>", "<s>", "</s>", *"0123456789-"]


def encode(text, vocab):
    return [vocab.index(c) for c in text]


def batches(data, batch, shuffle_rng=None):
    """`(src [B, S], lengths [B], tgt_in [B, U], tgt_out [B, U])` padded batches of `data`."""
    for chunk in groups(data, batch, shuffle_rng):
        src = [encode(s, SOURCE) for s, _ in chunk]
        lengths = torch.tensor([len(s) for s in src])
        src = torch.tensor([s + [0] * (int(lengths.max()) - len(s)) for s in src])
        tgt = torch.tensor([[1, *encode(t, TARGET), 2] for _, t in chunk])
        yield src, lengths, tgt[:, :-1], tgt[:, 1:]


class Translator(nn.Module):
    """Bidirectional GRU encoder, GRU decoder with Luong ("general") attention; `rnn` builds the GRUs."""

    def __init__(self, rnn, embed=64, hidden=128):
        super().__init__()
        self.src_embed = nn.Embedding(len(SOURCE), embed, padding_idx=0)
        self.encoder = rnn(embed, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, 2 * hidden)
        self.tgt_embed = nn.Embedding(len(TARGET), embed)
        self.decoder = rnn(embed, 2 * hidden, batch_first=True)
        self.score = nn.Linear(2 * hidden, 2 * hidden, bias=False)
        self.combine = nn.Linear(4 * hidden, 2 * hidden)
        self.head = nn.Linear(2 * hidden, len(TARGET))

    def encode(self, src, lengths):
        """`(memory [B, S, 2H], mask [B, S], state [1, B, 2H])` of `src [B, S]` with `lengths [B]`."""
        packed = pack_padded_sequence(self.src_embed(src), lengths, batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < lengths.to(src.device)[:, None]
        state = torch.tanh(self.bridge(torch.cat([h[0], h[1]], dim=-1))).unsqueeze(0)
        return memory, mask, state

    def decode(self, tgt_in, memory, mask, state):
        """Logits `[B, U, V]` for the target steps `tgt_in [B, U]` and the decoder's new state."""
        out, state = self.decoder(self.tgt_embed(tgt_in), state)
        scores = torch.bmm(self.score(out), memory.transpose(1, 2)).masked_fill(~mask[:, None, :], float("-inf"))
        context = torch.bmm(torch.softmax(scores, dim=-1), memory)
        return self.head(torch.tanh(self.combine(torch.cat([out, context], dim=-1)))), state

    def forward(self, src, lengths, tgt_in):
        memory, mask, state = self.encode(src, lengths)
        return self.decode(tgt_in, memory, mask, state)[0]


@torch.no_grad()
def greedy(model, src, lengths, steps):
    """Greedy decoding of `steps` target characters, one decoder call per step."""
    memory, mask, state = model.encode(src, lengths)
    token = torch.full((src.shape[0], 1), TARGET.index("<s>"), device=src.device)
    out = []
    for _ in range(steps):
        logits, state = model.decode(token, memory, mask, state)
        token = logits.argmax(-1)
        out.append(token)
    return torch.cat(out, dim=1)


def run(backend, args):
    """Train and decode on `backend`; returns the metrics."""
    rng = random.Random(args.seed)
    train, test = pairs(args.train, rng), pairs(args.test, rng)
    torch.manual_seed(args.seed)
    if backend == "seqfast":
        import seqfast

        rnn = seqfast.GRU
    else:
        rnn = nn.GRU
    model = Translator(rnn, args.embed, args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def loss_of(batch):
        src, lengths, tgt_in, tgt_out = batch
        logits = model(src.to(args.device), lengths, tgt_in.to(args.device))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.to(args.device).flatten())
        return loss, int(lengths.sum()) + tgt_out.numel()

    shuffle = random.Random(args.seed)
    count = -(-len(train) // args.batch)
    training = fit(model, optimizer, lambda: batches(train, args.batch, shuffle), count, loss_of, args, backend, 1.0)

    model.eval()
    steps = len("yyyy-mm-dd") + 1
    src, lengths, _, _ = next(batches(test[:1], 1))
    greedy(model, src.to(args.device), lengths, steps)  # warm up

    def decode():
        correct = 0
        for src, lengths, _, tgt_out in batches(test, args.decode_batch):
            predicted = greedy(model, src.to(args.device), lengths, steps).cpu()
            correct += int((predicted == tgt_out).all(dim=1).sum())
        return correct

    correct, decode_s = timed(args.device, decode)
    return training | {"exact match": correct / len(test), "decoding tokens/s": len(test) * steps / decode_s}


def arguments(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128, help="encoder units per direction (the decoder has twice)")
    p.add_argument("--train", type=int, default=16000, help="training pairs")
    p.add_argument("--test", type=int, default=1000, help="test pairs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=1, help="sentences per greedy decoding call")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.train, args.test, args.epochs = 32, 640, 50, 1
    return args


if __name__ == "__main__":
    args = arguments()
    setup(args)
    run_backends(args, run)
