"""The shard store (prepare_voxceleb.py --shards, data.shards): the same samples, losses, resume and scores as the
raw files, each process reading only its own batches' samples, and one line naming the file for a store that does
not fit its data folder, a missing shard or a corrupt one."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asv.audio import AudioError
from asv.config import load_config
from asv.data import ShardStore, TrainDataset, UtteranceDataset, read_manifest, trim_once
from tests.conftest import REPO
from tests.test_distributed import ENV, QUICK, TORCHRUN, kill_tree, losses, weights

STEPS = 10  # two checkpoints (save_step 5), half of the demo's 21-batch epoch: a resume lands mid-epoch


def run(*args, check=True, env=None):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            env=env or ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The demo data folder and its shards (1 MB each: ~50 shards, so batches span many)."""
    root = tmp_path_factory.mktemp("shards")
    run("prepare_voxceleb.py", "--demo", "--out", root / "data")
    run("prepare_voxceleb.py", "--shards", root / "data", "--out", root / "store", "--shard-mb", 1)
    return root / "data", root / "store"


def train_args(data, exp, *extra):
    return ["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}", *QUICK,
            f"train.total_steps={STEPS}", "train.test_after_train=false", *extra]


@pytest.fixture(scope="module")
def bare(store, tmp_path_factory):
    """The data folder without its audio (the manifest, trials, effects.tsv): the store is the only audio there
    is, as on a node that reaches the corpus through its shards only."""
    data, _ = store
    out = tmp_path_factory.mktemp("bare") / "data"
    shutil.copytree(data, out, ignore=shutil.ignore_patterns("corpus"))
    assert not any(Path(u.path).exists() for u in read_manifest(out))
    return out


@pytest.fixture(scope="module")
def runs(store, bare, tmp_path_factory):
    """The same seeded run from the raw files and from the shards (with no raw file to read)."""
    data, shards = store
    root = tmp_path_factory.mktemp("runs")
    run(*train_args(data, root / "raw"))
    run(*train_args(bare, root / "shards", f"data.shards={shards}"))
    return root / "raw", root / "shards"


def test_shards_hold_every_file_of_the_manifest_as_it_is(store):
    data, shards = store
    utts = read_manifest(data)
    reader = ShardStore(str(shards), data)
    assert sorted(p.name for p in shards.glob("shard-*")) == [f"shard-{k:06d}.tar" for k in range(len(reader.shards))]
    assert len(reader.shards) > 20 and not list(shards.glob("*.tmp"))
    for u in utts[::7]:
        assert reader.open(u.path).read() == Path(u.path).read_bytes()


@pytest.mark.parametrize("effects, crop", [("none", "fixed"), ("superb", "superb"), ("superb", "fixed"),
                                           ("none", "superb")])
def test_a_shard_gives_the_raw_files_examples_sample_for_sample(store, effects, crop):
    """Every reading path of TrainDataset (crop decode, trimmed span, whole file) and of UtteranceDataset."""
    data, shards = store
    utts = [u for u in read_manifest(data) if u.split == "train"][:40]
    trims = trim_once(data, utts, 16000, 0, show_progress=False) if effects == "superb" else None
    reader = ShardStore(str(shards), data)
    raw, sharded = (TrainDataset(utts, list(range(len(utts))), 16000, crop, effects, None, trims, s)
                    for s in (None, reader))
    rng = np.random.default_rng(0)
    for index in range(len(utts)):
        item = (index, float(rng.uniform(1.0, 3.0)), int(rng.integers(2**31)))
        a, b = raw[item], sharded[item]
        assert torch.equal(a[0], b[0]) and a[1] == b[1], item
    paths = [u.path for u in utts]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(UtteranceDataset(paths, 16000),
                                                       UtteranceDataset(paths, 16000, store=reader)))
    assert reader.reads.sum() == 2 * len(utts)  # every example came from the store, once


def test_training_from_shards_equals_training_from_the_raw_files(runs):
    raw, shards = runs
    assert losses((raw / "train.log").read_text()) == losses((shards / "train.log").read_text())
    for step in (5, 10):
        a, b = weights(raw / f"step-{step}"), weights(shards / f"step-{step}")
        assert all(torch.equal(a[k], b[k]) for k in a), step
    # validation read the store too: the same scores
    assert (raw / "step-10/eval/valid/scores.txt").read_text() == (shards / "step-10/eval/valid/scores.txt").read_text()


def test_a_killed_shard_run_resumes_exactly(store, bare, runs, tmp_path):
    _, shards = store
    _, clean = runs
    exp = tmp_path / "exp"
    cmd = [sys.executable, *train_args(bare, exp, f"data.shards={shards}")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (exp / "step-5").exists():  # killed as soon as the mid-epoch checkpoint is in place
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc)
    resumed = run(*cmd[1:])
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    after = losses(resumed.stdout)
    assert sorted(after) == [10] and after == {10: losses((clean / "train.log").read_text())[10]}
    a, b = weights(clean / "step-10"), weights(exp / "step-10")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_raw_file_run_goes_on_from_shards(store, runs, tmp_path):
    """data.shards may change on a re-run: the same examples, so the run goes on as if nothing changed."""
    data, shards = store
    raw, _ = runs
    exp = tmp_path / "exp"
    run(*train_args(data, exp, "train.total_steps=5"))
    resumed = run(*train_args(data, exp, f"data.shards={shards}"))
    assert "at step 5" in resumed.stdout and losses(resumed.stdout) == {10: losses((raw / "train.log").read_text())[10]}
    a, b = weights(raw / "step-10"), weights(exp / "step-10")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_from_shards_equals_evaluation_from_the_raw_files(store, bare, runs):
    _, shards = store
    raw, _ = runs
    run("evaluate_asv.py", "--ckpt-dir", raw / "step-10")
    from_files = (raw / "step-10/eval/test/scores.txt").read_text()
    (raw / "step-10/eval/test/scores.txt").unlink()
    out = run("evaluate_asv.py", "--ckpt-dir", raw / "step-10", f"data.dir={bare}", f"data.shards={shards}").stdout
    assert "EER" in out and (raw / "step-10/eval/test/scores.txt").read_text() == from_files


def test_from_a_url_through_wids_cache(store, tmp_path):
    """A URL (file:// here; http, s3, gs alike) is copied shard by shard into wids' cache as batches need them."""
    data, shards = store
    utts = read_manifest(data)
    os.environ["WIDS_CACHE"] = str(tmp_path / "cache")
    try:
        reader = ShardStore(shards.as_uri(), data)
        assert reader.keys() == ShardStore(str(shards), data).keys()
        assert reader.open(utts[100].path).read() == Path(utts[100].path).read_bytes()
    finally:
        del os.environ["WIDS_CACHE"]
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 1  # only the shard holding that sample


def one_line_error(result, *named):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(str(n) in lines[0] for n in named), lines
    return lines[0]


def test_a_store_of_other_data_a_missing_and_a_corrupt_shard_are_one_line_naming_the_file(store, tmp_path):
    data, shards = store
    other = Path(shutil.copytree(data, tmp_path / "other", symlinks=True))
    rows = (other / "utterances.csv").read_text().splitlines(keepends=True)
    (other / "utterances.csv").write_text("".join(rows[:-1]))  # one utterance fewer
    line = one_line_error(run(*train_args(other, tmp_path / "e1", f"data.shards={shards}"), check=False),
                          shards / "shards.json")
    assert "another manifest" in line
    broken = Path(shutil.copytree(shards, tmp_path / "broken"))
    (broken / "shard-000003.tar").unlink()
    line = one_line_error(run(*train_args(data, tmp_path / "e2", f"data.shards={broken}"), check=False),
                          broken / "shard-000003.tar")
    assert "missing" in line
    shutil.copy(shards / "shard-000003.tar", broken / "shard-000003.tar")
    with open(broken / "shard-000007.tar", "r+b") as f:  # cut short, as by an interrupted copy
        f.truncate(5000)
    line = one_line_error(run(*train_args(data, tmp_path / "e3", f"data.shards={broken}"), check=False),
                          broken / "shard-000007.tar")
    assert "corrupt" in line
    assert not (tmp_path / "e3" / "step-5").exists()


def test_a_shard_with_the_size_but_not_the_samples_the_index_lists_is_named(store, tmp_path):
    """Bytes changed in place (a shard swapped for another of the same size): found when it is first read."""
    data, shards = store
    broken = Path(shutil.copytree(shards, tmp_path / "broken"))
    first, second = broken / "shard-000001.tar", broken / "shard-000002.tar"
    size = first.stat().st_size
    first.write_bytes(second.read_bytes()[:size].ljust(size, b"\0"))
    reader = ShardStore(str(broken), data)
    utt = read_manifest(data)[int(reader.ends[0])]  # the first sample of shard 1
    with pytest.raises(AudioError, match="shard-000001.tar"):
        reader.open(utt.path)


def test_writing_refuses_another_folder_and_a_killed_write_completes(store, tmp_path):
    data, shards = store
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    refused = run("prepare_voxceleb.py", "--shards", data, "--out", tmp_path / "notes", check=False)
    assert refused.returncode != 0 and "mine.txt" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes" / "mine.txt").read_text() == "mine"
    # a write killed after some shards: no index, a temporary shard; the same command finishes it
    partial = Path(shutil.copytree(shards, tmp_path / "partial"))
    (partial / "shards.json").unlink()
    (partial / "files.tsv").unlink()
    for p in sorted(partial.glob("shard-*.tar"))[20:]:
        p.unlink()
    (partial / "shard-000020.tar.tmp").write_bytes(b"half a tar")
    with pytest.raises(ValueError, match="no shard index"):
        ShardStore(str(partial), data)
    out = run("prepare_voxceleb.py", "--shards", data, "--out", partial, "--shard-mb", 1).stdout
    assert "(20 kept from an earlier write)" in out
    assert sorted(p.name for p in partial.iterdir()) == sorted(p.name for p in shards.iterdir())
    assert all((partial / p.name).read_bytes() == p.read_bytes() for p in shards.iterdir())


SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from asv.config import load_config
    from asv.data import open_store, read_manifest, train_loader
    cfg = load_config("configs/demo.yaml", sys.argv[3:])
    accelerator = Accelerator()
    utts = [u for u in read_manifest(cfg.data.dir) if u.split == "train"]
    store = open_store(cfg)
    loader = train_loader(cfg, utts, [0] * len(utts), [u.duration for u in utts], multiple=2, store=store)
    prepared = accelerator.prepare(loader)
    for n, _ in zip(range(int(sys.argv[2])), prepared):
        pass
    out = {"processes": accelerator.num_processes, "reads": store.reads.tolist(),
           "train_paths": [u.path for u in utts]}
    open(f"{sys.argv[1]}.{accelerator.process_index}.json", "w").write(json.dumps(out))
""")


def test_two_processes_each_read_only_the_samples_of_their_own_batches(store, tmp_path):
    import json
    data, shards = store
    script, batches = tmp_path / "read.py", 3
    script.write_text(SCRIPT)
    result = subprocess.run(TORCHRUN + [str(script), str(tmp_path / "rank"), str(batches), f"data.dir={data}",
                                        f"data.shards={shards}", "num_workers=0", "data.batch_size=16"],
                            cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 for r in ranks)
    # what each rank should have read: Accelerate deals batch i to process i % 2; the sampler is ours
    cfg = load_config("configs/demo.yaml", [f"data.dir={data}", "data.batch_size=16"])
    from asv.data import TrainBatchSampler
    utts = [u for u in read_manifest(data) if u.split == "train"]
    sampler = TrainBatchSampler([u.duration for u in utts], 16, cfg.data.crop, cfg.data.min_secs, cfg.data.max_secs,
                                cfg.train.seed, multiple=2)
    # Accelerate's loader fetches one batch ahead (to know which is last): each rank has read one batch more
    dealt = list(zip(range(2 * (batches + 1)), sampler.epoch_batches(0)))
    reader = ShardStore(str(shards), data)
    mine = [{utts[i].path for n, b in dealt if n % 2 == r for i, _, _ in b} for r in (0, 1)]
    assert not mine[0] & mine[1]  # disjoint: one epoch's permutation
    for r in (0, 1):
        expected = np.bincount([np.searchsorted(reader.ends, reader.row[p], side="right") for p in mine[r]],
                               minlength=len(reader.shards))
        assert ranks[r]["reads"] == expected.tolist() and sum(ranks[r]["reads"]) == 16 * (batches + 1)
