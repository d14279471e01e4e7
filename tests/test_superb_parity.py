"""Parity with s3prl 0.4.18 itself, without s3prl installed: our modules against outputs recorded from s3prl's
own (tests/fixtures/make_s3prl_fixtures.py, run by hand in the s3prl peer venv, documents every file).

SUPERB's x-vector, AM-softmax and featurizer must give s3prl's numbers; the fbank and SSL upstreams must give
s3prl's hidden states on the frames both call valid; SUPERB's effect chain must give s3prl's lengths. Where we
differ on purpose (frame counts, padding masks of SSL batches) the test pins the difference down.
"""
import json

import numpy as np
import pytest
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi

from asv.audio import load_audio
from asv.audio import superb_effects
from asv.models import AMSoftmax, WeightedSum
from asv.models.superb_xvector import SuperbXvector
from asv.models.upstream import KaldiUpstream, SSLUpstream
from tests.conftest import FIXTURES, REAL_MINI, need
from tests.fixtures.weights_recipe import recipe_weights, weights_sha256


def fixture(name):
    data = np.load(FIXTURES / name)
    return data, json.loads(str(data["meta"]))


def test_superb_xvector_has_s3prls_parameters_and_outputs():
    data, meta = fixture("s3prl_xvector.npz")
    model = SuperbXvector(24, SuperbXvector.Options(hidden_size=32, aggregation_size=48, embed_dim=32))
    # the same names and shapes, in the same order: an s3prl state dict loads as it is
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == meta["weights"]
    weights = recipe_weights(meta["weights"], meta["seed"])
    assert weights_sha256(weights) == meta["weights_sha256"]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    x, x_len = torch.from_numpy(data["x"]), torch.from_numpy(data["x_len"])
    with torch.no_grad():
        # tolerance: two float32 runs (s3prl's CPU, ours) of 5 TDNN layers of up to 1536-term sums and a std:
        # ~1e-6 relative typical, rtol 1e-4 / atol 1e-5 (on O(1) outputs) is 100x / 10x that
        np.testing.assert_allclose(model.eval()(x.clone(), x_len).numpy(), data["emb_eval"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.train()(x.clone(), x_len).numpy(), data["emb_train"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("margin", [0.4, 0.2])
def test_am_softmax_gives_s3prls_loss(margin):
    data, meta = fixture("s3prl_amsoftmax.npz")
    w = recipe_weights(meta["weights"], meta["seed"])["W"]  # s3prl's W is (in, out); ours is (out, in)
    head = AMSoftmax(32, 7, margin, meta["scale"])
    head.weight.data = torch.from_numpy(w.T.copy())
    x, labels = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    loss, cosine = head(x, labels)
    tag = f"m{round(margin * 100)}"
    # tolerance: a float32 cross-entropy of 7 logits of scale 30: ~1e-7 relative, rel 1e-5 is margin
    assert loss.item() == pytest.approx(float(data[f"loss_{tag}"]), rel=1e-5)
    # s3prl returns the logits with the margin in; ours are margin-free cosines (accuracy without the margin)
    with_margin = meta["scale"] * (cosine - margin * torch.nn.functional.one_hot(labels, 7))
    # tolerance: logits of scale 30 from float32 cosines (u = 6e-8 relative): ~1e-6 absolute; 1e-4 is margin
    np.testing.assert_allclose(with_margin.detach().numpy(), data[f"logits_{tag}"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("selection, normalize, out", [(None, False, "out_plain"), (None, True, "out_norm"),
                                                        ([1, 3, 4], False, "out_sel"), ([1, 3, 4], True, "out_sel_norm")])
def test_featurizer_weighted_sum_is_s3prls(selection, normalize, out):
    data, _ = fixture("s3prl_featurizer.npz")
    layers = selection or list(range(5))  # our upstream hands over the selected layers only
    weights = data["weights_sel"] if selection else data["weights_all"]
    featurizer = WeightedSum(len(layers), 16, normalize)
    featurizer.weights.data = torch.from_numpy(weights)
    with torch.no_grad():
        got = featurizer([torch.from_numpy(data["hs"][i]) for i in layers])
    # tolerance: a softmax-weighted sum of 5 O(1) values (and a layer norm of 16) in float32: ~1e-7
    np.testing.assert_allclose(got.numpy(), data[out], rtol=1e-5, atol=1e-6)


U32 = 2.0 ** -24  # unit roundoff of float32
EPS32 = float(np.finfo(np.float32).eps)  # Kaldi's energy floor (torchaudio's, in every dtype)


def fbank_exact_and_bound(wav: torch.Tensor, win: int = 5):
    """s3prl's fbank features of one utterance computed in float64 (the exact values, to 1e-13), and a first-order
    bound on how far any float32 run of the same computation can be from them, element by element.

    The bound follows the error through each stage (u = 2^-24):
    - FFT of the 512-point windowed frame y: ||dX||_2 <= 64 u ||X||_2 (Higham, Accuracy and Stability of Numerical
      Algorithms, Thm 24.2: log2(512) * ~6.7u for the transform, plus ~4u for DC removal, pre-emphasis and window),
      taken as the bound of every bin; ||X||_2 by Parseval from the power spectrum.
    - mel energy E = sum_k w_k |X_k|^2: dE <= sum_k w_k (2 |X_k| dX + dX^2) + 257 u E (the weighted sum).
    - log max(E, eps): the exact change of the log over [E - dE, E + dE] (the floor only shrinks it), + 4u |log E|.
      This is where the conditioning is: a band 100 dB below its frame's energy gets an error of order
      u ||X||^2 / E, i.e. large, in the quiet last frames of a file.
    - deltas (ComputeDeltas, win 5, replicate edges) are linear: |error| <= the same filter with |coefficients| over
      the input errors; the delta-deltas apply it twice. Each adds 4u of its own rounding.
    - CMVN (x - mean) / (1e-10 + std): (e + mean e) / std + |y| rms(e) / std (the mean's and std's own errors).
    A band at the energy floor in every frame has std 0: its normalised values are rounding noise divided by
    1e-10 in any precision, its bound is infinite and it is not compared (the caller checks which bands those are).
    """
    common = dict(sample_frequency=16000, frame_length=25.0, frame_shift=10.0)
    w = wav.double().view(1, -1)
    logmel = kaldi.fbank(w, num_mel_bins=80, use_log_fbank=True, **common)  # floors at EPS32 in float64 too
    energy = kaldi.fbank(w, num_mel_bins=80, use_log_fbank=False, **common)
    power = kaldi.spectrogram(w, **common).exp()  # |X_k|^2, floored at EPS32 per bin (only raises the bound)
    power[:, 0] = 0  # kaldi.spectrogram puts the frame's log energy in bin 0; DC is ~0 after DC removal
    banks = torch.nn.functional.pad(kaldi.get_mel_banks(80, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)[0].double(),
                                    (0, 1))  # (80, 257), as kaldi.fbank pads it
    dx = 64 * U32 * (2 * power.sum(1, keepdim=True)).sqrt()  # (T, 1)
    d_energy = (2 * power.sqrt() * dx + dx ** 2) @ banks.T + 257 * U32 * energy
    low = (energy - d_energy).clamp(min=EPS32).log()
    high = (energy + d_energy).clamp(min=EPS32).log()
    err = torch.maximum(logmel - low, high - logmel) + 4 * U32 * logmel.abs()

    n = (win - 1) // 2
    weights = torch.arange(-n, n + 1, dtype=torch.float64).abs().view(1, 1, -1).repeat(80, 1, 1)

    def abs_delta(e):  # ComputeDeltas with |coefficients|, over errors (T, 80)
        padded = torch.nn.functional.pad(e.T.unsqueeze(0), (n, n), mode="replicate")
        return torch.nn.functional.conv1d(padded, weights, groups=80)[0].T / (n * (n + 1) * (2 * n + 1) / 3)

    deltas = torchaudio.transforms.ComputeDeltas(win_length=win)
    d1 = deltas(logmel.T).T
    d2 = deltas(d1.T).T
    err1 = abs_delta(err) + 4 * U32 * d1.abs()
    err2 = abs_delta(err1) + 4 * U32 * d2.abs()
    x, ex = torch.cat([logmel, d1, d2], 1), torch.cat([err, err1, err2], 1)
    std = x.std(0)
    y = (x - x.mean(0)) / (1e-10 + std)
    rms = (ex ** 2).mean(0).sqrt() * (len(x) / (len(x) - 1)) ** 0.5
    bound = (ex + ex.mean(0)) / std + y.abs() * rms / std + 4 * U32 * y.abs()  # inf where std == 0
    return y, bound


def test_fbank_upstream_is_s3prls_on_the_frames_kaldi_computes():
    data, _ = fixture("s3prl_fbank.npz")
    upstream = KaldiUpstream("fbank", 16000)
    wav, wav_len = torch.from_numpy(data["wav"]), torch.from_numpy(data["wav_len"])
    with torch.no_grad():
        (hidden,), frames = upstream(wav, wav_len)
    # ours: the frames Kaldi computes; s3prl says (len - 1) // 160 + 1 and pads with copies or zeros
    assert frames.tolist() == data["kaldi_frames"].tolist() == [148, 57]
    assert data["len_batch"].tolist() == [150, 60]
    # Ours and s3prl's are two float32 runs of one computation, on different CPUs and kernels: each must lie within
    # the float32 error bound of the exact (float64) result. A fixed rtol/atol cannot be right for both: the
    # delta-deltas of quiet last frames are ill-conditioned (values off by 5e-4 between CPUs, each within bound).
    for row, alone in enumerate((data["hidden_0"], data["hidden_1"])):
        n = int(frames[row])
        exact, bound = fbank_exact_and_bound(wav[row, :wav_len[row]])
        assert exact.shape == (n, 240)
        checked = torch.isfinite(bound).all(0)
        # the only dimensions left out are bands above 4 kHz of the file resampled from 8 kHz (no energy there)
        skipped = (~checked[:80]).nonzero().flatten().tolist()
        assert skipped == ([] if row == 0 else list(range(80 - len(skipped), 80))) and len(skipped) < 25, skipped
        assert (checked.view(3, 80) == checked[:80]).all()  # a floored band's deltas are left out with it
        for name, got in (("ours", hidden[row, :n]), ("s3prl alone", alone[:n]),
                          ("s3prl in its batch", data["hidden_batch"][row, :n])):
            err = (torch.as_tensor(got).double() - exact).abs()[:, checked]
            worst = (err / bound[:, checked]).max().item()
            assert worst <= 1, f"row {row}, {name}: {worst:.3g} x the float32 error bound"
        # the bound is tight enough to see a wrong computation: the delta window 7 instead of 5
        wrong, _ = fbank_exact_and_bound(wav[row, :wav_len[row]], win=7)
        assert ((wrong - exact).abs() > bound)[:, checked].float().mean() > 0.5


@pytest.mark.parametrize("kind, name", [("wavlm", "wavlm_base_plus"), ("hubert", "hubert_base")])
def test_ssl_upstream_reads_the_file_s3prl_reads_and_gives_its_hidden_states(kind, name):
    data, meta = fixture(f"s3prl_{kind}.npz")
    wav, wav_len = torch.from_numpy(data["wav"]), torch.from_numpy(data["wav_len"])
    # s3prl's own normalisation (upstream.padded_group_norm=true), and ours (each utterance's own statistics)
    for padded_group_norm in (True, False):
        upstream = SSLUpstream(name, ckpt=str(FIXTURES / meta["ckpt"]), padded_group_norm=padded_group_norm).eval()
        assert upstream.masked_group_norm is not padded_group_norm  # Base models: a group norm on the first conv
        with torch.no_grad():
            single, single_frames = upstream(wav[:1], wav_len[:1])
            batch, frames = upstream(wav, wav_len)
            short, _ = upstream(wav[1:, :int(wav_len[1])], wav_len[1:])
        assert len(single) == meta["layers"] == 3
        assert frames.tolist() == data["conv_frames"].tolist() == [59, 39]  # s3prl says [60, 40]: one frame repeated
        for layer in range(3):
            # a single utterance and the longest row of a batch: every layer, every frame the conv makes (the row
            # has no padding, so both normalisations are s3prl's).
            # tolerance: s3prl's fairseq-style modules vs torchaudio's, float32 in another op order, on O(1)-O(10)
            # states of 2 layers: ~1e-6 (0.0 when recorded); 1e-4 is 100x for other CPUs' kernels
            np.testing.assert_allclose(single[layer][0].numpy(), data["hidden_single"][layer, 0, :59], atol=1e-4)
            np.testing.assert_allclose(batch[layer][0].numpy(), data["hidden_batch"][layer, 0, :59], atol=1e-4)
            # the shorter row of the padded batch against the same utterance alone
            # tolerance: float32 order only (other lengths), ~1e-6 on O(1)-O(10) states
            gap = (batch[layer][1, :39] - short[layer][0]).abs().max().item()
            assert gap < 1e-4 if not padded_group_norm else gap > 1e-2, (layer, padded_group_norm, gap)
    # The shorter row of a padded batch differs from s3prl's on purpose: s3prl leaves its frame 39 (80 of its
    # 400 samples are padding) out of the attention mask, we mask every frame the conv does not make from the
    # utterance alone (the recorder's notes: with s3prl's rule both rows match at 0.0). And by default our Base
    # models' first group norm runs over each utterance's own samples (s3prl's, and padded_group_norm=true: over
    # the padded length), so the row is what the utterance gives alone.


def test_superb_effect_chain_gives_s3prls_lengths_within_10_ms():
    need(REAL_MINI)
    recorded = json.loads((FIXTURES / "s3prl_effects.json").read_text())
    assert recorded["effects"][-1] == ["silence", "1", "0.1", "0.1%", "-1", "0.1", "0.1%"]
    for rel, lengths in recorded["files"].items():
        wav = load_audio(str(REAL_MINI / rel), 16000)  # soundfile + torchaudio resampling; s3prl: librosa (soxr)
        assert abs(wav.numel() - lengths["loaded"]) <= 1, rel
        trimmed = superb_effects(wav, 16000)
        assert abs(trimmed.numel() - lengths["after_effects"]) <= 160, (rel, trimmed.numel(), lengths)
