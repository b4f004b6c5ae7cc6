"""The GEMMs around the recurrence: from which size a float32 CPU product runs on oneDNN (`onednn_min_macs`)."""

import json

import pytest
import torch

from seqfast import linear, native


@pytest.fixture
def fresh_calibration(monkeypatch, empty_calibration_cache):
    """No threshold from the environment, this process or a cache file."""
    monkeypatch.delenv("SEQFAST_ONEDNN_MIN_MACS")
    monkeypatch.setattr(linear, "_min_macs", {})


def _timings(onednn_faster):
    """A `_best_times` whose oneDNN run is faster exactly at the sizes in `onednn_faster`."""
    return lambda macs: (1.0, 0.5 if macs in onednn_faster else 2.0)


@pytest.mark.parametrize(
    "onednn_faster, expected",
    [
        ({1 << 20, 1 << 22, 1 << 24, 1 << 26}, 1 << 20),
        ({1 << 24, 1 << 26}, 1 << 24),
        ({1 << 20, 1 << 24, 1 << 26}, 1 << 24),
        ({1 << 20, 1 << 22, 1 << 24}, linear._NEVER),
        (set(), linear._NEVER),
    ],
    ids=["everywhere", "from-16M", "not-at-4M", "not-at-64M", "nowhere"],
)
def test_calibration_takes_the_smallest_size_from_which_onednn_is_always_faster(monkeypatch, onednn_faster, expected):
    monkeypatch.setattr(linear, "_best_times", _timings(onednn_faster))
    assert linear._calibrate_onednn() == expected


# oneDNN's time as a share of BLAS's: half the margin, and the highest rate of five calibrations at 64M on a Xeon of
# model 167 (1.15x BLAS's), where oneDNN's products made the calls themselves 8-13% slower
@pytest.mark.parametrize("onednn_share", [1.0 - linear._ONEDNN_MARGIN / 2, 1 / 1.154], ids=["half-margin", "xeon-167"])
def test_calibration_leaves_a_near_tie_to_blas(monkeypatch, onednn_share):
    monkeypatch.setattr(linear, "_best_times", lambda macs: (1.0, onednn_share))
    assert linear._calibrate_onednn() == linear._NEVER


def test_threshold_is_measured_once_per_machine_and_thread_count(monkeypatch, fresh_calibration):
    monkeypatch.setattr(linear, "_best_times", _timings({1 << 22, 1 << 24, 1 << 26}))
    monkeypatch.setattr(linear.torch, "get_num_threads", lambda: 3)
    assert linear.onednn_min_macs() == 1 << 22
    (entry,) = json.loads(native.cache_path().read_text()).values()
    assert entry == {"onednn-min-macs-threads3": 1 << 22}

    def never(macs):
        raise AssertionError("measured again")

    monkeypatch.setattr(linear, "_best_times", never)
    assert linear.onednn_min_macs() == 1 << 22  # this process's
    monkeypatch.setattr(native, "_machine_choices", None)
    monkeypatch.setattr(linear, "_min_macs", {})
    assert linear.onednn_min_macs() == 1 << 22  # the cache file's
    monkeypatch.setenv("SEQFAST_ONEDNN_MIN_MACS", "12345")
    assert linear.onednn_min_macs() == 12345


def test_threshold_decides_the_gemm(monkeypatch):
    x, w = linear.torch.randn(4, 8), linear.torch.randn(16, 8)
    monkeypatch.setenv("SEQFAST_ONEDNN_MIN_MACS", str(4 * 8 * 16))
    assert linear._onednn(x, w, None) == linear._ONEDNN and not linear.plain(4 * 8 * 16)
    monkeypatch.setenv("SEQFAST_ONEDNN_MIN_MACS", str(4 * 8 * 16 + 1))
    assert not linear._onednn(x, w, None) and linear.plain(4 * 8 * 16)


def test_calibration_on_this_machine_leaves_the_random_state(fresh_calibration):
    state = linear.torch.get_rng_state()
    assert linear.onednn_min_macs() in (*linear._CALIBRATION_MACS, linear._NEVER)
    assert linear.torch.equal(linear.torch.get_rng_state(), state)


def test_calibration_under_a_float64_default_dtype(fresh_calibration, monkeypatch):
    """A first call of a process with `torch.set_default_dtype(torch.float64)` (a float64 model, as torch.nn's
    modules then build) calibrates in float32 and gives torch.nn's results."""
    import torch

    import seqfast

    monkeypatch.delenv("SEQFAST_NATIVE")
    monkeypatch.setattr(native, "_routes", {})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = torch.nn.LSTM(4, 8)
        ours = seqfast.LSTM(4, 8)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(3, 2, 4, requires_grad=True)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
    finally:
        torch.set_default_dtype(default)
    assert linear.onednn_min_macs() in (*linear._CALIBRATION_MACS, linear._NEVER)


# (columns, rows of each pair, formed transposed): 16 rows per column are the least that go transposed
_WEIGHT_GRADS = [
    (linear.TRANSPOSED_MAX_COLS, (1000, 24), True),
    (linear.TRANSPOSED_MAX_COLS, (1000, 23), False),
    (linear.TRANSPOSED_MAX_COLS + 1, (2000, 24), False),
    (8, (250, 6), True),
    (8, (37, 5), False),
]


@pytest.mark.parametrize("cols, rows, transposed", _WEIGHT_GRADS, ids=["64", "64-fewer-rows", "65", "8", "8-few-rows"])
def test_weight_grad_sums_each_pair_in_either_layout(cols, rows, transposed):
    assert linear.transposed_weight_grad(sum(rows), cols) == transposed
    generator = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randn(m, n, generator=generator, dtype=torch.float64) for n in (20, cols)) for m in rows]
    got = linear.weight_grad(*pairs)
    assert got.shape == (20, cols) and got.is_contiguous()
    torch.testing.assert_close(got, sum(dy.T @ x for dy, x in pairs), rtol=1e-12, atol=1e-12)


def test_weight_grad_of_one_row_is_its_outer_product():
    """A single row (a step of one batch row), few columns included, gives its outer product bitwise, contiguous."""
    generator = torch.Generator().manual_seed(1)
    dy, x = torch.randn(1, 20, generator=generator), torch.randn(1, 8, generator=generator)
    got = linear.weight_grad((dy, x), (dy[:0], x[:0]))
    assert got.is_contiguous() and torch.equal(got, dy.T * x)
