"""`--help` on every script lists every option with its default (and every config key where overrides apply)."""
import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asv.config import reference_rows
from conftest import REPO as ROOT

SCRIPTS = ["prepare_voxceleb.py", "train_asv.py", "evaluate_asv.py", "report.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")]  # common.py: helpers, not a verb
TAKES_OVERRIDES = {"train_asv.py", "evaluate_asv.py"}


class Captured(Exception):
    pass


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's own parser, caught when its main() asks it to parse."""
    name = "script_" + Path(script).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)  # loaded from its file: a script is not a package module
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    found = {}

    def grab(self, *args, **kwargs):
        found["parser"] = self
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(Captured):
        module.main()
    return found["parser"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_its_default(script, monkeypatch):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines, also inside words at hyphens
    squeezed = "".join(out.stdout.split())
    for action in parser_of(script, monkeypatch)._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            assert option in text, (script, option)
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            assert f"default:{action.default}".replace(" ", "") in squeezed, (script, action.option_strings)
    if script in TAKES_OVERRIDES:
        for key, default, _ in reference_rows():
            assert re.search(rf"(^|\s){re.escape(key)}={re.escape(default)}(\s|$)", out.stdout, re.M), (script, key)


def test_ckpt_dir_in_both_spellings_and_one_flag_style(monkeypatch):
    """--ckpt-dir (the style of every other flag) and --ckpt_dir (older commands) give the same arguments."""
    sys.path.insert(0, str(ROOT))
    import evaluate_asv
    for flag in ("--ckpt-dir", "--ckpt_dir"):
        monkeypatch.setattr(sys, "argv", ["evaluate_asv.py", flag, "exp/a/step-10", "exp/a/step-20", "eval_batch=2"])
        args = evaluate_asv.parse_args()
        assert args.ckpt_dir == ["exp/a/step-10", "exp/a/step-20"] and args.overrides == ["eval_batch=2"]
    for verb in ("prepare_voxceleb.py", "train_asv.py", "evaluate_asv.py", "report.py"):
        text = (ROOT / verb).read_text()
        flags = set(re.findall(r'add_argument\("(--[a-z0-9_-]+)"', text))
        assert not [f for f in flags if "_" in f], (verb, flags)  # dashes throughout (aliases come second)


def test_throughput_has_a_decimal_below_ten():
    from asv.train import rate
    assert (rate(3.44), rate(9.96), rate(10.4), rate(212.3)) == ("3.4", "10.0", "10", "212")
