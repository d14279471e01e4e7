"""asv/audio.py against lengths and samples recorded from SoX 14.4.2 (fixtures/sox_effects.json,
written by fixtures/make_sox_effect_fixture.py), so no sox binary is needed here."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asv.audio import gain_db, superb_effects, trim_silence  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mini"
REF = json.loads((FIXTURES / "sox_effects.json").read_text())
_spec = importlib.util.spec_from_file_location("make_sox_effect_fixture",
                                               FIXTURES / "make_sox_effect_fixture.py")
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)
SYNTHETIC = recipes.synthetic_cases()
TOLERANCE = 160  # samples, 10 ms


def cases(kind):
    return pytest.mark.parametrize("case", [c for c in REF["cases"] if c["kind"] == kind],
                                   ids=lambda c: c["id"])


def check(case, wav):
    assert len(wav) == case["input_length"]
    out = superb_effects(torch.from_numpy(wav), 16000)
    assert out.dtype == torch.float32 and out.dim() == 1
    assert abs(len(out) - case["sox_length"]) <= TOLERANCE, (len(out), case["sox_length"])
    if "first" in case:
        # tolerance: float32 of the sox binary's samples: a few ulp of [-1, 1]
        np.testing.assert_allclose(out[:20].numpy(), case["first"], rtol=0, atol=1e-6)
        # tolerance: float32 of the sox binary's samples: a few ulp of [-1, 1]
        np.testing.assert_allclose(out[-20:].numpy(), case["last"], rtol=0, atol=1e-6)


@cases("synthetic")
def test_synthetic_matches_sox(case):
    check(case, SYNTHETIC[case["id"]])


@cases("real-mini")
def test_real_mini_matches_sox(case):
    if not REAL_MINI.is_dir():
        pytest.skip(f"../shared/data/real-mini not found: {REAL_MINI}")
    check(case, recipes.load_real(REAL_MINI / case["id"]))


@pytest.mark.parametrize("ref", REF["gain"], ids=lambda g: f"{g['db']}dB")
def test_gain_matches_sox_exactly(ref):
    out = gain_db(torch.from_numpy(recipes.gain_probe()), ref["db"])
    expected = (np.array(ref["sox_int32"], dtype=np.float64) / 2**31).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_all_silent_is_empty():
    assert superb_effects(torch.zeros(16000), 16000).shape == (0,)
    assert trim_silence(torch.zeros(16000), 16000).shape == (0,)


def test_trim_silence_cuts_whole_pauses_after_the_window_lag():
    # Every square-wave sample is above 0.1%; the 20 ms window keeps the 319 samples after each
    # burst above, the 2681 below samples that follow are cut, the last 181 are kept at the end.
    square = torch.tensor([0.5, -0.5]).repeat(2500)
    wav = torch.cat([torch.zeros(1000), square, torch.zeros(3000), square[:4000], torch.zeros(500)])
    assert torch.equal(trim_silence(wav, 16000), torch.cat([wav[1000:6319], wav[9000:13500]]))


def test_superb_effects_wants_16k_mono():
    with pytest.raises(ValueError):
        superb_effects(torch.zeros(8000), 8000)
    with pytest.raises(ValueError):
        superb_effects(torch.zeros(2, 16000), 16000)
