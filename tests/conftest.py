"""Test setup: strict dispatch, NaN-poisoned outputs, fixed seeds, no TF32, backends from the dispatch table, no
automatic routing to torch's own op (`SEQFAST_NATIVE=0`: the tests check seqfast's kernels; tests/test_native.py
checks the route), oneDNN's GEMM from a fixed size instead of this machine's calibrated one and the cpp backend's
loops on one plan, `packed-rows` unless `SEQFAST_CPP_PLAN` names another (so that every machine runs the same paths;
tests/test_linear.py and tests/test_cpp.py check the calibrations and the other plans).

A backend that cannot load shows as skipped tests, unless `SEQFAST_REQUIRE` (comma-separated names, as CI sets it)
names it: then collection fails with the reason, so a broken build cannot pass as skips.

Without a CUDA device, `TRITON_INTERPRET=1` is set here, before anything imports triton, so that the triton backend
runs its kernels on CPU tensors through triton's interpreter (`TRITON_CPU`). That adds no backend to `CPU_BACKENDS`:
the dispatch table never picks the interpreter, so triton runs only in the tests that ask for it.

A test module that defines `EXPECTED_SKIPS` (pieces of skip reasons) fails any other skip of its tests.
"""

import os
import sys

os.environ["SEQFAST_STRICT"] = "1"
os.environ["SEQFAST_POISON"] = "1"
os.environ["SEQFAST_NATIVE"] = "0"
os.environ["SEQFAST_ONEDNN_MIN_MACS"] = str(1 << 20)
os.environ.setdefault("SEQFAST_CPP_PLAN", "packed-rows")

import pytest  # noqa: E402
import torch  # noqa: E402

from seqfast import dispatch  # noqa: E402
from seqfast.kernels import common  # noqa: E402

common.set_poison(True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


REQUIRED = {name for name in os.environ.get("SEQFAST_REQUIRE", "").split(",") if name}


def backend_params(device_type, names=None):
    """Backends for `device_type` in priority order, or `names`; one that cannot load shows as a skip with its reason.

    Returns:
        `list` of `pytest.param(name)`, marked `gpu` for `"cuda"`, with id `name` (for `names`, `name-device_type`).
    """
    params = []
    for name in names or dispatch.names(device_type):
        try:
            dispatch.load(name)
            marks = []
        except RuntimeError as e:
            if name in REQUIRED:
                raise RuntimeError(f"SEQFAST_REQUIRE names {name}, which cannot load: {e}") from e
            marks = [pytest.mark.skip(reason=str(e))]
        if device_type == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=f"{name}-{device_type}" if names else name))
    return params


CPU_BACKENDS = backend_params("cpu")
# triton on CPU tensors through its interpreter (none where a CUDA device runs the compiled kernels), and on CUDA
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
TRITON_CPU = backend_params("cpu", ["triton"]) if _INTERPRETED else []
TRITON_CUDA = backend_params("cuda", ["triton"])


@pytest.fixture
def empty_calibration_cache(monkeypatch, tmp_path):
    """This machine's calibrations (`seqfast.native.calibrated`) start empty, kept in `tmp_path`."""
    from seqfast import native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_machine_choices", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip of a test in a module with `EXPECTED_SKIPS` fails unless its reason contains one of them."""
    report = (yield).get_result()
    expected = getattr(getattr(item, "module", None), "EXPECTED_SKIPS", None)
    if expected is None or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(piece in reason for piece in expected):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip (the module's EXPECTED_SKIPS does not list it): {reason}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
