"""Shared test setup: where the repository and the shared data are, and skipping (with the reason) when
the data is absent, so a fork outside this layout runs what it can."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real speech and VoxCeleb metadata, read-only (CI has it)
REAL_MINI = SHARED_DATA / "real-mini"
VOX1_META = SHARED_DATA / "voxceleb1-meta"
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
