"""What the examples share: their command line, batching, the training loop, a progress bar, timing and the comparison
table."""

import argparse
import sys
import time

import torch


def parser(description):
    """The examples' common options; each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backend", choices=("torch", "seqfast"), default="seqfast", help="recurrent layers to train on")
    p.add_argument("--compare", action="store_true", help="run torch.nn and seqfast from the same seed, one table")
    p.add_argument("--smoke", action="store_true", help="a run of a few seconds on a small model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args):
    """Apply `--threads`."""
    if args.threads:
        torch.set_num_threads(args.threads)


def groups(data, batch, rng=None):
    """The items of `data` in lists of `batch` (the last may be shorter), in `rng`'s shuffled order when given."""
    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch):
        yield [data[j] for j in order[i : i + batch]]


def progress(iterable, total, label):
    """Yield from `iterable`, drawing a bar on stderr (only on a terminal)."""
    shown = sys.stderr.isatty()
    start = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        if shown:
            done = int(30 * i / total)
            elapsed = time.perf_counter() - start
            sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (30 - done)}] {i}/{total} {elapsed:.0f}s")
            sys.stderr.flush()
    if shown:
        sys.stderr.write("\n")


def sync(device):
    """Wait for `device`'s queued work, so that a time measured after it is the work's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(device, run):
    """`(run(), seconds)`, the time of `run`'s work on `device`."""
    sync(device)
    start = time.perf_counter()
    out = run()
    sync(device)
    return out, time.perf_counter() - start


def fit(model, optimizer, batches, count, loss_of, args, label, clip=None):
    """Train `model` for `args.epochs` passes over `batches()` (an iterable of `count` batches, made anew per epoch)
    on `args.device`: `loss, tokens = loss_of(batch)`, then a step of `optimizer` on the loss's gradients (their norm
    clipped to `clip` when given); `label` names the run on the progress bar.

    Returns:
        `{metric: value}`: the first loss, the mean of the last ten, seconds per epoch and tokens per second.
    """
    losses, seconds, tokens = [], [], 0

    def epoch(i):
        nonlocal tokens
        for batch in progress(batches(), count, f"{label} epoch {i + 1}/{args.epochs}"):
            loss, n = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            losses.append(loss.item())
            tokens += n

    for i in range(args.epochs):
        seconds.append(timed(args.device, lambda i=i: epoch(i))[1])
    return {
        "first loss": losses[0],
        "last loss": sum(losses[-10:]) / len(losses[-10:]),
        "train s/epoch": sum(seconds) / len(seconds),
        "train tokens/s": tokens / sum(seconds),
    }


def run_backends(args, run):
    """`run(backend, args)` for `--backend`, or for both backends with `--compare`, then print the results.

    `run` returns `{metric: value}`; with `--compare` the table shows both columns and, for the metrics named in
    `_SPEED`, seqfast's speedup over torch.nn.
    """
    backends = ("torch", "seqfast") if args.compare else (args.backend,)
    results = {backend: run(backend, args) for backend in backends}
    print(table(results))
    return results


# metrics where higher is faster (speedup = seqfast / torch) and lower is faster (speedup = torch / seqfast)
_FASTER_HIGH = ("tokens/s",)
_FASTER_LOW = ("s/epoch",)


def table(results):
    """A plain-text table of `{backend: {metric: value}}`, with a speedup column when both backends ran."""
    backends = list(results)
    metrics = list(results[backends[0]])
    header = ["metric", *backends] + (["speedup"] if len(backends) == 2 else [])
    rows = [header]
    for metric in metrics:
        values = [results[b][metric] for b in backends]
        row = [metric, *(_fmt(v) for v in values)]
        if len(backends) == 2:
            torch_value, seqfast_value = values
            if any(metric.endswith(k) for k in _FASTER_HIGH):
                row.append(f"{seqfast_value / torch_value:.2f}x")
            elif any(metric.endswith(k) for k in _FASTER_LOW):
                row.append(f"{torch_value / seqfast_value:.2f}x")
            else:
                row.append("")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
