"""patch/unpatch: torch.nn's recurrent modules inside a model swap class in place, keeping parameters, optimizer
state, hooks and outputs; unpatch gives back exactly torch's classes."""

import copy

import pytest
import torch
from helpers import Output, assert_all_close, flatten
from torch import nn

import seqfast

F64 = torch.float64
TORCH_TO_SEQFAST = {
    nn.RNN: seqfast.RNN,
    nn.LSTM: seqfast.LSTM,
    nn.GRU: seqfast.GRU,
    nn.RNNCell: seqfast.RNNCell,
    nn.LSTMCell: seqfast.LSTMCell,
    nn.GRUCell: seqfast.GRUCell,
}


class MyLSTM(nn.LSTM):
    """A user subclass with its own forward: patch must leave it alone."""

    def forward(self, input, hx=None):
        out, state = super().forward(input, hx)
        return out * 2, state


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.stack = nn.ModuleList(
            [
                nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3),
                nn.GRU(6, 6, batch_first=True),
            ]
        )
        self.cells = nn.ModuleDict(
            dict(lstm=nn.LSTMCell(6, 5), gru=nn.GRUCell(5, 4), rnn=nn.RNNCell(4, 4, nonlinearity="relu"))
        )
        self.head = nn.Sequential(
            Output(nn.RNN(4, 3, batch_first=True)), nn.Tanh(), Output(MyLSTM(3, 2, batch_first=True))
        )

    def forward(self, x):
        y = self.stack[1](self.stack[0](self.inp(x))[0])[0]
        h = c = g = r = None
        outs = []
        for t in range(y.shape[1]):
            h, c = self.cells["lstm"](y[:, t], None if h is None else (h, c))
            g = self.cells["gru"](h, g)
            r = self.cells["rnn"](g, r)
            outs.append(r)
        return self.head(torch.stack(outs, dim=1))


def _model(seed=0):
    torch.manual_seed(seed)
    return Model().to(F64)


def _input():
    torch.manual_seed(1)
    return torch.randn(3, 5, 4, dtype=F64)


def _recurrent(model):
    return [m for m in model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]


def test_patch_swaps_classes_in_place_and_keeps_parameters():
    model = _model()
    modules_before = list(model.modules())
    kinds_before = [type(m) for m in modules_before]
    params_before = [(n, id(p)) for n, p in model.named_parameters()]
    keys_before = list(model.state_dict())
    assert seqfast.patch(model) is model
    assert [id(m) for m in model.modules()] == [id(m) for m in modules_before]
    for m, kind in zip(model.modules(), kinds_before, strict=True):
        assert type(m) is TORCH_TO_SEQFAST.get(kind, kind), f"{kind.__name__} became {type(m).__name__}"
    assert sum(type(m) in TORCH_TO_SEQFAST.values() for m in model.modules()) == 6
    assert type(model.head[2].rnn) is MyLSTM
    assert [(n, id(p)) for n, p in model.named_parameters()] == params_before
    assert list(model.state_dict()) == keys_before


def test_patched_outputs_and_gradients_match_torch_and_unpatch_restores():
    model, x = _model(), _input()
    reference = copy.deepcopy(model)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    seqfast.patch(model)
    actual = model(x)
    actual.sum().backward()
    assert_all_close([actual.detach()], [expected.detach()], 1e-10, ["output"])
    assert_all_close(
        [p.grad for p in model.parameters()], expected_grads, 1e-10, [n for n, _ in model.named_parameters()]
    )
    assert seqfast.unpatch(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(not hasattr(m, "backend") for m in _recurrent(model))
    assert_all_close([model(x).detach()], [reference(x).detach()], 0.0, ["output after unpatch"])


def test_bare_module_as_model():
    torch.manual_seed(0)
    model = nn.LSTM(4, 5, num_layers=2, dtype=F64)
    x = torch.randn(6, 2, 4, dtype=F64)
    expected = flatten(model(x))
    assert seqfast.patch(model) is model
    assert type(model) is seqfast.LSTM
    assert_all_close(flatten(model(x)), expected, 1e-10, ["output", "h_n", "c_n"])
    seqfast.unpatch(model)
    assert type(model) is nn.LSTM
    cell = nn.GRUCell(4, 5)
    assert type(seqfast.patch(cell)) is seqfast.GRUCell
    assert type(seqfast.unpatch(cell)) is nn.GRUCell


def test_optimizer_state_carries_across_patch():
    model, twin, x = _model(), _model(), _input()
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, twin)]
    for step in range(2):
        if step == 1:
            seqfast.patch(model)
        for m, opt in zip((model, twin), optimizers, strict=True):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    state = optimizers[0].state
    assert all(state[p]["step"].item() == 2 for p in model.parameters())
    assert_all_close(list(model.parameters()), list(twin.parameters()), 1e-10, [n for n, _ in model.named_parameters()])


def test_hooks_registered_before_patch_still_fire():
    model, x = _model(), _input()
    fired = []
    model.stack[0].register_forward_hook(lambda m, args, out: fired.append(("lstm", type(m).__name__)))
    model.cells["gru"].register_forward_pre_hook(lambda m, args: fired.append(("gru", type(m).__name__)))
    model.head[0].rnn.register_forward_hook(lambda m, args, out: (out[0] + 1, out[1]))
    expected = model(x)
    fired.clear()
    seqfast.patch(model)
    actual = model(x)
    assert fired[0] == ("lstm", "LSTM") and type(model.stack[0]) is seqfast.LSTM
    assert fired.count(("gru", "GRUCell")) == x.shape[1]
    assert_all_close([actual.detach()], [expected.detach()], 1e-10, ["output with hook"])


@pytest.mark.parametrize("backend", [None, "reference"])
def test_patch_sets_backend(backend):
    model = _model()
    seqfast.patch(model, backend=backend)
    patched = [m for m in _recurrent(model) if type(m) is not MyLSTM]
    assert len(patched) == 6
    assert all(m.backend == backend for m in patched)
    assert not hasattr(model.head[2].rnn, "backend")


def test_patch_backend_is_used():
    model = _model()
    seqfast.patch(model, backend="no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        model(_input())


def test_unpatch_turns_seqfast_modules_into_torch_classes():
    torch.manual_seed(0)
    ours = nn.ModuleList([seqfast.RNN(3, 4, nonlinearity="relu", dtype=F64), seqfast.LSTMCell(3, 4, dtype=F64)])
    x = torch.randn(5, 2, 3, dtype=F64)
    expected = [flatten(ours[0](x)), flatten(ours[1](x[0]))]
    seqfast.unpatch(ours)
    assert (type(ours[0]), type(ours[1])) == (nn.RNN, nn.LSTMCell)
    assert_all_close(flatten(ours[0](x)), expected[0], 1e-10, ["output", "h_n"])
    assert_all_close(flatten(ours[1](x[0])), expected[1], 1e-10, ["h", "c"])


def test_parametrized_module_is_patched_and_keeps_its_parametrization():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(Output(nn.LSTM(3, 5, dtype=F64)))
    weight_norm(model[0].rnn, "weight_hh_l0")
    x = torch.randn(4, 2, 3, dtype=F64)
    expected = model(x)
    seqfast.patch(model, backend="reference")
    rnn = model[0].rnn
    assert isinstance(rnn, seqfast.LSTM) and parametrize.is_parametrized(rnn, "weight_hh_l0")
    assert rnn.backend == "reference"
    assert_all_close([model(x)], [expected], 1e-12, ["output"])
    seqfast.unpatch(model)
    assert type(rnn).__bases__[0] is nn.LSTM and parametrize.is_parametrized(rnn, "weight_hh_l0")
    seqfast.patch(model)
    parametrize.remove_parametrizations(rnn, "weight_hh_l0")
    assert type(rnn) is seqfast.LSTM


def test_patch_sets_backend_on_modules_already_seqfast():
    model = nn.Sequential(Output(seqfast.GRU(3, 4)))
    seqfast.patch(model, backend="reference")
    assert model[0].rnn.backend == "reference"
