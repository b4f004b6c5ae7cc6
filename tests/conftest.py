"""Test setup: strict dispatch, NaN-poisoned outputs, fixed seeds, no TF32, backends from the dispatch table, no
automatic routing to torch's own op (`SEQFAST_NATIVE=0`: the tests check seqfast's kernels; tests/test_native.py
checks the route), and oneDNN's GEMM from a fixed size instead of this machine's calibrated one (so that every
machine runs the same paths; tests/test_linear.py checks the calibration).

A backend that cannot load shows as skipped tests, unless `SEQFAST_REQUIRE` (comma-separated names, as CI sets it)
names it: then collection fails with the reason, so a broken build cannot pass as skips.
"""

import os

os.environ["SEQFAST_STRICT"] = "1"
os.environ["SEQFAST_POISON"] = "1"
os.environ["SEQFAST_NATIVE"] = "0"
os.environ["SEQFAST_ONEDNN_MIN_MACS"] = str(1 << 20)

import pytest  # noqa: E402
import torch  # noqa: E402

from seqfast import dispatch  # noqa: E402
from seqfast.kernels import common  # noqa: E402

common.set_poison(True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


REQUIRED = {name for name in os.environ.get("SEQFAST_REQUIRE", "").split(",") if name}


def backend_params(device_type):
    """Backends for `device_type` in priority order; one that cannot load shows as a skip with its reason."""
    params = []
    for name in dispatch.names(device_type):
        try:
            dispatch.load(name)
            marks = []
        except RuntimeError as e:
            if name in REQUIRED:
                raise RuntimeError(f"SEQFAST_REQUIRE names {name}, which cannot load: {e}") from e
            marks = [pytest.mark.skip(reason=str(e))]
        if device_type == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


CPU_BACKENDS = backend_params("cpu")


@pytest.fixture
def empty_calibration_cache(monkeypatch, tmp_path):
    """This machine's calibrations (`seqfast.native.calibrated`) start empty, kept in `tmp_path`."""
    from seqfast import native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_machine_choices", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
