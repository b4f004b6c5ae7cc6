"""What a user reads: the README's opening example runs as written, and `help()` on the public modules shows
seqfast's documentation, not torch's internal comments or torch's docstrings for seqfast's own methods."""

import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import seqfast

ROOT = Path(__file__).resolve().parents[1]

MODULES = [seqfast.RNN, seqfast.LSTM, seqfast.GRU, seqfast.RNNCell, seqfast.LSTMCell, seqfast.GRUCell]


def test_readme_example_runs_as_written():
    (example,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[:1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQFAST_")}
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_help_shows_seqfasts_own_documentation(module):
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    own = text.split("inherited from torch.", 1)[0]
    assert module.__doc__.splitlines()[0] in own
    for cls in module.__mro__:
        if cls.__module__ != "seqfast.nn":
            continue
        for name, value in vars(cls).items():
            if callable(value) and pydoc.visiblename(name, obj=value):
                assert value.__doc__, f"{cls.__name__}.{name} shows torch's docstring or source comments"
    assert not re.search(r"^ \|\s+#", own, re.M), "torch's source comments in help()"
    assert "Initialize internal Module state" not in own
