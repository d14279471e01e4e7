"""LoRA through peft (upstream.lora_rank): only the adapters learn, model.pt holds the adapters and not a second
copy of the upstream, and evaluation's merged model embeds like the unmerged one."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from asv.config import ConfigError, load_config
from asv.embed import build_models
from asv.models import Extractor, load_model_file, model_meta, save_model_file
from asv.train import FROZEN_FILE, build_parts
from tests.conftest import REPO
from tests.test_finetune import ARCH


def lora_config(name, ckpt="", *extra):
    source = [f"upstream.ckpt={ckpt}"] if ckpt else ["upstream.random_init=true"]
    return load_config(None, [f"upstream.name={name}", *source, "upstream.trainable=true", f"upstream.arch={ARCH}",
                              "upstream.lora_rank=4", "featurizer.layer_selections=[0,1,2]",
                              "downstream.name=xvector_bn", "downstream.proj_dim=32", "downstream.channels=32",
                              "downstream.stats_dim=48", "downstream.embed_dim=16", *extra])


def randomise_adapters(upstream, seed=0):
    """peft starts lora_B at zero (merged == unmerged trivially): give the adapters weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in upstream.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def source_file(name, tmp_path):
    """A torchaudio weights file of a random small model: the upstream's source, as a bundle's .pth is."""
    torch.manual_seed(1)
    cfg = load_config(None, [f"upstream.name={name}", "upstream.random_init=true", f"upstream.arch={ARCH}"])
    upstream, _ = build_models(cfg)
    path = tmp_path / f"{name}.pth"
    torch.save(upstream.model.state_dict(), path)
    return path


@pytest.mark.parametrize("name", ["wav2vec2_base", "wavlm_base_plus"])
def test_only_the_adapters_of_the_layers_that_run_learn(name):
    parts = build_parts(lora_config(name), num_classes=4)
    learning = [n for n, p in parts.upstream.named_parameters() if p.requires_grad]
    assert learning and all("lora_" in n for n in learning)
    assert {n.split(".")[4] for n in learning} == {"0", "1"}  # layers 1-2 of 3 run (model.encoder.transformer.layers.i)
    if name == "wav2vec2_base":
        assert any(".attention.q_proj.lora_A" in n for n in learning)
    upstream_groups = [g for g in parts.optimizer.param_groups if g["name"].startswith("upstream")]
    assert sum(len(g["params"]) for g in upstream_groups) == len(learning)


@pytest.mark.parametrize("name", ["wav2vec2_base", "wavlm_base_plus"])
def test_checkpoint_holds_the_adapters_and_the_merged_model_embeds_like_the_unmerged_one(name, tmp_path):
    cfg = lora_config(name, source_file(name, tmp_path))
    torch.manual_seed(0)
    upstream, encoder = build_models(cfg)
    randomise_adapters(upstream)
    meta = model_meta(cfg.upstream.name, cfg.featurizer.layer_selections, cfg.downstream)
    save_model_file(str(tmp_path / "model.pt"), encoder, upstream, True, meta)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["upstream"]
    lora_keys = {k for k in upstream.state_dict() if "lora_" in k}
    assert set(saved) == lora_keys  # the adapters, not a second copy of the upstream
    wavs, lengths = torch.randn(3, 24000), torch.tensor([24000, 17000, 9000])
    with torch.no_grad():
        unmerged = Extractor(upstream, encoder).eval()(wavs, lengths)
    # evaluation's way: rebuilt from the source, the adapters loaded, then merged into plain weights
    torch.manual_seed(5)  # another seed: nothing may depend on the rebuild's random state
    up2, enc2 = build_models(cfg)
    load_model_file(str(tmp_path / "model.pt"), enc2, up2, meta)
    up2.merge_lora()
    assert not any("lora_" in k for k in up2.state_dict())
    assert up2.state_dict().keys() == build_models(load_config(None, [
        f"upstream.name={name}", "upstream.random_init=true", f"upstream.arch={ARCH}"]))[0].state_dict().keys()
    with torch.no_grad():
        merged = Extractor(up2, enc2).eval()(wavs, lengths)
    # float32: W + (alpha/r) B A folded once vs x W + (alpha/r) (x A) B, through 2 layers: ~1e-6 relative per
    # matmul; 1e-4 of the embedding's scale bounds it with room, far below what the adapters change (asserted)
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 1e-4 * scale
    with torch.no_grad():
        base = Extractor(*build_models(cfg)).eval()
        base.encoder.load_state_dict(encoder.state_dict())
        plain = base(wavs, lengths)
    assert (plain - unmerged).abs().max() > 1e-2 * scale  # the adapters do change the embeddings


def test_lora_needs_a_trainable_ssl_upstream():
    with pytest.raises(ConfigError, match="upstream.lora_rank applies to a trainable SSL upstream"):
        load_config(None, ["upstream.lora_rank=8"])
    with pytest.raises(ConfigError, match="lora_alpha applies with upstream.lora_rank"):
        load_config(None, ["upstream.lora_alpha=8"])


def lora_run(data, exp, steps, ckpt, name="wavlm_base_plus"):
    """A LoRA fine-tune of a small upstream (its weights from `ckpt`) on the demo corpus, a checkpoint every
    2 steps, one log line per step; returns (returncode, stdout + stderr)."""
    cmd = [sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
           "num_workers=0", "data.batch_size=4", "train.log_step=1", "train.eval_step=100", "train.save_step=2",
           "train.keep_num_ckpts=0", "train.log_with=none", f"train.total_steps={steps}",
           "train.test_after_train=false", f"upstream.name={name}", f"upstream.ckpt={ckpt}", "upstream.n_mels=80",
           "upstream.trainable=true", f"upstream.arch={ARCH}", "upstream.lora_rank=4",
           "featurizer.layer_selections=[0,1,2]", "optim.upstream_lr_ratio=0.5"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def step_losses(exp) -> dict:
    """{step: the loss of train.log's last line for it} (a resume redoes steps: the last line is the redone one)."""
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) \| loss (\S+)", (exp / "train.log").read_text(), re.M)}


def test_lora_resume_state_holds_no_upstream_copy_and_resumes_exactly(tmp_path):
    """The step-N folder's Accelerate state holds the adapters of the upstream, not its frozen base (LoRA's base
    weights, the CNN, the layers above the selection): those come back from upstream.ckpt, checked against the
    fingerprint the checkpoint recorded. A run stopped at step 2 and resumed to step 4 logs the uninterrupted run's
    losses and ends with its weights, bit for bit (same machine, one thread); the same resume with another
    upstream.ckpt behind the same path is refused."""
    from safetensors import safe_open

    data = tmp_path / "data"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True)
    source = source_file("wavlm_base_plus", tmp_path)
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    for exp, steps in ((clean, 4), (stopped, 2)):
        rc, out = lora_run(data, exp, steps, source)
        assert rc == 0, out[-3000:]

    upstream_state = torch.load(source, weights_only=True)
    upstream_bytes = sum(v.numel() * v.element_size() for v in upstream_state.values())
    with safe_open(str(stopped / "step-2" / "model_2.safetensors"), "pt") as f:  # prepared third: the upstream
        keys = set(f.keys())
    adapters = {k for k in keys if "lora_" in k}
    assert adapters and not any("base_layer" in k or "feature_extractor" in k for k in keys)
    assert not any(".layers.2." in k for k in keys)  # above the deepest selected layer (2): never runs, frozen
    # what is left of the upstream: the adapters and nothing else of its weights (torchaudio's names: model.*)
    assert keys == adapters, sorted(keys - adapters)[:5]
    size = (stopped / "step-2" / "model_2.safetensors").stat().st_size
    assert size < 0.2 * upstream_bytes, (size, upstream_bytes)
    assert json.loads((stopped / "step-2" / FROZEN_FILE).read_text())["numel"] >= sum(
        v.numel() for v in upstream_state.values())  # every base weight is fingerprinted (LoRA wraps them all)

    rc, out = lora_run(data, stopped, 4, source)
    assert rc == 0 and "resumed from" in out, out[-3000:]
    assert step_losses(stopped) == step_losses(clean) and set(step_losses(clean)) == {1, 2, 3, 4}
    a, b = (torch.load(e / "step-4" / "model.pt", weights_only=True) for e in (clean, stopped))
    for part in ("encoder", "upstream", "head"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])

    # another source behind the same upstream.ckpt path: the rebuilt base is not the one step-2 trained with
    shutil.rmtree(stopped / "step-4")
    torch.save({k: v + 0.01 for k, v in upstream_state.items()}, source)
    rc, out = lora_run(data, stopped, 4, source)
    assert rc != 0 and "frozen weights this checkpoint trained with differ" in out, out[-3000:]
