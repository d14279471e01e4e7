"""Where the SSL upstream's time is cut: layer truncation at evaluation, the feature cache of a frozen
upstream (asv/embed.py, evaluate_asv.py --feature-cache), and the GPU check's CPU smoke mode."""
import os
import re
import subprocess
import zlib
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from accelerate import Accelerator

from asv.config import load_config
from asv.run import save_config
from asv.embed import build_models, embed_files, load_extractors, meta_of
from asv.embed import FeatureCache
from asv.models import save_model_file
from tests.conftest import FIXTURES, REPO

SR = 16000
TINY = [f"upstream.ckpt={FIXTURES / 'tiny_wavlm.pt'}", "num_workers=0", "downstream.hidden_size=32",
        "downstream.aggregation_size=48", "downstream.embed_dim=16"]  # tiny WavLM: layers 0-2, 32 dims
SECS = [0.6, 1.1, 2.3, 3.0, 1.7]


def make_run(folder, overrides=(), steps=(1, 2)):
    """A run folder on the tiny WavLM fixture: config.yaml + step-N/model.pt, each step with its own weights."""
    cfg = load_config(str(REPO / "configs" / "base.yaml"), [*TINY, f"data.dir={folder / 'data'}", *overrides])
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    upstream, _ = build_models(cfg)
    for step in steps:
        torch.manual_seed(step)
        _, encoder = build_models(cfg, upstream)
        (folder / f"step-{step}").mkdir()
        save_model_file(str(folder / f"step-{step}" / "model.pt"), encoder, upstream, False, meta_of(cfg, upstream))
    return [folder / f"step-{s}" for s in steps]


def write_wav(path, secs, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(secs * SR)) / SR
    wav = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, SR, subtype="PCM_16")
    return str(path)


@pytest.fixture
def wavs(tmp_path):
    return [write_wav(tmp_path / "wav" / f"u{i}.wav", s, i) for i, s in enumerate(SECS)]


class Calls:
    """Forward calls of a module, counted by a hook."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def cached_embeddings(ckpts, paths, folder):
    """(embeddings per checkpoint, the cache, upstream forward calls) of one evaluation with a feature cache."""
    ex = load_extractors(ckpts)
    calls = Calls(ex.upstreams[0])
    cache = FeatureCache(folder, ex.cfg, ex.upstreams[0])
    tables, done = embed_files(Accelerator(cpu=True), ex, paths, cache=cache)
    assert done.all()
    return tables, cache, calls.n


def test_warm_cache_gives_the_same_embeddings_without_audio_or_upstream(tmp_path, wavs, monkeypatch):
    ckpts = make_run(tmp_path / "run")
    plain, _ = embed_files(Accelerator(cpu=True), load_extractors(ckpts), wavs)
    cold, cache, calls = cached_embeddings(ckpts, wavs, tmp_path / "cache")
    # one utterance per batch (an SSL upstream on a CPU): one pass per file, for both checkpoints
    assert (cache.found, cache.written, calls) == (0, len(wavs), len(wavs))
    entry = cache.load(wavs[3])
    assert entry.dtype == np.float16 and entry.shape == (3, 3 * 50 - 1, 32)  # layers 0-2, the conv's frames

    def no_decoding(*_, **__):
        raise AssertionError("audio decoded with a warm cache")
    monkeypatch.setattr("asv.data.load_audio", no_decoding)
    warm, cache, calls = cached_embeddings(ckpts, wavs, tmp_path / "cache")
    assert (cache.found, cache.written, calls) == (len(wavs), 0, 0)
    assert not np.allclose(plain[0], plain[1])  # two checkpoints, two encoders
    for p, c, w in zip(plain, cold, warm):
        np.testing.assert_array_equal(c, p)  # storing changes nothing
        # tolerance: the cache stores hidden states in float16 (u = 4.9e-4): 2u of the largest value
        np.testing.assert_allclose(w, p, atol=1e-3 * np.abs(p).max())  # float16 hidden states; embeddings ~0.1


def test_a_rewritten_file_is_computed_again(tmp_path, wavs):
    ckpts = make_run(tmp_path / "run")
    cached_embeddings(ckpts, wavs, tmp_path / "cache")
    before = os.stat(wavs[1])
    write_wav(tmp_path / "wav" / "u1.wav", 1.4, seed=7)
    os.utime(wavs[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a coarse clock must not hide it
    tables, cache, calls = cached_embeddings(ckpts, wavs, tmp_path / "cache")
    assert (cache.found, cache.written, calls) == (len(wavs) - 1, 1, 1)
    alone, _ = embed_files(Accelerator(cpu=True), load_extractors(ckpts), [wavs[1]])
    np.testing.assert_array_equal(tables[0][1], alone[0][0])  # the new audio's embedding, not the old one's


def corrupt(entry, how):
    """A damaged cache entry, as a full disk, a crash or a stray write leaves one."""
    data = entry.read_bytes()
    if how == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif how == "zero-filled":
        entry.write_bytes(b"\0" * len(data))
    elif how == "zeroed payload":  # the zip and .npy headers intact, the samples zeros: only the checksum tells
        entry.write_bytes(data[:200] + b"\0" * (len(data) - 400) + data[-200:])
    else:  # "wrong shape": a well-formed entry of other dimensions, with a checksum that matches them
        hidden = np.ones((2, 5, 7), np.float16)
        with open(entry, "wb") as f:
            np.savez(f, hidden=hidden, crc32=np.array(zlib.crc32(hidden.tobytes())))


@pytest.mark.parametrize("how", ["truncated", "zero-filled", "zeroed payload", "wrong shape"])
def test_a_damaged_cache_entry_is_named_and_computed_again(tmp_path, wavs, how):
    ckpts = make_run(tmp_path / "run")
    _, cache, _ = cached_embeddings(ckpts, wavs, tmp_path / "cache")
    alone, _ = embed_files(Accelerator(cpu=True), load_extractors(ckpts), [wavs[2]])
    entry = cache.entry(wavs[2])
    corrupt(entry, how)
    tables, cache, calls = cached_embeddings(ckpts, wavs, tmp_path / "cache")
    assert (cache.found, cache.written, calls) == (len(wavs) - 1, 1, 1)
    (line,) = cache.bad
    assert str(entry) in line and wavs[2] in line and "computed again" in line
    np.testing.assert_array_equal(tables[0][2], alone[0][0])  # the audio's embedding, not the damaged entry's
    assert cache.load(wavs[2]) is not None  # stored again, whole


def test_an_upstream_replaced_by_one_of_the_same_size_and_time_is_another_cache(tmp_path):
    weights = tmp_path / "tiny.pt"
    state = torch.load(FIXTURES / "tiny_wavlm.pt", weights_only=True)  # a WavLM checkpoint: {"cfg", "model"}
    torch.save(state, weights)
    ckpts = make_run(tmp_path / "run", [f"upstream.ckpt={weights}"])
    first = FeatureCache(tmp_path / "cache", load_extractors(ckpts).cfg, load_extractors(ckpts).upstreams[0]).dir
    st = os.stat(weights)
    model = state["model"]
    key = "feature_extractor.conv_layers.0.0.weight"  # the first convolution: every hidden state depends on it
    model[key] = model[key] + 0.5  # other weights, same shapes: torch.save writes a file of the same size
    torch.save(state, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_size == st.st_size and os.stat(weights).st_mtime_ns == st.st_mtime_ns
    ex = load_extractors(ckpts)
    assert FeatureCache(tmp_path / "cache", ex.cfg, ex.upstreams[0]).dir != first


def test_the_cache_folder_changes_with_what_decides_the_hidden_states(tmp_path):
    ckpts = make_run(tmp_path / "run")
    ex = load_extractors(ckpts)

    def folder(overrides=()):
        ex.cfg = load_config(str(ckpts[0].parent / "config.yaml"), list(overrides))
        return FeatureCache(tmp_path / "cache", ex.cfg, ex.upstreams[0]).dir

    first = folder()
    assert folder() == first and (first / "identity.json").is_file()
    assert folder(["data.eval_chunk_secs=2"]) != first
    assert folder(["train.mixed_precision=bf16"]) != first
    ex.upstreams[0].layers = [0, 1]
    assert folder() != first
    with pytest.raises(ValueError, match="--feature-cache: upstream.trainable=true"):
        folder(["upstream.trainable=true"])


def test_evaluation_runs_only_the_transformer_layers_below_the_deepest_selected(tmp_path, wavs):
    """featurizer.layer_selections [0, 1] of the tiny WavLM (layers 0-2): evaluation runs its first transformer
    layer only, and the cache keeps those two layers."""
    ckpts = make_run(tmp_path / "run", ["featurizer.layer_selections=[0,1]"])
    ex = load_extractors(ckpts)
    layers = [Calls(layer) for layer in ex.upstreams[0].model.encoder.transformer.layers]
    cache = FeatureCache(tmp_path / "cache", ex.cfg, ex.upstreams[0])
    embed_files(Accelerator(cpu=True), ex, wavs, cache=cache)
    assert [c.n for c in layers] == [len(wavs), 0]  # once per batch (one utterance each on a CPU); never the second
    assert cache.load(wavs[0]).shape[0] == 2


def test_evaluate_asv_feature_cache_second_run_finds_every_file(tmp_path, wavs):
    ckpts = make_run(tmp_path / "run")
    data = tmp_path / "run" / "data"
    data.mkdir()
    (data / "utterances.csv").write_text("id,path,speaker,duration,sample_rate,split\n" + "".join(
        f"u{i},{p},s{i % 2},{s},{SR},test\n" for i, (p, s) in enumerate(zip(wavs, SECS))))
    trials = tmp_path / "list.txt"
    trials.write_text("1 u0 u2\n0 u0 u1\n1 u1 u3\n0 u2 u3\n1 u2 u4\n0 u3 u4\n")
    cmd = [sys.executable, "evaluate_asv.py", "--ckpt_dir", *map(str, ckpts), "--trials", str(trials),
           "--feature-cache", str(tmp_path / "cache")]
    lines = []
    for _ in range(2):
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        lines.append(re.search(r"feature cache .*", out.stdout + out.stderr)[0])
    assert "0 of 5 files found; wrote 5" in lines[0] and "5 of 5 files found; wrote 0" in lines[1]


def test_gpu_check_cpu_smoke_runs_every_part():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("device: CPU (smoke sizes)") and re.fullmatch(r"done in \d+ s", lines[-1])
    for model in ("wavlm_base_plus+superb_xvector", "logmel+ecapa"):
        for precision in ("fp32", "bf16"):
            assert any(re.match(rf"train {re.escape(model)} {precision}: \d+\.\d+ steps/s", x) for x in lines), lines
    assert any(re.match(r"loader wavlm_base_plus fp32: waiting for batches \d+% of the step", x) for x in lines)
    assert any(re.match(r"eval wavlm_base_plus fp32: \d+ audio s/s .* vs \d+ at batch 1", x) for x in lines)
    fp16 = next(x for x in lines if x.startswith("fp16 train_asv.py:"))
    assert int(re.search(r"(\d+) skipped as non-finite", fp16)[1]) >= 1 and fp16.endswith("weights finite: yes")
    # train_asv.py as users run it: strong.yaml's bf16 AAM recipe on 2 (gloo) processes, validated, then tested
    recipe = next(x for x in lines if x.startswith("recipe train_asv.py configs/strong.yaml bf16 x 2 process(es): "))
    assert "global batch 8," in recipe, recipe  # 4 per process x 1 x 2 processes
    assert re.search(r"valid EER \d+\.\d+% \(step 2\), \d+\.\d+% \(step 4\)", recipe), recipe
    assert re.search(r"test EER \d+\.\d+% \(AS-norm \d+\.\d+%\)", recipe), recipe
    assert "bit for bit equal: yes" in next(x for x in lines if x.startswith("deterministic train_asv.py:"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1 and "no CUDA device" in out.stdout
