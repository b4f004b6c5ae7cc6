"""Every example in `--smoke` mode, on torch.nn and on seqfast from the same seed: the loss falls, and both backends
start from the same loss (same weights, same data, same dropout draws)."""

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


CASES = [("char_lm", []), ("char_lm", ["--cell", "gru"]), ("tagger", []), ("classifier", []), ("seq2seq", [])]


@pytest.mark.parametrize("name, options", CASES)
def test_smoke_run_learns_and_both_backends_agree(examples, name, options, capsys):
    example = importlib.import_module(name)
    args = example.arguments(["--smoke", "--compare", *options])
    results = example.run_backends(args, example.run)
    assert "speedup" in capsys.readouterr().out
    for backend, metrics in results.items():
        assert metrics["last loss"] < metrics["first loss"], backend
    # the first step runs before any update: only the recurrent layers' float32 rounding can differ
    assert results["seqfast"]["first loss"] == pytest.approx(results["torch"]["first loss"], rel=1e-5)
