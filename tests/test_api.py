"""The Python API (asv/api.py): its docstring's notebook example run exactly as written on a tiny trained run,
files and arrays embedding alike, evaluation's scores and chunking, bad input in one line, enrolments saved and
loaded, AS-norm, evaluate_asv.py --pair as a user of it, and `import asv` beside a user's own models/ and config.py."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import asv
import asv.embed
from asv import api
from asv.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder laid out as README's first line leaves it: data/demo (the demo corpus) and exp/demo (configs/demo.yaml,
    20 steps, validated at 10 and 20, best tested and calibrated)."""
    home = tmp_path_factory.mktemp("notebook")
    run("prepare_voxceleb.py", "--demo", "--out", home / "data" / "demo")
    run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={home / 'data' / 'demo'}",
        f"exp_dir={home / 'exp' / 'demo'}", "num_workers=0", "data.batch_size=16", "train.total_steps=20",
        "train.eval_step=10", "train.save_step=10", "train.log_step=10")
    return home


@pytest.fixture(scope="module")
def model(home):
    return asv.load(home / "exp" / "demo")


def corpus_file(home, utt: str) -> str:
    return str(home / "data" / "demo" / "corpus" / utt)


def notebook_example() -> str:
    """The indented block after '::' in asv/api.py's docstring, as a user would paste it."""
    block = []
    for line in api.__doc__.split("::\n", 1)[1].splitlines():
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_notebook_example(home, monkeypatch, capsys):
    monkeypatch.chdir(home)  # the example's relative paths: exp/demo, data/demo
    scope = {}
    exec(compile(notebook_example(), "asv/api.py (docstring)", "exec"), scope)
    dim = scope["model"].embed_dim
    assert scope["emb"].shape == (2, dim) and scope["same"].shape == (1, dim)
    # tolerance: alone vs batched: the same computation in float32 in another order (~1e-6 on O(1) values)
    np.testing.assert_allclose(scope["same"], scope["emb"][:1], atol=1e-5)  # alone vs batched with b
    result = scope["result"]
    assert result.accept and result.score >= result.threshold and result.threshold_name == "eer"
    assert result.llr is not None and "EER threshold" in result.description  # best was calibrated after training
    assert [name for name, _ in scope["ranked"]][0] == "alice" and len(scope["ranked"]) == 2
    matrix = scope["matrix"]
    assert matrix.shape == (4, 4) and scope["cross"].shape == (4, 2)
    np.testing.assert_array_equal(matrix, matrix.T)
    # tolerance: a unit vector's self-cosine in float32: 1 within a few u (6e-8) x dim; 1e-5 leaves margin
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
    assert (home / "enrolled.npz").is_file() and not list(home.glob("*.tmp"))
    assert capsys.readouterr().out.count("\n") == 2  # the two prints ran


def test_load_a_run_or_a_checkpoint(home, tmp_path):
    run_dir = home / "exp" / "demo"
    assert asv.load(run_dir).checkpoint == run_dir / "best"
    assert asv.load(run_dir / "step-10").checkpoint == run_dir / "step-10"
    unvalidated = tmp_path / "run"
    unvalidated.mkdir()
    (unvalidated / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    for folder, message in ((unvalidated, "no `best` checkpoint yet"), (tmp_path, "not a checkpoint folder")):
        with pytest.raises(ValueError, match=message):
            asv.load(folder)


def test_load_names_the_cause_in_one_line(home, tmp_path, monkeypatch):
    """One message per cause: no such folder (from another folder: which one was looked in), a pruned
    checkpoint, a dangling best, a run folder without best; a run folder is accepted as its best."""
    run_dir = home / "exp" / "demo"
    pruned = tmp_path / "pruned"
    (pruned / "step-20").mkdir(parents=True)
    (pruned / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (pruned / "valid_history.jsonl").write_text('{"step": 10, "eer": 5.0}\n{"step": 20, "eer": 6.0}\n')
    (pruned / "step-20" / "model.pt").write_bytes((run_dir / "step-20" / "model.pt").read_bytes())
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (dangling / "best").symlink_to("step-30")
    monkeypatch.chdir(tmp_path)  # not where exp/demo is
    cases = [("exp/demo", f"exp/demo: no such folder (looked for {tmp_path / 'exp' / 'demo'}; a relative path is "
                          f"read from the current folder, {tmp_path})"),
             (pruned / "step-10", f"{pruned / 'step-10'}: pruned (train.keep_num_ckpts keeps the newest checkpoints "
                                  "and best; its validation line is in"),
             (pruned, f"{pruned}: a run folder with no `best` checkpoint yet (nothing validated): give one of its "
                      "checkpoints instead (step-20)"),
             (dangling, f"{dangling}: a run folder whose best points at step-30, which is gone"),
             (dangling / "best", f"{dangling / 'best'}: points at step-30, which is gone")]
    for path, message in cases:
        with pytest.raises(ValueError) as error:
            asv.load(path)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    monkeypatch.chdir(home)
    assert asv.load("exp/demo").checkpoint == Path("exp/demo/best")  # the run folder, as its best
    result = subprocess.run([sys.executable, str(ROOT / "evaluate_asv.py"), "--ckpt-dir", str(pruned / "step-10"),
                             "--pair", "a.wav", "b.wav"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stderr.strip().startswith(f"error: {pruned / 'step-10'}: pruned")


def test_a_file_and_its_array_embed_the_same(home, model):
    path = corpus_file(home, "spk05/sess1/utt2.wav")
    wav = load_audio(path, model.sample_rate)  # (T,) float32 tensor
    by_file = model.embed(path)
    np.testing.assert_array_equal(by_file, model.embed(wav))
    np.testing.assert_array_equal(by_file, model.embed(wav.numpy().astype(np.float64)))  # numpy, any float dtype
    mixed = model.embed([wav, path, corpus_file(home, "spk05/sess0/utt0.wav")])
    # tolerance: alone vs batched, float32 summation order only (~1e-6 on O(1) embeddings)
    np.testing.assert_allclose(mixed[:2], np.repeat(by_file, 2, axis=0), atol=1e-5)
    folder = model.embed(home / "data" / "demo" / "corpus" / "spk05" / "sess1")  # every file, in sorted order
    assert folder.shape == (4, model.embed_dim)
    # tolerance: alone vs batched, float32 summation order only (~1e-6 on O(1) embeddings)
    np.testing.assert_allclose(folder[2], by_file[0], atol=1e-5)
    shortest = model.embed(wav[:model._min_samples])  # exactly the receptive field: embedded
    assert shortest.shape == (1, model.embed_dim) and np.isfinite(shortest).all()


def test_scores_are_evaluations(home, model):
    """The API scores a trial as evaluate_asv.py scored it at the end of training (best/eval/test/scores.txt)."""
    scores = home / "exp" / "demo" / "best" / "eval" / "test" / "scores.txt"
    enroll, test, score, _ = scores.read_text().splitlines()[0].split()
    # tolerance: scores.txt keeps 6 decimals (rounding 5e-7) plus float32 order differences (~1e-6 on a cosine)
    assert model.score(corpus_file(home, enroll), corpus_file(home, test)) == pytest.approx(float(score), abs=2e-6)


def test_eval_chunk_secs_bounds_the_upstream(home, monkeypatch):
    seen = []

    def spy(upstream, wavs, lengths, chunk_samples):
        seen.append(chunk_samples)
        return real(upstream, wavs, lengths, chunk_samples)

    real = asv.embed.run_chunked
    monkeypatch.setattr(asv.embed, "run_chunked", spy)
    chunked = asv.load(home / "exp" / "demo", overrides=["data.eval_chunk_secs=0.5"])
    chunked.embed(corpus_file(home, "spk05/sess1/utt2.wav"))
    assert seen == [8000]


def test_bad_input_is_one_line(home, tmp_path):
    model = asv.load(home / "exp" / "demo")  # its own: nobody enrolled yet
    path = corpus_file(home, "spk05/sess1/utt2.wav")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    cases = [
        (lambda: model.embed([]), "no audio given: an empty list"),
        (lambda: model.embed(tmp_path / "missing.wav"), r"missing\.wav: no such file"),
        (lambda: model.embed([path, tmp_path / "missing.wav"]), r"missing\.wav: no such file"),
        (lambda: model.embed(np.ones((2, 16000), np.float32)), r"a 2-D array of shape \(2, 16000\)"),
        (lambda: model.embed([path, np.ones((1, 16000))]), r"item 1: a 2-D array"),
        (lambda: model.embed(np.ones(16000, np.int16)), "int16 samples"),
        (lambda: model.embed(np.zeros(16000, np.float32)), "silent waveform"),
        (lambda: model.embed(np.array([np.nan, 1.0])), "NaN or inf"),
        (lambda: model.embed([path, 3]), "item 1: expected an audio file, a folder or a waveform, got int"),
        (lambda: model.score([path, path], path), "a: expected one audio file or waveform, got a list of 2"),
        (lambda: model.score(path, tmp_path), "b: expected one audio file or waveform, got the folder"),
        (lambda: model.verify("nobody", path), "speaker 'nobody' is not enrolled"),
        (lambda: model.identify(path), "no enrolled speakers"),
        (lambda: model.enroll("", [path]), "speaker name must be a non-empty string"),
        (lambda: model.load_enrolled(tmp_path / "missing.npz"), r"missing\.npz: no such file"),
        (lambda: model.load_enrolled(bad), r"bad\.npz: not a file save_enrolled wrote"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value), str(error.value)
    model.enroll("x", path)
    with pytest.raises(ValueError, match="threshold 'far:2'"):  # refused before the test file is embedded
        model.verify("x", tmp_path / "missing.wav", "far:2")


def write_wav(path, wav, rate=16000):
    import soundfile
    soundfile.write(str(path), np.asarray(wav, np.float32), rate, subtype="PCM_16")
    return str(path)


def degenerate_files(home, folder, model):
    """(a file of 1 sample, a file one sample short of the receptive field, a near-silent file of 2 s: dither
    at -96 dBFS, what a muted microphone records), each of which got `score 1.0000 ... same speaker` before."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    real = load_audio(corpus_file(home, "spk05/sess1/utt2.wav"), model.sample_rate).numpy()
    return (write_wav(folder / "one_sample.wav", real[:1]),
            write_wav(folder / "short.wav", real[:model._min_samples - 1]),
            write_wav(folder / "quiet.wav", rng.normal(0, 1.5e-5, 32000)))


def test_degenerate_input_is_refused(home, model, tmp_path):
    one, short, quiet = degenerate_files(home, tmp_path, model)
    good = corpus_file(home, "spk05/sess1/utt2.wav")
    wav = load_audio(good, model.sample_rate)
    cases = [
        (lambda: model.embed(one), re.escape(one) + r": 0\.1 ms of audio, shorter than the model's receptive field"),
        (lambda: model.embed([good, short]), re.escape(short) + ": .* shorter than the model's receptive field"),
        (lambda: model.embed(wav[:model._min_samples - 1]), r"waveform 0 \(\d+ samples\): .*receptive field"),
        (lambda: model.embed([good, quiet]), re.escape(quiet) + r": no speech energy \(RMS \d\.\de-05"),
        (lambda: model.embed(wav * 1e-5), r"waveform 0 .*: no speech energy"),
        (lambda: model.score(good, quiet), re.escape(quiet) + ": no speech energy"),
        (lambda: model.compare(one, good), re.escape(one) + ": .*receptive field"),
    ]
    model.enroll("x", good)
    cases += [
        (lambda: model.verify("x", quiet), re.escape(quiet) + ": no speech energy"),
        (lambda: model.verify("x", good, threshold=float("nan")), "threshold nan: expected a finite number"),
        (lambda: model.verify("x", good, threshold=True), "threshold True: expected a finite number"),
        (lambda: model.identify(good, top=1.5), r"top must be a whole number >= 1, got 1\.5"),
        (lambda: model.identify(good, top=0), "top must be a whole number >= 1, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value), str(error.value)
    assert len(model.identify(good, top=np.int64(1))) == 1  # a numpy integer is a whole number


def test_degenerate_input_is_refused_by_the_verbs(home, model, tmp_path):
    """--pair, --extract and trial-list evaluation refuse as the API does: one line naming the file."""
    one, short, quiet = degenerate_files(home, tmp_path / "audio", model)
    good = corpus_file(home, "spk05/sess1/utt2.wav")
    ckpt = home / "exp" / "demo" / "best"
    (tmp_path / "trials.txt").write_text(f"1 {good} {good}\n0 {good} {quiet}\n")
    for args, bad, why in [(["--pair", good, one], one, "receptive field"),
                           (["--pair", quiet, good], quiet, "no speech energy"),
                           (["--extract", tmp_path / "audio", "--out", tmp_path / "e.npz"], one, "receptive field"),
                           (["--trials", tmp_path / "trials.txt"], quiet, "no speech energy")]:
        result = subprocess.run([sys.executable, "evaluate_asv.py", "--ckpt_dir", ckpt, *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode != 0, result.stdout
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {bad}: ") and why in last, result.stderr
        assert "same speaker" not in result.stdout
    assert not (tmp_path / "e.npz").exists()


def test_enrolled_speakers_saved_and_loaded(home, model, tmp_path):
    spk = "spk06/sess{}/utt0.wav"
    enrolled = model.enroll("dana", [corpus_file(home, spk.format(s)) for s in range(3)])
    # tolerance: a float32 norm: 1 within ~dim x u = 1e-5 worst case, ~1e-7 typical
    assert enrolled.shape == (model.embed_dim,) and np.linalg.norm(enrolled) == pytest.approx(1.0, abs=1e-6)
    unit = model.embed([corpus_file(home, spk.format(s)) for s in range(3)])
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    # tolerance: float32 mean of three unit vectors vs numpy's: a few u (6e-8) per element
    np.testing.assert_allclose(enrolled, unit.mean(0) / np.linalg.norm(unit.mean(0)), atol=1e-6)

    model.save_enrolled(tmp_path / "people.npz")
    again = asv.load(home / "exp" / "demo")
    assert again.load_enrolled(tmp_path / "people.npz") == list(model.enrolled)
    np.testing.assert_array_equal(again.enrolled["dana"], enrolled)
    other = asv.load(home / "exp" / "demo" / "step-10")  # another checkpoint: another embedding space
    with pytest.raises(ValueError, match="enrolled with other weights"):
        other.load_enrolled(tmp_path / "people.npz")


def test_asnorm_scores_and_raw_decisions(home, model):
    normed = asv.load(home / "exp" / "demo", overrides=["score.asnorm=true", "score.cohort_size=40"])
    a, b = corpus_file(home, "spk05/sess0/utt0.wav"), corpus_file(home, "spk05/sess2/utt3.wav")
    result = normed.compare(a, b, threshold=0.5)
    # tolerance: the same cosine by two float32 paths: a few u x dim (< 1e-6)
    assert result.score == pytest.approx(model.score(a, b), abs=1e-6)  # decided on the raw cosine
    # tolerance: AS-norm divides by a cohort std of ~0.1: the cosine's ~1e-6 float32 error becomes ~1e-5
    assert result.asnorm == pytest.approx(normed.score(a, b), abs=1e-5) and result.asnorm != result.score
    matrix = normed.score_matrix([a, b], [a, b])
    # tolerance: float32 cosines in both orders: a few u (6e-8) x dim
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    # tolerance: AS-norm divides by a cohort std of ~0.1: the cosine's ~1e-6 float32 error becomes ~1e-5
    assert matrix[0, 1] == pytest.approx(result.asnorm, abs=1e-5)


def test_pair_prints_the_apis_comparison(home, model):
    a, b = corpus_file(home, "spk05/sess0/utt0.wav"), corpus_file(home, "spk07/sess1/utt1.wav")
    out = run("evaluate_asv.py", "--ckpt_dir", home / "exp" / "demo" / "best", "--pair", a, b)
    expected = model.compare(a, b)
    assert (f"cosine score {expected.score:.4f} | calibrated LLR {expected.llr:.3f} | "
            f"threshold {expected.threshold:.4f}") in out
    assert out.rstrip().endswith("same speaker" if expected.accept else "different speakers")


def test_import_beside_a_users_own_models_and_config(home, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models package was imported')\n")
    (tmp_path / "config.py").write_text("raise ImportError('the user config.py was imported')\n")
    code = (f"import asv; m = asv.load({str(home / 'exp' / 'demo')!r}); "
            f"print(m.embed({corpus_file(home, 'spk05/sess0/utt0.wav')!r}).shape)")
    assert re.fullmatch(r"\(1, \d+\)\n", run("-c", code, cwd=tmp_path))
