"""The package as a fork or a Windows checkout gets it: no symlink in the tree (a checkout without
core.symlinks would get a text file there), and a built wheel holds asv/models from the top-level models/
folder, mapped by pyproject.toml, under a distribution name that collides with nothing on PyPI."""
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.conftest import REPO


def test_no_symlinks_are_tracked():
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in listing.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_wheel_holds_asv_models(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith("superb_asv-")  # "asv" on PyPI is Airspeed Velocity
    names = set(zipfile.ZipFile(wheel).namelist())
    models = {p.name for p in (REPO / "models").glob("*.py")}
    assert {f"asv/models/{m}" for m in models} <= names
    assert "asv/__init__.py" in names and not any(n.startswith("models/") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: extra" in meta and "Requires-Dist: kaldiio" in meta  # pip install -e ".[extra]"


def test_distribution_name():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "superb-asv"
