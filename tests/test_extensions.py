"""The recurrent extensions beyond torch.nn (opt-in keyword arguments): `weight_drop` (DropConnect on `weight_hh`)."""

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_all_close, flatten, run_with_grads, twins
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast


def assert_same(actual, expected, tol):
    """Lists of tensors alike within relative RMS `tol`, named by position."""
    assert_all_close(actual, expected, tol, [f"tensor {i}" for i in range(len(expected))])


KINDS = [("lstm", {}), ("gru", {"bidirectional": True}), ("rnn_tanh", {"num_layers": 2, "batch_first": True})]


def masked_twin(ref, p):
    """A function calling torch.nn's module `ref` with every `weight_hh` times a mask drawn as `weight_drop` draws
    them (per layer-direction in parameter order, from the default generator), the parameters staying leaves."""

    def call(*args):
        params = dict(ref.named_parameters())
        for layer in ref._all_weights:
            name = layer[1]
            params[name] = params[name] * torch.empty_like(params[name]).bernoulli_(1 - p).div_(1 - p)
        return torch.func.functional_call(ref, params, args)

    return call


@pytest.mark.parametrize(("cell", "kwargs"), KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_drop_is_torch_nn_with_masked_recurrent_weights(backend, cell, kwargs):
    """In training each call draws one mask per `weight_hh`, scaled by 1 / (1 - p), for all steps; the gradients
    reach the unmasked parameters. Packed input with mixed lengths, random cotangents on every output."""
    p = 0.3
    ref, ours = twins(cell, 3, 5, backend, torch.float64, **kwargs)
    ours.weight_drop = p
    ref.train(), ours.train()
    shape = (4, 6, 3) if kwargs.get("batch_first") else (6, 4, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    lengths = [6, 4, 4, 1]
    reference = masked_twin(ref, p)
    for packed in (False, True):

        def call(module, packed=packed):
            data = pack_padded_sequence(x, lengths, batch_first=kwargs.get("batch_first", False)) if packed else x
            return module(data)

        torch.manual_seed(5)
        expected = run_with_grads(ref, lambda m, call=call: call(reference), [x])
        torch.manual_seed(5)
        actual = run_with_grads(ours, call, [x])
        assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-10)


def test_weight_drop_draws_a_new_mask_per_call_and_none_in_eval():
    torch.manual_seed(0)
    ref, ours = twins("lstm", 3, 4, None, torch.float64, num_layers=2)
    ours.weight_drop = 0.5
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    first, second = flatten(ours(x)), flatten(ours(x))
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(1)
    a = flatten(ours(x))
    torch.manual_seed(1)
    assert all(torch.equal(u, v) for u, v in zip(a, flatten(ours(x)), strict=True))
    ours.eval()
    assert_same(flatten(ours(x)), flatten(ref(x)), 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))


def test_weight_drop_argument():
    """A keyword of the three modules, in `repr` when set, checked; `state_dict` keys stay torch.nn's; `patch`
    leaves it off."""
    m = seqfast.GRU(3, 4, 2, weight_drop=0.25, bidirectional=True)
    assert m.weight_drop == 0.25
    assert repr(m) == "GRU(3, 4, num_layers=2, bidirectional=True, weight_drop=0.25)"
    assert repr(seqfast.LSTM(3, 4)) == "LSTM(3, 4)"
    assert list(m.state_dict()) == list(torch.nn.GRU(3, 4, 2, bidirectional=True).state_dict())
    assert seqfast.RNN(3, 4, 1, "relu", weight_drop=0.1).weight_drop == 0.1
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="weight_drop"):
            seqfast.LSTM(3, 4, weight_drop=bad)
    patched = seqfast.patch(torch.nn.Sequential(torch.nn.LSTM(3, 4)))
    assert patched[0].weight_drop == 0.0
    with pytest.raises(TypeError):
        seqfast.LSTMCell(3, 4, weight_drop=0.1)


def test_weight_drop_compiles_fullgraph():
    """Under `torch.compile(fullgraph=True)` a training call draws the same masks as an eager one from the same
    seed."""
    torch.manual_seed(0)
    model = seqfast.LSTM(3, 4, 2, weight_drop=0.5, bidirectional=True)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    expected = flatten(model(x))
    torch.manual_seed(3)
    assert_same(flatten(compiled(x)), expected, 1e-6)
