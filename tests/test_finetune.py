"""Fine-tuning an SSL upstream (random-weight small architectures): what learns and at which learning rate,
and several processes with layers above featurizer.layer_selections (issue 24, item 4)."""
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from asv.config import ConfigError, load_config
from asv.train import build_parts, lr_at, set_schedules
from tests.conftest import REPO

# 3 transformer layers, 32 wide, with the real convolution geometry (hop 320) at 32 channels
ARCH = ("{encoder_num_layers: 3, encoder_embed_dim: 32, encoder_num_heads: 2, encoder_ff_interm_features: 64, "
        "encoder_pos_conv_kernel: 8, encoder_pos_conv_groups: 2, extractor_conv_layer_config: "
        "[[32, 10, 5], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]}")


def ssl_config(name="wavlm_base_plus", *extra):
    return load_config(str(REPO / "configs/demo.yaml"), [
        f"upstream.name={name}", "upstream.n_mels=80", "upstream.random_init=true", "upstream.trainable=true",
        f"upstream.arch={ARCH}", *extra])


# wavlm_base_plus: post-LN (layer_norm_first False), wav2vec2_large: pre-LN (True): torchaudio applies the
# transformer's layer norm after the last layer in the first and before the first layer in the second
@pytest.mark.parametrize("name", ["wavlm_base_plus", "wav2vec2_large"])
def test_fine_tuning_leaves_the_cnn_frozen_and_every_parameter_that_learns_gets_a_gradient(name):
    torch.manual_seed(0)
    cfg = ssl_config(name, "featurizer.layer_selections=[0,1]")
    parts = build_parts(cfg, num_classes=5)
    model = parts.upstream.model
    wavs = torch.randn(2, 16000)
    hidden, frames = parts.upstream(wavs, torch.tensor([16000, 11000]))
    loss, _ = parts.head(parts.encoder(hidden, frames), torch.tensor([0, 3]))
    loss.backward()
    cnn = list(model.feature_extractor.parameters())
    assert cnn and all(not p.requires_grad and p.grad is None for p in cnn)  # the CNN: frozen, no gradient
    # above layer 1 nothing is run: layers 2-3 (and the final layer norm of a post-LN model) are frozen
    assert all(not p.requires_grad for p in model.encoder.transformer.layers[1:].parameters())
    learning = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("encoder.transformer.layers.0.") for n in learning)
    # what DDP's reducer waits for: every parameter handed to the optimizer gets a gradient
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert {id(p) for p in parts.params} >= {id(p) for p in model.parameters() if p.requires_grad}


def test_parameter_groups_carry_the_learning_rates_asked_for():
    cfg = ssl_config("wavlm_base_plus", "optim.lr=1e-3", "optim.upstream_lr_ratio=0.1", "optim.layer_decay=0.5",
                     "featurizer.layer_selections=[0,2]", "scheduler.name=cosine", "scheduler.warmup_steps=10")
    parts = build_parts(cfg, num_classes=5)
    groups = {g["name"]: g for g in parts.optimizer.param_groups}
    # two transformer layers run (the deepest selected is 2): the top one at 0.1, then 0.05, the input at 0.025
    expected = {"downstream": 1e-3, "upstream.2": 1e-4, "upstream.1": 5e-5, "upstream.0": 2.5e-5}
    assert {k: pytest.approx(g["lr"], rel=1e-12) for k, g in groups.items()} == expected
    layer = parts.upstream.model.encoder.transformer.layers
    assert {id(p) for p in groups["upstream.2"]["params"]} == {id(p) for p in layer[1].parameters()}
    assert {id(p) for p in groups["upstream.1"]["params"]} == {id(p) for p in layer[0].parameters()}
    assert {id(p) for p in groups["downstream"]["params"]} == {
        id(p) for m in (parts.encoder, parts.head) for p in m.parameters()}
    for step in (0, 5, 123):  # kept through the schedule: each group's lr = schedule x its ratio
        set_schedules(Accelerator(cpu=True), cfg, parts, step)
        peak = lr_at(step, 1e-3, cfg.scheduler, cfg.train.total_steps)
        lrs = {g["name"]: g["lr"] for g in parts.optimizer.param_groups}
        assert lrs == pytest.approx({k: v / 1e-3 * peak for k, v in expected.items()}, rel=1e-12)


def test_upstream_learning_rates_need_a_trainable_ssl_upstream():
    with pytest.raises(ConfigError, match="optim.layer_decay applies to a trainable SSL upstream"):
        load_config(str(REPO / "configs/demo.yaml"), ["optim.layer_decay=0.9"])
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        ssl_config("wavlm_base_plus", "optim.layer_decay=1.5")


def test_two_processes_fine_tune_an_upstream_with_layers_above_the_selection(tmp_path):
    # DDP (gloo, two CPU processes) with find_unused_parameters=False: parameters that get no gradient make the
    # second synced step fail ("Expected to have finished reduction in the prior iteration")
    data = tmp_path / "data"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_asv.py",
           "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={tmp_path / 'exp'}", "num_workers=0",
           "data.batch_size=4", "train.log_step=1", "train.eval_step=100", "train.save_step=100",
           "train.log_with=none", "train.total_steps=3", "train.test_after_train=false",
           "upstream.name=wavlm_base_plus", "upstream.n_mels=80", "upstream.random_init=true",
           "upstream.trainable=true", f"upstream.arch={ARCH}", "featurizer.layer_selections=[0,1]",
           "optim.upstream_lr_ratio=0.1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    log = (tmp_path / "exp" / "train.log").read_text()
    assert all(f"step {s} | loss" in log for s in (1, 2, 3))


def model_weights(ckpt):
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    return state["upstream"], state["encoder"]


def test_staged_fine_tuning_resumes_exactly_across_the_switch(tmp_path):
    """upstream.freeze_steps=2: frozen for steps 1-2, joint from step 3. A run stopped at its step-2 checkpoint
    and resumed to step 4 (a kill right after that checkpoint leaves the same folder) ends with the
    uninterrupted run's weights, bit for bit (same machine, same threads). The upstream's dropout draws from the
    global RNG, seeded by the batch position (train_asv.py): without it the resume is off from step 3 on."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True)

    def run(exp, steps):
        cmd = [sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
               "num_workers=0", "data.batch_size=4", "train.log_step=1", "train.eval_step=100", "train.save_step=1", "train.keep_num_ckpts=0",
               "train.log_with=none", f"train.total_steps={steps}", "train.test_after_train=false",
               "upstream.name=wavlm_base_plus", "upstream.n_mels=80", "upstream.random_init=true",
               "upstream.trainable=true", f"upstream.arch={ARCH}", "featurizer.layer_selections=[0,2]",
               "upstream.freeze_steps=2", "optim.upstream_lr_ratio=0.5"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    clean, staged = tmp_path / "clean", tmp_path / "staged"
    run(clean, 4)
    run(staged, 2)
    assert "resumed from" in run(staged, 4)
    up = {s: model_weights(clean / f"step-{s}")[0] for s in (1, 2, 3)}
    learns = [k for k, v in up[3].items() if not torch.equal(v, up[2][k])]
    assert all(torch.equal(v, up[1][k]) for k, v in up[2].items())  # steps 1-2: frozen
    assert any(k.startswith("model.encoder.transformer.layers.1.") for k in learns)  # step 3: it learns
    assert not any("feature_extractor" in k for k in learns)  # the CNN never does
    for a, b in zip(model_weights(clean / "step-4"), model_weights(staged / "step-4")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["wavlm_base_plus", "wav2vec2_base"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """upstream.grad_checkpointing recomputes each transformer layer in backward; with dropout active (train
    mode) the recomputation replays the same RNG state, so every gradient equals the plain backward's."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = ssl_config(name, f"upstream.grad_checkpointing={str(checkpointing).lower()}",
                         f"upstream.arch={ARCH[:-1]}, encoder_dropout: 0.1, encoder_attention_dropout: 0.1}}")
        parts = build_parts(cfg, num_classes=5)
        assert parts.upstream.grad_checkpointing is checkpointing
        parts.upstream.train()
        calls = []
        for layer in parts.upstream.model.encoder.transformer.layers:
            layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early: pre-hook
        torch.manual_seed(1)
        hidden, frames = parts.upstream(torch.randn(2, 16000), torch.tensor([16000, 11000]))
        loss, _ = parts.head(parts.encoder(hidden, frames), torch.tensor([0, 3]))
        loss.backward()
        assert len(calls) == 3 * (2 if checkpointing else 1)  # checkpointed: each layer run again in backward
        grads.append({n: p.grad for n, p in parts.upstream.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in plain.values())
    # the same kernels on the same inputs: equal up to float32 rounding of a reordered sum (~1e-7 relative)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7), n
