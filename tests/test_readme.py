"""The documentation's code, kept true: docs/training.md's "A new downstream" example runs as written (one file,
one row in DOWNSTREAMS, and the config then takes the new architecture's own keys and refuses the others), its
"A new margin loss" example trains through the config, and docs/api.md's example is the one tests/test_api.py runs."""
import re
import sys
import types

import pytest
import torch

from asv import models
from asv.config import CHOICES, ConfigError, load_config
from asv.models import DOWNSTREAMS, LOSSES, build_encoder, build_head, build_upstream
from tests.conftest import REPO

TRAINING = (REPO / "docs" / "training.md").read_text()


@pytest.fixture
def mean_std(monkeypatch):
    section = TRAINING[TRAINING.index("**A new downstream**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    module = types.ModuleType("asv.models.mean_pool")
    module.__package__ = "asv.models"  # the example's `from .pooling import StatsPool` resolves as in models/
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    monkeypatch.setitem(DOWNSTREAMS, "mean_std", module.MeanStd)
    return module.MeanStd


def test_readme_downstream_example_plugs_in(mean_std):
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["downstream.name=mean_std", "downstream.embed_dim=16"])
    assert cfg.downstream == mean_std.Options(embed_dim=16)
    upstream = build_upstream(cfg.upstream, cfg.data.sample_rate)
    encoder = build_encoder(upstream, cfg.downstream).eval()
    wavs, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    with torch.no_grad():
        embs = encoder(*upstream(wavs, lengths))
        alone = encoder(*upstream(wavs[1:, :12000], lengths[1:]))
    assert embs.shape == (2, 16)
    # tolerance: float32 rounding (u = 6e-8) through a few layers of O(1) values: ~1e-6, 1e-5 is 10x
    torch.testing.assert_close(embs[1:], alone, atol=1e-5, rtol=1e-5)  # padding changes nothing
    with pytest.raises(ConfigError, match="'downstream.channels' does not apply to downstream.name=mean_std"):
        load_config(None, ["downstream.name=mean_std", "downstream.channels=64"])
    assert "mean_std" in models.DOWNSTREAMS


def test_readme_api_example_is_the_one_the_api_test_runs():
    from asv import api

    section = (REPO / "docs" / "api.md").read_text()
    shown = re.search(r"```python\n(.*?)```", section, re.S)[1]
    example = api.__doc__.split("::\n", 1)[1]
    example = "\n".join(line[4:] if line.startswith("    ") else line for line in example.splitlines())
    assert shown.strip() in example and shown.count("\n") > 15


def test_docs_loss_example_plugs_in(monkeypatch):
    section = TRAINING[TRAINING.index("**A new margin loss**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    module = types.ModuleType("asv.models.sphereface")
    module.__package__ = "asv.models"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "docs/training.md", "exec"), module.__dict__)
    monkeypatch.setitem(LOSSES, "sphereface", module.MultiplicativeAngular)
    monkeypatch.setitem(CHOICES, "loss.name", tuple(LOSSES))  # the table as config reads it at import
    cfg = load_config(None, ["loss.name=sphereface", "loss.margin=0.5", "loss.scale=10"])
    head = build_head(8, 3, cfg.loss)
    assert type(head).__name__ == "MultiplicativeAngular"
    emb, labels = torch.randn(4, 8, requires_grad=True), torch.tensor([0, 1, 2, 0])
    loss, cosine = head(emb, labels)
    loss.backward()
    assert emb.grad.abs().sum() > 0
    theta = torch.acos(cosine.detach().gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
    logits = cosine.detach().scatter(1, labels[:, None], torch.cos(1.5 * theta))
    torch.testing.assert_close(loss.detach(), torch.nn.functional.cross_entropy(10 * logits, labels))
