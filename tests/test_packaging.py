"""A regular (non-editable) install ships `kernels/` as `seqfast.kernels` and works from anywhere."""

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
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--target",
         str(target), str(ROOT)],
        check=True, env=env, cwd=target,
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
