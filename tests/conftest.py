"""Shared test setup: where the repository and the shared data are, and skipping (with the reason) when
the data is absent, so a fork outside this layout runs what it can.

Tolerances: each explicit one says in a comment where it comes from (float32 error of the computation, or a
spread measured across kernels: tests/test_kernels.py reruns the numerics under ATEN_CPU_CAPABILITY=default and
one thread). The defaults, pytest.approx (rel 1e-6) and torch.testing.assert_close (float32: rtol 1.3e-6,
atol 1e-5), are used only where both sides are the same arithmetic up to the rounding of a few operations."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts import their helpers as `common`, as when run
from common import REAL_MINI, SHARED, VOX1_META  # noqa: E402  one way to find ../shared, for tests and benchmarks

SHARED_DATA = SHARED / "data"
FIXTURES = REPO / "tests" / "fixtures"


def need(path: Path) -> Path:
    """`path`, or skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data sits in ../shared/data beside the checkout")
    return path


@pytest.fixture
def real_mini() -> Path:
    return need(REAL_MINI)


@pytest.fixture
def vox1_meta() -> Path:
    return need(VOX1_META)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """prepare_voxceleb.py --demo's data folder, once per test module (test_prepare and test_tracking have their own)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return out
