"""README.md, docs/*.md and benchmarks/README.md kept true: every command they show names a script that exists,
options that script takes, configs that load and config keys that exist; every relative link reaches a file, and
every #anchor a heading of it. (The code examples run in tests/test_readme.py.)"""
import re
import shlex

import pytest

from asv.config import Config, flatten, load_config
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
KEYS = set(flatten(Config())) | {"downstream.*"}


def commands(page):
    """(line, argv) of every command in the page's bash blocks; continuation lines joined."""
    text = page.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            for part in re.split(r"\s*&&\s*", line):
                if part and not part.startswith("#"):
                    yield part, shlex.split(part)


def script_of(argv):
    """The repository script a command runs, or None (pip, pytest, git, ...)."""
    for i, word in enumerate(argv):
        if word.endswith((".py", ".sh")) and (REPO / word).suffix in (".py", ".sh"):
            return word, argv[i + 1:]
    return None, []


def heading_anchors(page) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


CASES = [(page, line, argv) for page in PAGES for line, argv in commands(page)]


@pytest.mark.parametrize("page, line, argv", CASES, ids=[f"{p.name}:{line[:60]}" for p, line, _ in CASES])
def test_documented_command_is_real(page, line, argv):
    script, args = script_of(argv)
    if script is None:
        return
    path = REPO / script
    assert path.is_file(), f"{page.name}: `{line}` runs {script}, which does not exist"
    source = path.read_text()
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            assert f'"{option}"' in source, f"{page.name}: `{line}`: {script} has no option {option}"
        elif re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*", arg) and script in ("train_asv.py", "evaluate_asv.py"):
            key = arg.split("=", 1)[0]
            assert key in KEYS or key.startswith("downstream."), f"{page.name}: `{line}`: no config key {key}"
    for i, arg in enumerate(args):
        if arg == "--config":
            load_config(str(REPO / args[i + 1]))  # loads, strictly


def test_every_documented_config_exists_and_loads():
    for page in PAGES:
        for name in set(re.findall(r"configs/[\w.]+\.yaml", page.read_text())):
            assert (REPO / name).is_file(), f"{page.name} names {name}, which does not exist"
            load_config(str(REPO / name))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_reach_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link {target} reaches nothing"
        if anchor and dest.suffix == ".md":
            assert anchor in heading_anchors(dest), f"{page.name}: link {target}: no such heading in {dest.name}"


def test_readme_is_short_and_starts_with_voxceleb1():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    assert "## VoxCeleb1 in four commands" in "\n".join(text.splitlines()[:60])
    assert all(p.name in text or p.name == "README.md" for p in PAGES), "every docs page is linked from README"


# docs/adversarial.md's batch command selects its tests with this pattern (grep -o), the check below with the same
BATCH_PATTERN = r"tests/test_[a-z0-9_]*\.py::test_[a-z0-9_]*"


def test_every_test_named_in_adversarial_md_exists():
    """The page maps issue 21's cases to tests; a renamed or removed test must not leave a row pointing nowhere,
    and its one command runs exactly the tests it names."""
    import subprocess
    page = REPO / "docs" / "adversarial.md"
    text = page.read_text()
    named = sorted(set(re.findall(BATCH_PATTERN, text)))
    assert len(named) > 50, named
    for node in named:
        file, name = node.split("::")
        path = REPO / file
        assert path.is_file() and re.search(rf"^def {name}\(", path.read_text(), re.M), \
            f"docs/adversarial.md names {node}, which does not exist"
    command = f"grep -o '{BATCH_PATTERN}' docs/adversarial.md | sort -u"
    assert f"$({command})" in text
    selected = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert sorted(selected.split()) == named  # sort's order depends on the locale
