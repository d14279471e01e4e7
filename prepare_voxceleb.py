"""Stage 0: a corpus on disk -> plain-text manifests and trial lists.

    python prepare_voxceleb.py --voxceleb1 ROOT --out data/vox1 [--trials FILE ...]
    python prepare_voxceleb.py --voxceleb2 ROOT [--voxceleb1 ROOT] --out data/vox2 [--convert-to DIR]
    python prepare_voxceleb.py --corpus ROOT --out data/mine [--trials FILE ...]
    python prepare_voxceleb.py --kaldi data/kaldi/train --out data/mine [--trials FILE ...]
    python prepare_voxceleb.py --demo --out data/demo
    python prepare_voxceleb.py --shards data/vox1 --out shards/vox1 [--shard-mb 256]

Writes, under --out:
    utterances.csv      id,path,speaker,duration,sample_rate,split (one row per usable file; paths
                        relative to --out when the audio is inside it, absolute otherwise)
    speakers.txt        speaker split num_utterances
    trials/<name>.txt   label enroll test (1 = same speaker; utterance ids, as VoxCeleb's lists);
                        valid.txt is for checkpoint selection, every other list is a test list
    skipped.txt         path<TAB>reason for every file, folder or trial left out (a path holding
                        a tab, a newline or a name that is not UTF-8 is written as a JSON string)
    prepare.json        the arguments and the counts of this preparation
    effects.tsv         SUPERB's effects (gain -3 dB, SoX silence trimming) of each training file: its
                        kept sample intervals, so training decodes only each crop's span (--effects)

--shards writes a prepared data folder's audio (every file of its manifest, bytes as they are) into tar
shards for training and evaluation from a network filesystem or an object store (data.shards=DIR or URL:
docs/data.md); each shard is renamed into place once complete, the index last, and a re-run keeps the
complete ones.

A corpus is a `speaker/session/utterance.<audio>` tree, or a Kaldi data folder (wav.scp naming
audio files, utt2spk): then the utterance ids are Kaldi's, and trial lists name them.
Durations come from file headers, never from decoding (only float-encoded files are decoded,
to find NaN samples), so preparing VoxCeleb2 (1M files) takes minutes. The output folder is
built beside --out and swapped in whole: a kill leaves the previous preparation untouched. An
existing preparation made with other arguments is replaced only with --overwrite.
The effects pass decodes every training file once, in --workers processes; a kill keeps the chunks
it finished, and re-running the same command completes it.
"""
import argparse
import csv
import errno
import hashlib
import itertools
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from asv.audio import AUDIO_EXTENSIONS, SUPERB_RATE, AudioError, header_frames, header_subtype, load_audio, progress
from asv.data import read_kaldi_folder, read_manifest, read_trials, read_utt2spk, stored_path, trim_once, write_shards
from asv.demo import make_demo_corpus
from asv.run import atomic_write, recover_dir, replace_dir, what_is, write_json

# Official VoxCeleb1 trial lists (file stem -> list name); "2" = cleaned version.
OFFICIAL_TRIALS = {
    "veri_test": "vox1-O", "veri_test2": "vox1-O-clean",
    "list_test_all": "vox1-E", "list_test_all2": "vox1-E-clean",
    "list_test_hard": "vox1-H", "list_test_hard2": "vox1-H-clean",
}


# ---------------------------------------------------------------- corpus scanning
def speaker_of(utt):
    """An id is speaker/session/utterance.ext."""
    return utt.split("/", 1)[0]


def name_problem(name: str) -> str | None:
    """Why a file or folder name cannot go into the plain-text outputs, if it cannot."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(c.isspace() for c in name):
        return "name contains whitespace (trial lists are space separated)"
    return None


def scan_tree(root, skipped: dict):
    """{id: path} for every speaker/session/utterance.<audio> under root (ids use '/'); everything
    else that is not hidden goes into `skipped` (path -> reason)."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise SystemExit(f"{root}: corpus folder not found")
    if name_problem(root):
        raise SystemExit(f"{root}: corpus path: {name_problem(root)}")
    found = {}

    def entries(folder):
        try:
            return sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped[folder] = f"unreadable folder ({e.strerror})"
            return []

    def is_a(entry, kind):  # a link loop raises ELOOP where a dangling link answers False
        try:
            return entry.is_dir() if kind == "dir" else entry.is_file()
        except OSError:
            return False

    def visible(folder):  # hidden entries (.git, .DS_Store) are not part of a corpus
        return [e for e in entries(folder) if not e.name.startswith(".")]

    for speaker in visible(root):
        if not is_a(speaker, "dir"):
            skipped[speaker.path] = "not inside a speaker/session/ folder"
        for session in visible(speaker.path) if is_a(speaker, "dir") else []:
            for utt in visible(session.path) if is_a(session, "dir") else []:
                problem = name_problem(os.path.relpath(utt.path, root))
                if not problem and not is_a(utt, "file"):
                    problem = ("broken link or link loop" if utt.is_symlink() else None if is_a(utt, "dir")
                               else "not a file")
                if not problem and not utt.name.lower().endswith(AUDIO_EXTENSIONS):
                    problem = f"not an audio file this reads ({', '.join(AUDIO_EXTENSIONS)})"
                if is_a(utt, "dir") and not utt.is_symlink():
                    problem = "a folder below speaker/session/: its files are not read"
                if problem:
                    skipped[utt.path] = problem
                else:
                    found[f"{speaker.name}/{session.name}/{utt.name}"] = utt.path
            if not is_a(session, "dir"):
                skipped[session.path] = "not inside a speaker/session/ folder"
    return found


def kaldi_corpus(folder, out: Path) -> tuple[dict, dict]:
    """A Kaldi data folder -> ({utt id: audio file}, {utt id: speaker}), from its wav.scp and utt2spk."""
    try:
        ids, paths = read_kaldi_folder(folder)
        speaker = read_utt2spk(Path(folder) / "utt2spk", ids)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for path in paths:
        if Path(os.path.abspath(path)).is_relative_to(out):
            raise SystemExit(f"{path}: audio must not live inside --out {out}: that folder is replaced as a whole")
    return dict(zip(ids, paths)), speaker


def voxceleb_wav_dirs(root):
    """The wav folders of an official VoxCeleb layout: ROOT/wav, or ROOT/dev/wav + ROOT/test/wav."""
    dirs = [d for d in (Path(root) / "wav", Path(root) / "dev" / "wav", Path(root) / "test" / "wav") if d.is_dir()]
    if not dirs:
        raise SystemExit(f"{root}: no wav/ (or dev/wav/, test/wav/) folder: is this a VoxCeleb root?")
    return dirs


def voxceleb2_dirs(root):
    """The dev set's folder of an official VoxCeleb2 layout: ROOT/dev/aac, ROOT/aac, or ROOT itself
    holding the id0xxxx speaker folders (the test set, ROOT/test/aac, is left out)."""
    for folder in (Path(root) / "dev" / "aac", Path(root) / "aac"):
        if folder.is_dir():
            return [folder]
    if any(p.is_dir() for p in Path(root).glob("id*")):
        return [Path(root)]
    raise SystemExit(f"{root}: no dev/aac/, aac/ or id* speaker folders: is this a VoxCeleb2 root?")


def read_header(path, min_secs):
    """(duration, sample_rate) from the file header, or (None, reason) when it is unusable. Float-encoded
    files are decoded too: only they can hold NaN or inf samples, which would stop training later."""
    try:
        frames, rate = header_frames(path)
        if frames > 0 and header_subtype(path) in ("FLOAT", "DOUBLE"):
            load_audio(path, rate)
    except AudioError as error:
        return None, str(error).removeprefix(f"{path}: ")
    except Exception as error:  # any bad file is skipped, not fatal
        reason = getattr(error, "error_string", None) or getattr(error, "strerror", None) or error
        return None, f"unreadable: {reason}"
    if frames <= 0:
        return None, "empty: 0 frames"
    duration = frames / rate
    if duration < min_secs:
        return None, f"too short ({duration:.4f} s < {min_secs:g} s)"
    return duration, rate


def read_headers(files, min_secs, workers):
    """Split {id: path} into usable {id: (duration, sample_rate)} and skipped {id: reason}."""
    ids = sorted(files)
    chunks = [ids[i:i + 1000] for i in range(0, len(ids), 1000)]  # not a million futures at once
    with ThreadPoolExecutor(workers) as pool:  # header reads wait on the disk; FFmpeg and libsndfile release the GIL
        results = pool.map(lambda chunk: [read_header(files[i], min_secs) for i in chunk], chunks)
        results = progress(itertools.chain.from_iterable(results), len(ids), "reading headers", "file")
        usable, skipped = {}, {}
        for utt, (duration, rate_or_reason) in zip(ids, results):
            if duration is None:
                skipped[utt] = rate_or_reason
            else:
                usable[utt] = (duration, rate_or_reason)
    return usable, skipped


# ---------------------------------------------------------------- m4a -> flac
def convert_to_flac(task):
    """Decode (src, dst, sample_rate, duration) to a FLAC file at dst; None, or why src is unusable."""
    src, dst, rate, duration = task
    try:
        audio = load_audio(src, rate).numpy()  # at the file's own rate: nothing is resampled
    except AudioError as error:
        return str(error).removeprefix(f"{src}: ")
    if len(audio) < round(duration * rate):  # a cut download: the header promises more than there is
        return f"truncated: {len(audio) / rate:.4f} s of audio, the header says {duration:.4f} s"
    try:  # renamed once complete, so a killed run leaves no half file that looks done
        with atomic_write(dst, "wb") as f:
            sf.write(f, audio, rate, subtype="PCM_16", format="FLAC")  # libsndfile clips AAC's overshoots
    except (OSError, sf.LibsndfileError) as error:  # a full disk: stop; finished files are kept
        raise SystemExit(f"{dst}: cannot write ({error})") from None
    return None


def convert_m4a(files, usable, out_dir, workers):
    """Decode every usable .m4a to out_dir/speaker/session/utterance.flac in `workers` processes.
    Returns ({id: flac path}, {id: reason} for those that failed). Resumable: a FLAC file that
    exists was completed by an earlier run, so it is not decoded again."""
    flac = {utt: os.path.join(out_dir, os.path.splitext(utt)[0] + ".flac")
            for utt in sorted(usable) if files[utt].lower().endswith(".m4a")}
    todo = [utt for utt in flac if not os.path.exists(flac[utt])]
    tasks = [(files[utt], flac[utt], usable[utt][1], usable[utt][0]) for utt in todo]
    failed = {}
    with ProcessPoolExecutor(workers) as pool:  # decoding is CPU work: processes, not threads
        results = progress(pool.map(convert_to_flac, tasks, chunksize=16), len(tasks), "converting to flac", "file")
        for utt, reason in zip(todo, results):
            if reason is not None:
                failed[utt] = reason
    print(f"converted {len(todo) - len(failed)} m4a files to FLAC in {out_dir} ({len(flac) - len(todo)} "
          f"converted by an earlier run, {len(failed)} failed: see skipped.txt)")
    return {utt: path for utt, path in flac.items() if utt not in failed}, failed


# ---------------------------------------------------------------- trial lists
def trial_list_name(path):
    """vox1-O for veri_test.txt(.gz) and the other official lists, else the file stem."""
    stem = os.path.splitext(os.path.basename(str(path)).removesuffix(".gz"))[0]
    return OFFICIAL_TRIALS.get(stem, stem)


def official_trial_files(root):
    """The official VoxCeleb1-O lists found in root (plain or gzipped). Not E/H: they name all
    1,251 speakers, so a model trained on VoxCeleb1 dev cannot be tested on them fairly; pass
    them with --trials when training on other data (VoxCeleb2)."""
    found = []
    for stem in ("veri_test", "veri_test2"):
        candidates = [Path(root) / f"{stem}.txt", Path(root) / f"{stem}.txt.gz"]
        found += [p for p in candidates if p.is_file()][:1]  # the plain file if both exist
    if not found:
        raise SystemExit(f"{root}: no trial list found (expected e.g. veri_test2.txt); pass --trials FILE")
    return found


def corpus_id(path, roots):
    """The corpus id a trial entry names (relative to a root, or absolute inside one); None if outside."""
    if os.path.isabs(path):
        for root in roots:
            rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
            if rel.split(os.sep)[0] != "..":
                return rel.replace(os.sep, "/")
        return None
    rel = os.path.normpath(path).replace(os.sep, "/")
    return None if rel.split("/")[0] == ".." else rel


def load_trial_lists(trial_files, roots, files, skipped, speaker):
    """{name: [(label, enroll_id, test_id)]} without trials naming a skipped file, the speakers
    named (the test speakers, even where their trials were dropped) and the dropped trials."""
    trial_lists, speakers, dropped = {}, set(), []
    for trial_file in trial_files:
        name = trial_list_name(trial_file)
        if name in trial_lists or name == "valid":
            raise SystemExit(f"{trial_file}: list name {name!r} is already taken: rename the file")
        try:
            trials = read_trials(trial_file)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        trial_lists[name] = []
        for line, label, *entries in zip(trials.lines, trials.labels, trials.enroll, trials.test):
            ids = [corpus_id(e, roots) if roots else e for e in entries]  # a Kaldi folder's lists name its ids
            for entry, utt in zip(entries, ids):
                if utt is None:
                    raise SystemExit(f"{trial_file}:{line}: {entry} is outside the corpus root")
                if utt not in files:  # not a speaker/session/utterance of the corpus
                    where = f"under {' or '.join(map(str, roots))}" if roots else "(not an utterance id of wav.scp)"
                    raise SystemExit(f"{trial_file}:{line}: {entry} not found in the corpus {where}")
            speakers |= {speaker[u] for u in ids}
            bad = [u for u in ids if u in skipped]
            if bad:
                dropped.append((str(trial_file), f"line {line} dropped: {bad[0]} was skipped"))
            else:
                trial_lists[name].append((int(label), *ids))
        if not trial_lists[name]:
            raise SystemExit(f"{trial_file}: every trial names a skipped file")
    return trial_lists, speakers, dropped


def sample_pairs(rng, n, total, draw, all_pairs):
    """n distinct unordered pairs out of `total`: enumerate them when few, else draw and dedupe."""
    if total <= 2 * n:  # drawing would keep hitting pairs it already has
        return rng.sample(sorted(all_pairs()), n)
    seen = set()
    while len(seen) < n:
        seen.add(tuple(sorted(draw())))
    return sorted(seen)  # sets have no reproducible order


def balanced_trials(by_speaker, max_trials, rng):
    """Same-speaker pairs (at most max_trials/2) and as many different-speaker pairs, shuffled."""
    speakers = sorted(by_speaker)
    sizes = [len(by_speaker[s]) for s in speakers]
    n_target = sum(k * (k - 1) // 2 for k in sizes)
    n_nontarget = (sum(sizes) ** 2 - sum(k * k for k in sizes)) // 2
    n = min(n_target, n_nontarget, max_trials // 2)
    flat = [(s, u) for s in speakers for u in by_speaker[s]]
    weights = [k * (k - 1) // 2 for k in sizes]  # pick a speaker in proportion to its pairs

    def draw_target():
        return rng.sample(by_speaker[rng.choices(speakers, weights)[0]], 2)

    def draw_nontarget():
        while True:
            (s1, u1), (s2, u2) = rng.sample(flat, 2)
            if s1 != s2:
                return u1, u2

    def all_targets():
        return [p for s in speakers for p in itertools.combinations(by_speaker[s], 2)]

    def all_nontargets():
        return [(u1, u2) for (s1, u1), (s2, u2) in itertools.combinations(flat, 2) if s1 != s2]

    trials = [(1, *p) for p in sample_pairs(rng, n, n_target, draw_target, all_targets)]
    trials += [(0, *p) for p in sample_pairs(rng, n, n_nontarget, draw_nontarget, all_nontargets)]
    rng.shuffle(trials)
    return trials


def all_pair_trials(by_speaker, max_utts, rng):
    """Every pair among up to `max_utts` utterances, taken round-robin over the speakers: many trials from
    few utterances, so validation tells checkpoints apart at a small embedding cost."""
    queues = [rng.sample(by_speaker[s], len(by_speaker[s])) for s in sorted(by_speaker)]
    chosen = [u for round_ in itertools.zip_longest(*queues) for u in round_ if u is not None][:max_utts]
    owner = {u: s for s, utts in by_speaker.items() for u in utts}
    return [(int(owner[a] == owner[b]), a, b) for a, b in itertools.combinations(sorted(chosen), 2)]


# ---------------------------------------------------------------- splits and output
def choose_speakers(by_speaker, candidates, count, what, rng):
    """A seeded choice of `count` speakers among candidates with >= 2 usable utterances."""
    eligible = sorted(s for s in candidates if len(by_speaker[s]) >= 2)
    if len(eligible) < count:
        raise SystemExit(f"need {count} {what} speakers with >= 2 usable utterances, "
                         f"found {len(eligible)}: lower --{what}-speakers or add data")
    return set(rng.sample(eligible, count))


def escaped(path: str) -> str:
    """A path as one field of a tab-separated line: as it is, or as a JSON string when it would break the line."""
    return path if path.isprintable() else json.dumps(path)  # a surrogate (not UTF-8) is not printable either


def write_outputs(out, usable, files, speaker_split, trial_lists, skipped_lines, record, speaker):
    """utterances.csv, speakers.txt, trials/*.txt, skipped.txt, prepare.json into the folder `out`."""
    with atomic_write(out / "utterances.csv", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "path", "speaker", "duration", "sample_rate", "split"])
        for utt in sorted(usable):
            duration, rate = usable[utt]
            writer.writerow([utt, files[utt], speaker[utt], f"{duration:.4f}", rate, speaker_split[speaker[utt]]])
    counts = Counter(speaker[utt] for utt in usable)
    with atomic_write(out / "speakers.txt") as f:
        f.writelines(f"{s} {speaker_split[s]} {counts[s]}\n" for s in sorted(counts))
    for name, trials in trial_lists.items():
        with atomic_write(out / "trials" / f"{name}.txt") as f:
            f.writelines(f"{label} {e} {t}\n" for label, e, t in trials)
    with atomic_write(out / "skipped.txt") as f:
        f.writelines(f"{escaped(path)}\t{reason}\n" for path, reason in skipped_lines)
    write_json(out / "prepare.json", record)


def count_arg(auto_min):
    """argparse type: 'auto' or a speaker count >= auto_min."""
    def parse(text):
        if text == "auto":
            return text
        if not text.isdigit() or int(text) < auto_min:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= {auto_min}, got {text!r}")
        return int(text)
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--voxceleb1", metavar="ROOT", help="VoxCeleb1 root: ROOT/wav or ROOT/{dev,test}/wav")
    source.add_argument("--corpus", metavar="ROOT", help="any speaker/session/utterance.<audio> tree")
    source.add_argument("--kaldi", metavar="DIR",
                        help="a Kaldi data folder: wav.scp ('utt_id path' lines naming audio files; commands "
                             "'... |' are refused) and utt2spk; the utterance ids are Kaldi's, --trials name them")
    source.add_argument("--demo", action="store_true", help="generate a small synthetic corpus in OUT/corpus")
    source.add_argument("--shards", metavar="DATA_DIR",
                        help="write the audio of a prepared data folder into tar shards in --out (wids' indexed "
                             "format; train and evaluate with data.shards=OUT or its URL)")
    parser.add_argument("--shard-mb", metavar="MB", type=float, default=256, help="--shards: size of a shard")
    parser.add_argument("--voxceleb2", metavar="ROOT",
                        help="VoxCeleb2 dev set for training: ROOT/dev/aac, ROOT/aac or ROOT holding the id* "
                             "speaker folders (.m4a). With --voxceleb1, VoxCeleb1 dev joins training and VoxCeleb1's "
                             "trial lists test; alone, test and valid speakers are held out as with --corpus")
    parser.add_argument("--convert-to", metavar="DIR",
                        help="decode every .m4a once to DIR/speaker/session/utterance.flac (lossless; training "
                             "then reads FLAC, about twice as fast as AAC) in --workers processes, with the "
                             "manifest pointing at the FLAC files. Resumable: re-run the same command after an "
                             "interruption and only the missing files are decoded")
    parser.add_argument("--out", metavar="DIR", required=True, type=Path, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing preparation in --out that was made with other arguments")
    parser.add_argument("--trials", nargs="+", metavar="FILE",
                        help="trial lists 'label enroll test' (paths relative to the corpus root); "
                             "their speakers are held out as test. VoxCeleb1: official lists in ROOT")
    parser.add_argument("--test-speakers", metavar="N", type=count_arg(2), default="auto",
                        help="without --trials: speakers held out for a generated 'test' list "
                             "(auto = max(2, 10%% of speakers); --demo: 8)")
    parser.add_argument("--valid-speakers", metavar="N", type=count_arg(0), default="auto",
                        help="training speakers held out for the 'valid' list that picks checkpoints (auto = the "
                             f"fewest, at least {VALID_MIN_SPEAKERS}, whose list holds {VALID_MIN_TRIALS} target and "
                             f"{VALID_MIN_TRIALS} non-target trials, but no more than a third of the non-test "
                             "speakers, and none when that is 1; --demo: 4; 0: none, every non-test speaker trains, "
                             "as in SUPERB: then report.py --protocol superb)")
    parser.add_argument("--max-valid-utts", metavar="N", type=int, default=300,
                        help="validation utterances (round-robin over the valid speakers); every pair among them "
                             "is a validation trial")
    parser.add_argument("--min-secs", metavar="SECS", type=float, default=0.3, help="skip shorter files")
    parser.add_argument("--max-trials", metavar="N", type=int, default=20000, help="cap on a generated test list")
    parser.add_argument("--seed", type=int, default=0, help="seed for speaker choice, trials and demo")
    parser.add_argument("--workers", metavar="N", type=int, default=8,
                        help="threads reading file headers; processes for --convert-to and the effects pass "
                             "(at most the CPU count)")
    parser.add_argument("--effects", choices=("superb", "none"), default="superb",
                        help="superb: compute SUPERB's effects of every training file once (effects.tsv), for "
                             "training with data.effects=superb (the default); none: skip it (data.effects=none "
                             "does not need it, and training computes what it lacks)")
    args = parser.parse_args(argv)
    if not (args.voxceleb1 or args.voxceleb2 or args.corpus or args.kaldi or args.demo or args.shards):
        parser.error("one of --voxceleb1, --voxceleb2, --corpus, --kaldi, --demo or --shards is required")
    if args.shards and args.voxceleb2:
        parser.error("--shards takes a prepared data folder only")
    if args.shard_mb <= 0:
        parser.error("--shard-mb must be > 0")
    if args.voxceleb2 and (args.corpus or args.kaldi or args.demo):
        parser.error("--voxceleb2 combines with --voxceleb1 only")
    if (args.trials or args.voxceleb1) and args.test_speakers != "auto":
        parser.error("--test-speakers applies only without trial lists (they name the test speakers)")
    if args.max_trials < 2 or args.workers < 1 or args.min_secs < 0 or args.max_valid_utts < 2:
        parser.error("--max-trials and --max-valid-utts must be >= 2, --workers >= 1 and --min-secs >= 0")
    return args


def record_of(args) -> dict:
    """The arguments that define a preparation (paths absolute, trial lists by content), as prepare.json keeps them."""
    keep = ("voxceleb1", "voxceleb2", "corpus", "kaldi", "demo", "convert_to", "test_speakers", "valid_speakers",
            "max_valid_utts", "min_secs", "max_trials", "seed")
    absolute = {"voxceleb1", "voxceleb2", "corpus", "kaldi", "convert_to"}
    record = {k: os.path.abspath(getattr(args, k)) if k in absolute and getattr(args, k) else getattr(args, k)
              for k in keep}
    record["trials"] = {os.path.abspath(t): hashlib.sha256(Path(t).read_bytes()).hexdigest()[:16]
                        for t in args.trials or [] if os.path.isfile(t)}
    return record


HEADER_BYTES = 4096  # the audio header and the first samples: a replaced file differs there, at one read per file


def corpus_fingerprint(files: dict[str, str], speaker: dict[str, str]) -> str:
    """What the corpus is, by content: each file's id, speaker, size, mtime and a hash of its first bytes. A file
    moved to another speaker, replaced by another clip or rewritten changes it; a count of files would not."""
    h = hashlib.sha256()
    for utt in sorted(files):
        path = files[utt]
        st = os.stat(path)
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(HEADER_BYTES)).hexdigest()[:16]
        h.update(f"{utt}\t{speaker[utt]}\t{st.st_size}\t{st.st_mtime_ns}\t{head}\n".encode())
    return h.hexdigest()[:16]


def existing(out: Path, record: dict, overwrite: bool) -> dict | None:
    """What `out` holds: None (nothing, or --overwrite), or the prepare.json of a preparation made with these
    very arguments (the caller then checks the corpus did not change). Refuses any other content."""
    recover_dir(out)
    if what_is(out) in ("file", "link"):
        raise SystemExit(f"{out}: is a {what_is(out)}, not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    saved = out / "prepare.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if overwrite:
        if previous is None and not (out / "utterances.csv").is_file():
            raise SystemExit(f"{out} holds files that are not a preparation: --overwrite replaces preparations only")
        return None
    if previous is None or previous.get("arguments") != record:
        what = "another preparation" if previous else "files that are not a preparation"
        raise SystemExit(f"{out} holds {what}: choose another --out, or pass --overwrite to replace it")
    return previous


# The auto rule for validation speakers counts trials, not speakers: the fewest speakers (at least
# VALID_MIN_SPEAKERS, so non-target trials span many voices) whose all-pair list holds VALID_MIN_TRIALS target
# and as many non-target trials. 1,000 targets put the binomial standard error of a 5% miss rate at 0.7%,
# small enough to tell checkpoints apart that differ by a few points of EER. Never more than a third of the
# training pool (most speakers still train): a corpus too small for the trial counts says so in one line.
VALID_MIN_TRIALS = 1000
VALID_MIN_SPEAKERS = 10


def valid_trial_counts(sizes: list[int], max_utts: int) -> tuple[int, int]:
    """(target, non-target) trials of all_pair_trials over speakers with these utterance counts: the
    utterances taken round-robin up to max_utts, every pair among them a trial."""
    taken, left = [0] * len(sizes), max_utts
    while left > 0 and any(t < n for t, n in zip(taken, sizes)):
        for i, n in enumerate(sizes):
            if taken[i] < n and left > 0:
                taken[i] += 1
                left -= 1
    total = sum(taken)
    targets = sum(t * (t - 1) // 2 for t in taken)
    return targets, total * (total - 1) // 2 - targets


def auto_valid_speakers(order: list[str], sizes: dict, max_utts: int, cap: int) -> tuple[list[str], str]:
    """The first k of `order` (a seeded order of eligible training speakers) for the auto rule (see
    VALID_MIN_TRIALS), k <= cap; and a line saying what the list holds and why k."""
    best, best_k = -1, 0
    for k in range(2, min(cap, len(order)) + 1):
        targets, nontargets = valid_trial_counts([sizes[s] for s in order[:k]], max_utts)
        if k >= min(VALID_MIN_SPEAKERS, cap) and min(targets, nontargets) >= VALID_MIN_TRIALS:
            best_k = k
            break
        if min(targets, nontargets) > best:  # short of the counts: the k that comes closest (max_valid_utts
            best, best_k = min(targets, nontargets), k  # spread over more speakers gives fewer targets)
    if best_k < 2:
        return [], "validation: none (a third of the training speakers is fewer than 2)"
    k = best_k
    chosen = order[:k]
    targets, nontargets = valid_trial_counts([sizes[s] for s in chosen], max_utts)
    line = f"validation: {k} speakers, {targets} target and {nontargets} non-target trials"
    if min(targets, nontargets) < VALID_MIN_TRIALS:
        line += (f" (fewer than the {VALID_MIN_TRIALS} of each the auto rule asks for: the most this corpus gives "
                 "within a third of its training speakers and --max-valid-utts; checkpoint choice falls back to the average of the last checkpoints "
                 "when validation ties)")
    return list(chosen), line


def split_speakers(args, by_speaker, test_speakers, rng):
    """The valid speakers: taken out of training, so checkpoint selection never sees test trials."""
    train_pool = [s for s in sorted(by_speaker) if s not in test_speakers]
    count = args.valid_speakers
    if count == "auto" and not args.demo:
        eligible = sorted(s for s in train_pool if len(by_speaker[s]) >= 2)
        order = rng.sample(eligible, len(eligible))
        chosen, line = auto_valid_speakers(order, {s: len(by_speaker[s]) for s in eligible}, args.max_valid_utts,
                                           len(train_pool) // 3)
        count = len(chosen)
    elif count == "auto":
        count = 4  # the demo: its 4 validation speakers are part of what README shows
    elif count == 1:
        raise SystemExit("--valid-speakers 1: a list of one speaker has no different-speaker trials, so no EER; "
                         "give 0 (no validation) or >= 2")
    if len(train_pool) - count < 2:
        hint = " (VoxCeleb1-E/H name every speaker: pass --trials veri_test2.txt)" if args.voxceleb1 else ""
        raise SystemExit(f"{len(test_speakers)} of {len(by_speaker)} speakers are test speakers: too few left "
                         f"for {count} valid and >= 2 training speakers{hint}")
    if args.valid_speakers == "auto" and not args.demo:
        print(line)
        return set(chosen)
    return choose_speakers(by_speaker, train_pool, count, "valid", rng) if count else set()


def gather_files(args, out: Path, build: Path, skipped_paths: dict):
    """The corpus: ({id: path}, {id: speaker}, roots, the --convert-to folder); what it skips goes in skipped_paths."""
    if args.demo:
        make_demo_corpus(build / "corpus", seed=args.seed)
        roots = [build / "corpus"]
    elif args.corpus:
        roots = [Path(args.corpus)]
    elif args.kaldi:
        roots = []  # the files are wav.scp's, wherever they are
    else:  # VoxCeleb1, VoxCeleb2 or both: their speaker ids (id1xxxx, id0xxxx) never collide
        roots = voxceleb_wav_dirs(args.voxceleb1) if args.voxceleb1 else []
        roots += voxceleb2_dirs(args.voxceleb2) if args.voxceleb2 else []
    for folder in [*roots, *([args.convert_to] if args.convert_to else [])]:
        if not args.demo and Path(os.path.realpath(folder)).is_relative_to(out):
            raise SystemExit(f"{folder}: audio must not live inside --out {out}: that folder is replaced as a whole")
    convert_dir = args.convert_to and os.path.realpath(args.convert_to)
    if convert_dir and any(Path(convert_dir).is_relative_to(os.path.realpath(root)) for root in roots):
        raise SystemExit(f"{convert_dir}: --convert-to must be outside the corpus (a re-run would find both copies)")
    if convert_dir and name_problem(convert_dir):
        raise SystemExit(f"{convert_dir}: --convert-to path: {name_problem(convert_dir)}")
    files, speaker = kaldi_corpus(args.kaldi, out) if args.kaldi else ({}, {})
    for root in roots:
        for utt, path in scan_tree(root, skipped_paths).items():
            if utt in files:
                raise SystemExit(f"{path}: same id {utt} as {files[utt]}")
            files[utt] = path
    if not files:
        raise SystemExit(f"{roots[0]}: no speaker/session/utterance files ({', '.join(AUDIO_EXTENSIONS)}) found")
    speaker = speaker or {utt: speaker_of(utt) for utt in files}  # a tree's ids begin with their speaker
    return files, speaker, roots, convert_dir


def effects_pass(args, out: Path):
    """effects.tsv for the training files (at 16 kHz, SUPERB's rate): only what it lacks is computed."""
    if args.effects == "none":
        return
    train = [u for u in read_manifest(out) if u.split == "train"]
    trims = trim_once(out, train, SUPERB_RATE, min(args.workers, os.cpu_count()))
    print(f"effects.tsv: SUPERB's effects of {len(trims)} training files "
          f"({int(trims.kept.sum()) / SUPERB_RATE / 3600:.2f} h kept of {sum(u.duration for u in train) / 3600:.2f} h)")


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    if args.shards:
        try:
            print(write_shards(args.shards, out, args.shard_mb))
        except (ValueError, OSError) as e:  # AudioError is a ValueError: one line naming the file
            raise SystemExit(f"error: {e}") from None
        return
    record = record_of(args)
    previous = existing(out, record, args.overwrite)
    if previous and args.demo:  # generated from the seed: the same arguments make the same corpus
        print(f"{out} already holds this preparation (same arguments): nothing to do (--overwrite redoes it)")
        effects_pass(args, out)  # an interrupted pass completes
        return
    build = out.with_name(f".{out.name}.building")  # swapped in whole at the end
    try:
        build_and_swap(args, out, build, record, previous)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        shutil.rmtree(build, ignore_errors=True)  # the half-built folder; `out` is swapped only once complete
        where = Path(e.filename).parent if e.filename else build
        while not where.exists():
            where = where.parent
        raise SystemExit(f"cannot write the preparation of {out}: {e.strerror} in {where} "
                         f"({shutil.disk_usage(where).free / 1e9:.1f} GB free there); {out} is left as it was"
                         ) from None


def build_and_swap(args, out: Path, build: Path, record: dict, previous: dict | None):
    """The preparation, written into `build`, then swapped in place of `out` (replace_dir)."""
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    skipped_paths = {}  # path -> reason, for what never became an utterance id
    files, speaker, roots, convert_dir = gather_files(args, out, build, skipped_paths)
    fingerprint = corpus_fingerprint(files, speaker)
    if previous:
        shutil.rmtree(build)
        if previous.get("corpus_fingerprint") == fingerprint:
            print(f"{out} already holds this preparation (same arguments, the same {len(files)} files): nothing to "
                  "do (--overwrite redoes it)")
            effects_pass(args, out)  # an interrupted pass completes
            return
        raise SystemExit(f"{out} was prepared from {previous.get('corpus_files')} files, the corpus now has "
                         f"{len(files)}, and they changed (size, time or first bytes; corpus fingerprint "
                         f"{previous.get('corpus_fingerprint')} -> {fingerprint}): pass --overwrite to prepare it "
                         "again")
    rng = random.Random(args.seed)
    trial_files = args.trials or (official_trial_files(args.voxceleb1) if args.voxceleb1 else [])
    usable, skipped = read_headers(files, args.min_secs, args.workers)
    if convert_dir:
        flac, failed = convert_m4a(files, usable, convert_dir, min(args.workers, os.cpu_count()))
        files.update(flac)  # ids stay the corpus's (.m4a), so trial lists naming them still resolve
        for utt, reason in failed.items():
            del usable[utt]
            skipped[utt] = reason
    by_speaker = defaultdict(list)
    for utt in sorted(usable):
        by_speaker[speaker[utt]].append(utt)

    # Test speakers: those the trial lists name, else a seeded held-out set.
    trial_lists, test_speakers, dropped = load_trial_lists(trial_files, roots, files, skipped, speaker)
    if not trial_files:
        count = args.test_speakers
        if count == "auto":  # the demo keeps more speakers out, so its EER rests on more trials
            count = 8 if args.demo else max(2, round(0.1 * len(by_speaker)))
        test_speakers = choose_speakers(by_speaker, by_speaker, count, "test", rng)
    valid_speakers = split_speakers(args, by_speaker, test_speakers, rng)
    if not trial_files:
        trial_lists["test"] = balanced_trials({s: by_speaker[s] for s in test_speakers}, args.max_trials, rng)
    if valid_speakers:
        trial_lists["valid"] = all_pair_trials({s: by_speaker[s] for s in valid_speakers}, args.max_valid_utts, rng)

    split = {s: "test" if s in test_speakers else "valid" if s in valid_speakers else "train" for s in by_speaker}
    stored = {utt: stored_path(files[utt], build if args.demo else out) for utt in usable}  # the demo's: inside
    skipped_lines = sorted(skipped_paths.items()) + [(files[u], r) for u, r in sorted(skipped.items())] + dropped
    per_split = Counter(split[speaker[utt]] for utt in usable)
    record_out = {"arguments": record, "corpus_files": len(files), "corpus_fingerprint": fingerprint,
                  "utterances": len(usable),
                  "speakers": len(by_speaker), **per_split,
                  "skipped": len(skipped_lines), "trials": {n: len(t) for n, t in trial_lists.items()}}
    write_outputs(build, usable, stored, split, trial_lists, skipped_lines, record_out, speaker)
    replace_dir(build, out)
    effects_pass(args, out)
    for name, trials in trial_lists.items():
        print(f"trials/{name}.txt: {len(trials)} trials ({sum(t[0] for t in trials)} target)")
    dropped_note = f"; dropped {len(dropped)} trials naming skipped files" if dropped else ""
    print(f"prepared {len(usable)} utterances of {len(by_speaker)} speakers (train {per_split['train']} / "
          f"valid {per_split['valid']} / test {per_split['test']}); skipped {len(skipped_lines) - len(dropped)} "
          f"files{dropped_note} (see {out / 'skipped.txt'})")


if __name__ == "__main__":
    main()
