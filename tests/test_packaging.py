"""A regular (non-editable) install ships `kernels/` as `seqfast.kernels` and works from anywhere; the C++ build
announces itself, and a failing compiler leaves an install without `seqfast._C`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` into a fresh target folder, without the C++ extension so it takes seconds."""
    target = tmp_path_factory.mktemp("site")
    env = dict(os.environ, SEQFAST_NO_EXTENSION="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        env=env,
        cwd=target,
    )
    return target


def test_regular_install_imports_kernels_and_runs(installed):
    code = (
        "import torch, seqfast, seqfast.kernels.reference as r\n"
        f"assert seqfast.__file__.startswith({str(installed)!r}), seqfast.__file__\n"
        f"assert r.__file__.startswith({str(installed)!r}), r.__file__\n"
        "y, h = seqfast.GRU(3, 4)(torch.randn(5, 2, 3))\n"
        "print(tuple(y.shape))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=installed, capture_output=True, text=True
    )
    assert out.stdout.strip() == "(5, 2, 4)"


def test_every_kernels_subpackage_is_installed(installed):
    for init in (ROOT / "kernels").rglob("__init__.py"):
        relative = init.parent.relative_to(ROOT / "kernels")
        assert (installed / "seqfast" / "kernels" / relative / "__init__.py").is_file(), relative


def test_install_announces_the_build_and_survives_a_failing_compiler(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEQFAST_NO_EXTENSION"}
    env |= dict(CC="false", CXX="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps"]
    command = [*install, "--target", str(tmp_path), str(ROOT)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    announced = log.index("seqfast: compiling the C++ extension seqfast._C")
    assert log.index("seqfast: not building the C++ extension seqfast._C", announced) > announced
    assert (tmp_path / "seqfast" / "nn.py").is_file() and not list((tmp_path / "seqfast").glob("_C*"))
