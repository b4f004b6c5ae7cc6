"""ONNX export: a model holding seqfast modules (built directly or patched) exports, with either of torch's exporters,
to ONNX's own LSTM/GRU/RNN operators, and onnxruntime runs it with torch.nn's outputs.

Needs the `onnx` extra (`pip install -e ".[onnx]"`), which CI installs.
"""

import io

import pytest
import torch
from helpers import Output, assert_all_close
from torch import nn

import seqfast
from seqfast import functional

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's default exporter (`dynamo=True`) translates through it

# onnxruntime against torch.nn, both float32, differing in summation order and activation functions: rel RMS
# <= 3.1e-7 measured over both exporters and three seeds; the helpers' float32 bound leaves ~30x of room
TOL = 1e-5
EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
OUTPUTS = [
    "rnn output",
    "lstm h_n",
    "lstm c_n",
    "gru h_n",
    "rnn h_n",
    "lstm cell h",
    "lstm cell c",
    "gru cell",
    "rnn cell",
]


class Stack(nn.Module):
    """LSTM (2 layers, bidirectional), GRU (1 layer), RNN (relu, 2 layers, bidirectional), then the three cells on
    the last step, from the classes of `kind` (`torch.nn` or `seqfast`)."""

    def __init__(self, kind, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.lstm = kind.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.gru = kind.GRU(10, 4, batch_first=batch_first)
        self.rnn = kind.RNN(4, 3, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=batch_first)
        self.lstm_cell = kind.LSTMCell(6, 4)
        self.gru_cell = kind.GRUCell(4, 4)
        self.rnn_cell = kind.RNNCell(4, 3)

    def forward(self, x, lstm_h0=None, lstm_c0=None, gru_h0=None, rnn_h0=None):
        y, (lstm_hn, lstm_cn) = self.lstm(x, None if lstm_h0 is None else (lstm_h0, lstm_c0))
        y, gru_hn = self.gru(y, gru_h0)
        y, rnn_hn = self.rnn(y, rnn_h0)
        h, c = self.lstm_cell(y[:, -1] if self.batch_first else y[-1])
        g = self.gru_cell(h, h)
        r = self.rnn_cell(g)
        return y, lstm_hn, lstm_cn, gru_hn, rnn_hn, h, c, g, r


def _inputs(batch_first, with_h0):
    B, T = 2, 7
    x = torch.randn(B, T, 3) if batch_first else torch.randn(T, B, 3)
    if not with_h0:
        return (x,)
    return x, torch.randn(4, B, 5), torch.randn(4, B, 5), torch.randn(1, B, 4), torch.randn(4, B, 3)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize(
    "built, batch_first, with_h0",
    [("directly", False, False), ("directly", True, True), ("patched", False, True), ("patched", True, False)],
)
def test_onnxruntime_runs_the_export_with_torch_outputs(dynamo, built, batch_first, with_h0):
    reference = Stack(nn, batch_first).eval()
    if built == "directly":
        model = Stack(seqfast, batch_first)
        model.load_state_dict(reference.state_dict(), strict=True)
    else:
        model = seqfast.patch(Stack(nn, batch_first))
        model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    assert all(type(m) in vars(seqfast).values() for m in model.children())
    inputs = _inputs(batch_first, with_h0)
    buffer = io.BytesIO()
    torch.onnx.export(model, inputs, buffer, dynamo=dynamo)

    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert {"LSTM", "GRU"} <= ops, sorted(ops)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs, strict=True)}
    actual = [torch.from_numpy(a) for a in session.run(None, feeds)]
    with torch.no_grad():
        expected = list(reference(*inputs))
    assert_all_close(actual, expected, TOL, OUTPUTS)


def test_other_captures_keep_seqfast_ops():
    """Only ONNX export switches to torch.nn's ops: `torch.export` and `torch.jit.trace` keep seqfast's."""
    model, x = Output(seqfast.GRU(3, 4)), torch.randn(5, 2, 3)
    exported = torch.export.export(model, (x,))
    assert "seqfast.recurrence" in str(exported.graph)
    traced = torch.jit.trace(model, (x,))
    assert "seqfast::recurrence" in str(traced.inlined_graph)
    assert not functional.onnx_exporting()


def test_options_refuse_onnx_export():
    """ONNX export translates torch.nn's ops, which have none of seqfast's options: a module or cell that uses one
    refuses with the reason (checked with the TorchScript exporter: the dynamo exporter falls back to other captures
    after a refusal)."""
    for module, x in (
        (Output(seqfast.GRU(3, 4, zoneout=0.3)), torch.randn(5, 2, 3)),
        (seqfast.LSTMCell(3, 4, layer_norm=True, backend="reference"), torch.randn(2, 3)),
    ):
        with pytest.raises(RuntimeError, match="ONNX export of a call with resets, layer_norm or zoneout"):
            torch.onnx.export(module.eval(), (x,), io.BytesIO(), dynamo=False)
