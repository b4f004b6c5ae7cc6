"""Whole-model checkpoints: a patched model saves as the torch.nn model it was (loadable without seqfast and under
`weights_only=True` with torch.nn's classes allow-listed); a module built as a seqfast class keeps its class, and
`import seqfast` allow-lists the six classes for `weights_only=True`. Copies of a patched model stay patched."""

import copy
import inspect
import io
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_all_close
from torch import nn

import seqfast
from seqfast.nn import PATCHED

F64 = torch.float64
TORCH_CLASSES = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)
SEQFAST_CLASSES = (seqfast.RNN, seqfast.LSTM, seqfast.GRU, seqfast.RNNCell, seqfast.LSTMCell, seqfast.GRUCell)


def _modules(kind):
    """One module of each of the six classes of `kind` (`torch.nn` or `seqfast`), float64, in a `ModuleDict`."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        dict(
            rnn=kind.RNN(3, 4, num_layers=2, nonlinearity="relu"),
            lstm=kind.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
            gru=kind.GRU(3, 4, bidirectional=True),
            rnn_cell=kind.RNNCell(3, 4, nonlinearity="relu"),
            lstm_cell=kind.LSTMCell(3, 4),
            gru_cell=kind.GRUCell(3, 4),
        )
    ).to(F64)


def _outputs(modules, x):
    """Every output tensor of every module in `modules` (from `_modules`) on `x [T, B, 3]`, the cells on `x[0]`."""
    flat = []
    with torch.no_grad():
        for name, module in modules.items():
            out = module(x[0] if name.endswith("cell") else x)
            for item in out if isinstance(out, tuple) else (out,):
                flat.extend(item if isinstance(item, tuple) else (item,))
    return flat


def _input():
    return torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


def _run_fresh(tmp_path, script, *, seqfast_importable):
    """Run `script` in a fresh Python with `_outputs` defined and `path`, `expected_path` bound; return its stdout.

    When not `seqfast_importable`, `import seqfast` fails in that process, as where seqfast is not installed.
    """
    prelude = "" if seqfast_importable else "import sys\nsys.modules['seqfast'] = None\n"
    code = (
        prelude
        + "import torch\nfrom torch import nn\n"
        + inspect.getsource(_outputs)
        + f"path, expected_path = {str(tmp_path / 'model.pt')!r}, {str(tmp_path / 'expected.pt')!r}\n"
        + textwrap.dedent(script)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _save(tmp_path, model):
    torch.save(model, tmp_path / "model.pt")
    x = _input()
    torch.save({"x": x, "outputs": _outputs(model, x)}, tmp_path / "expected.pt")


def test_patched_model_loads_as_torch_nn_where_seqfast_is_absent(tmp_path):
    model = seqfast.patch(_modules(nn), backend="reference")
    _save(tmp_path, model)
    assert b"seqfast" not in (tmp_path / "model.pt").read_bytes()
    stdout = _run_fresh(
        tmp_path,
        """
        expected = torch.load(expected_path)
        allowed = [nn.ModuleDict, nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell]
        for weights_only in (False, True):
            with torch.serialization.safe_globals(allowed):
                model = torch.load(path, weights_only=weights_only)
            for name, module in model.items():
                assert type(module).__module__ == "torch.nn.modules.rnn", (name, type(module))
                assert not {"backend", "_seqfast_patched"} & set(vars(module)), (name, sorted(vars(module)))
            for actual, wanted in zip(_outputs(model, expected["x"]), expected["outputs"], strict=True):
                torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
        print(sys.modules["seqfast"], [type(m).__name__ for m in model.values()])
    """,
        seqfast_importable=False,
    )
    assert stdout.split("\n")[0] == "None ['RNN', 'LSTM', 'GRU', 'RNNCell', 'LSTMCell', 'GRUCell']"


def test_seqfast_modules_round_trip_with_weights_only(tmp_path):
    model = _modules(seqfast)
    model["gru"].backend = "reference"
    _save(tmp_path, model)
    stdout = _run_fresh(
        tmp_path,
        """
        import seqfast
        expected = torch.load(expected_path)
        with torch.serialization.safe_globals([nn.ModuleDict]):
            model = torch.load(path, weights_only=True)
        for actual, wanted in zip(_outputs(model, expected["x"]), expected["outputs"], strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
        print([type(m).__qualname__ for m in model.values()], model["gru"].backend, model["lstm"].backend)
    """,
        seqfast_importable=True,
    )
    assert stdout.split("\n")[0] == "['RNN', 'LSTM', 'GRU', 'RNNCell', 'LSTMCell', 'GRUCell'] reference None"


def _round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_patch_save_load_patch_again():
    model, x = seqfast.patch(_modules(nn)), _input()
    expected = _outputs(model, x)
    loaded = _round_trip(model)
    assert tuple(type(m) for m in loaded.values()) == TORCH_CLASSES
    assert tuple(type(m) for m in seqfast.patch(loaded).values()) == SEQFAST_CLASSES
    assert_all_close(_outputs(loaded, x), expected, 0.0, [f"output {i}" for i in range(len(expected))])
    assert tuple(type(m) for m in _round_trip(loaded).values()) == TORCH_CLASSES
    assert tuple(type(m) for m in seqfast.unpatch(loaded).values()) == TORCH_CLASSES
    assert not any(PATCHED in vars(m) for m in loaded.values())
    assert tuple(type(m) for m in _round_trip(_modules(seqfast)).values()) == SEQFAST_CLASSES


def test_pickle_saves_patched_modules_as_torch_nn_and_seqfast_modules_as_themselves():
    patched = seqfast.patch(_modules(nn), backend="reference")
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        assert tuple(type(m) for m in pickle.loads(pickle.dumps(patched, protocol)).values()) == TORCH_CLASSES
        ours = pickle.loads(pickle.dumps(_modules(seqfast), protocol))
        assert tuple(type(m) for m in ours.values()) == SEQFAST_CLASSES


def test_copies_of_a_patched_model_stay_patched():
    model, x = seqfast.patch(_modules(nn), backend="reference"), _input()
    expected = _outputs(model, x)
    keys = list(model.state_dict())
    copied = copy.deepcopy(model)
    assert tuple(type(m) for m in copied.values()) == SEQFAST_CLASSES
    assert all(m.backend == "reference" for m in copied.values())
    assert not {id(p) for p in copied.parameters()} & {id(p) for p in model.parameters()}
    assert list(copied.state_dict()) == keys
    assert_all_close(_outputs(copied, x), expected, 0.0, [f"output {i}" for i in range(len(expected))])
    assert tuple(type(m) for m in _round_trip(copied).values()) == TORCH_CLASSES
    shallow = copy.copy(model["lstm"])
    assert type(shallow) is seqfast.LSTM and shallow.weight_hh_l0 is model["lstm"].weight_hh_l0
    with torch.no_grad():
        copied["lstm"].weight_hh_l0.zero_()
    assert_all_close(_outputs(model, x), expected, 0.0, [f"output {i}" for i in range(len(expected))])


def test_parametrized_patched_module_refuses_pickling_as_torch_does():
    from torch.nn.utils.parametrizations import weight_norm

    ref, ours = nn.LSTM(3, 4), nn.LSTM(3, 4)
    weight_norm(ref, "weight_hh_l0")
    weight_norm(ours, "weight_hh_l0")
    seqfast.patch(ours)
    with pytest.raises(RuntimeError) as expected:
        torch.save(ref, io.BytesIO())
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        torch.save(ours, io.BytesIO())
