"""pytest set-up of the benchmark suite: strict dispatch, no TF32, and the shape sets, dtype and device options.

The suite is parametrised as shape x mode x provider (providers innermost, so the gate's torch.nn oracle is computed
once per shape and mode) from `benchmarks.shapes.SETS` (by default the `quick` and `overhead` sets) and the dispatch
table; a backend that does not load here shows as a skip with its reason. A shape naming its own dtype runs in that
one instead of `--bench-dtype`.
"""

import argparse

import pytest
import torch

from . import harness
from .shapes import DTYPES, SETS


def _set_names(text):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in SETS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown shape set {', '.join(unknown)}; choose from {', '.join(sorted(SETS))}"
        )
    return names


def pytest_addoption(parser):
    group = parser.getgroup("seqfast benchmarks")
    group.addoption(
        "--bench-set",
        default="quick,overhead",
        type=_set_names,
        help="comma list of shape sets from " + ", ".join(sorted(SETS)) + " (default quick,overhead)",
    )
    group.addoption("--bench-dtype", default="float32", choices=sorted(DTYPES), help="default float32")
    group.addoption("--bench-device", default="cpu", help="cpu (default) or cuda")
    group.addoption("--bench-compile", action="store_true", help="add the torch-compile provider")


def pytest_configure(config):
    harness.configure()


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "shape" in metafunc.fixturenames:
        shapes = list({s.id: s for name in config.getoption("--bench-set") for s in SETS[name]}.values())
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", harness.MODES)
    if "provider" in metafunc.fixturenames:
        device_type = torch.device(config.getoption("--bench-device")).type
        usable, unusable = harness.providers(device_type, compile=config.getoption("--bench-compile"))
        params = [pytest.param(p, id=p.name) for p in usable]
        params += [pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason)) for name, reason in unusable]
        metafunc.parametrize("provider", params)


@pytest.fixture
def dtype(request, shape):
    (name,) = shape.dtypes([request.config.getoption("--bench-dtype")])
    return DTYPES[name]


@pytest.fixture
def device(request):
    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return device
