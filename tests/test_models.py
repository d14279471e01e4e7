"""Checks of models/: upstreams (random small weights, never a download), featurizer, x-vector,
margin heads, scoring, and the model file.

Every self-supervised upstream is built with random weights and a tiny transformer
(torchaudio would otherwise build the full-size model).
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from config import load_config  # noqa: E402
from models import (UPSTREAMS, MarginSoftmax, SpeakerEncoder, build_encoder, build_upstream,  # noqa: E402
                    cosine_scores, load_model_file, min_input_samples, save_model_file)
from models.featurizer import WeightedSum  # noqa: E402
from models.upstream import SSL_BUNDLES  # noqa: E402
from models.xvector import XVector, stats_pool  # noqa: E402

SR = 16000
SMALL_ARCH = dict(encoder_num_layers=2, encoder_embed_dim=32, encoder_num_heads=2, encoder_ff_interm_features=64,
                  encoder_pos_conv_kernel=8, encoder_pos_conv_groups=2,
                  # the real convolution geometry (hop 320, receptive field 400 samples) with 32 channels, not 512
                  extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2)
SSL_NAMES = list(SSL_BUNDLES)
FILTERBANKS = ["fbank", "mfcc"]


def make_cfg(name, ckpt="", random_init=True, trainable=False, **arch):
    """The demo config (small x-vector) with the given upstream; SSL upstreams get the tiny random architecture."""
    cfg = load_config(str(REPO / "configs/demo.yaml"), [f"upstream.name={name}"])
    cfg.upstream.trainable = trainable
    if name not in FILTERBANKS:
        cfg.upstream.random_init = random_init
        cfg.upstream.ckpt = ckpt
        cfg.upstream.arch = {**SMALL_ARCH, **arch}
    return cfg


def make_upstream(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_upstream(make_cfg(name, **kw).upstream, SR)


def padded(wavs):
    """list of 1-D waveforms -> (B, T) zero-padded batch, (B,) lengths."""
    lengths = torch.tensor([w.numel() for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        batch[i, :w.numel()] = w
    return batch, lengths


def randn(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1


# ---------------------------------------------------------------- upstreams

def test_upstream_list_has_filterbanks_and_ssl_models():
    assert set(FILTERBANKS) <= set(UPSTREAMS)
    assert {"wavlm_base_plus", "hubert_base", "wav2vec2_base"} <= set(UPSTREAMS)


@pytest.mark.parametrize("name", UPSTREAMS)
def test_every_upstream_gives_all_layers_on_a_padded_batch(name):
    up = make_upstream(name)
    wavs, lengths = padded([randn(5000, 1), randn(3000, 2)])
    with torch.no_grad():
        hidden, frames = up(wavs, lengths)
    expected_layers = 1 if name in FILTERBANKS else SMALL_ARCH["encoder_num_layers"] + 1
    assert up.num_layers == expected_layers
    assert len(hidden) == expected_layers
    assert up.hidden_size == (40 if name in FILTERBANKS else 32)  # demo: 40 mel bands; SSL: encoder_embed_dim
    t = hidden[0].shape[1]
    for h in hidden:
        assert h.shape == (2, t, up.hidden_size)
        assert torch.isfinite(h).all()
    assert frames.shape == (2,) and frames.dtype == torch.long
    assert int(frames[0]) == t  # the longest utterance fills the batch
    assert 0 < int(frames[1]) < int(frames[0])
    assert up.hop == (160 if name in FILTERBANKS else 320)  # 10 ms / 20 ms frames
    for n, f in zip(lengths.tolist(), frames.tolist()):  # frames come every `hop` samples
        assert abs(f - n / up.hop) <= up.min_samples / up.hop + 1
    # frozen by default
    assert not up.training
    assert not any(p.requires_grad for p in up.parameters())


@pytest.mark.parametrize("name", ["wavlm_base_plus", "wav2vec2_base"])
def test_trainable_upstream_keeps_gradients(name):
    up = make_upstream(name, trainable=True)
    assert up.training
    params = list(up.parameters())
    assert params and all(p.requires_grad for p in params)
    wavs, lengths = padded([randn(3000, 1), randn(2000, 2)])
    hidden, frames = up(wavs, lengths)
    sum(h.pow(2).mean() for h in hidden).backward()
    grads = [p.grad for p in up.model.encoder.transformer.layers[-1].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert up.model.feature_extractor.conv_layers[0].conv.weight.grad is not None


@pytest.mark.parametrize("name", ["wavlm_base", "wavlm_large"])  # wavlm_base_plus: see the SSL padding test
def test_wavlm_padding_does_not_leak_into_valid_frames_through_attention(name):
    # torchaudio's own WavLM path fails on padded batches; ours masks padded keys. With a per-frame
    # (layer_norm) feature extractor, the short utterance's valid frames must not see the padding.
    up = make_upstream(name, extractor_mode="layer_norm")
    short, long = randn(2500, 1), randn(6000, 2)
    wavs, lengths = padded([short, long])
    with torch.no_grad():
        alone, n = up(short[None], torch.tensor([2500]))
        batch, frames = up(wavs, lengths)
    assert int(frames[0]) == int(n[0]) == alone[0].shape[1]
    for a, b in zip(alone, batch):
        torch.testing.assert_close(b[0, :int(n[0])], a[0], atol=1e-4, rtol=1e-4)


def test_unknown_upstream_lists_the_choices():
    cfg = make_cfg("fbank")
    cfg.upstream.name = "wavlm_huge"
    with pytest.raises(ValueError) as e:
        build_upstream(cfg.upstream, SR)
    assert "wavlm_huge" in str(e.value)
    for name in UPSTREAMS:
        assert name in str(e.value)


def test_ssl_upstream_needs_16k():
    with pytest.raises(ValueError, match="16000"):
        build_upstream(make_cfg("hubert_base").upstream, 8000)


def test_arch_override_that_does_not_fit_is_a_value_error():
    with pytest.raises(ValueError, match="upstream.arch"):
        make_upstream("wav2vec2_base", no_such_param=3)


# ---------------------------------------------------------------- local checkpoints

@pytest.mark.parametrize("name, wrapped", [("wav2vec2_base", False), ("wavlm_base_plus", True)],
                         ids=["wav2vec2_state_dict", "wavlm_model_key"])
def test_local_checkpoint_gives_the_saved_model(tmp_path, name, wrapped):
    saved = make_upstream(name, seed=1)
    path = tmp_path / "weights.pt"
    state = saved.model.state_dict()
    torch.save({"model": state} if wrapped else state, path)
    loaded = make_upstream(name, seed=2, ckpt=str(path), random_init=False)
    fresh = make_upstream(name, seed=2)  # what seed 2 alone would give: must differ
    wavs, lengths = padded([randn(4000, 3), randn(2600, 4)])
    with torch.no_grad():
        want, f1 = saved(wavs, lengths)
        got, f2 = loaded(wavs, lengths)
        other, _ = fresh(wavs, lengths)
    assert torch.equal(f1, f2)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert not torch.allclose(other[-1], want[-1])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("arch", [dict(encoder_num_layers=3), dict(encoder_embed_dim=48)], ids=["more_layers", "wider"])
def test_checkpoint_of_another_architecture_is_a_value_error_naming_the_file(tmp_path, arch):
    path = tmp_path / "small.pt"
    torch.save(make_upstream("wav2vec2_base").model.state_dict(), path)
    with pytest.raises(ValueError, match="small.pt"):
        make_upstream("wav2vec2_base", ckpt=str(path), random_init=False, **arch)


def test_checkpoint_with_more_layers_than_the_model_is_a_value_error(tmp_path):
    # A 2-layer checkpoint loaded into a 1-layer model silently drops a transformer layer today.
    path = tmp_path / "two_layers.pt"
    torch.save(make_upstream("wav2vec2_base").model.state_dict(), path)
    with pytest.raises(ValueError, match="two_layers.pt"):
        make_upstream("wav2vec2_base", ckpt=str(path), random_init=False, encoder_num_layers=1)


def test_checkpoint_of_another_model_family_is_a_value_error(tmp_path):
    path = tmp_path / "w2v.pt"
    torch.save(make_upstream("wav2vec2_base").model.state_dict(), path)
    with pytest.raises(ValueError, match="w2v.pt"):
        make_upstream("wavlm_base_plus", ckpt=str(path), random_init=False)


# ---------------------------------------------------------------- padding never changes an embedding

def embeddings_alone_and_in_batch(name, lengths, **arch):
    up = make_upstream(name, **arch)
    torch.manual_seed(0)
    encoder = build_encoder(make_cfg(name, **arch), up).eval()
    wavs = [randn(n, 10 + i) for i, n in enumerate(lengths)]
    batch, lens = padded(wavs)
    with torch.no_grad():
        hidden, frames = up(batch, lens)
        in_batch = encoder(hidden, frames)
        alone = []
        for w in wavs:
            h, f = up(w[None], torch.tensor([w.numel()]))
            assert int(f[0]) == h[0].shape[1], "an utterance alone: every frame is valid"
            alone.append((int(f[0]), encoder(h, f)[0]))
    return frames.tolist(), in_batch, alone


@pytest.mark.parametrize("name", FILTERBANKS)
@pytest.mark.parametrize("short", [4000, 4050, 4100, 4150])
def test_filterbank_padding_never_changes_an_embedding(name, short):
    frames, in_batch, alone = embeddings_alone_and_in_batch(name, [7000, short])
    assert frames[1] == alone[1][0], "the same number of frames alone and in a padded batch"
    for i, (_, emb) in enumerate(alone):
        torch.testing.assert_close(in_batch[i], emb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["wav2vec2_base", "wavlm_base_plus", "wav2vec2_large_lv60k"])
def test_ssl_padding_never_changes_an_embedding_with_a_layer_norm_extractor(name):
    frames, in_batch, alone = embeddings_alone_and_in_batch(name, [9000, 5000, 6300], extractor_mode="layer_norm")
    for i, (n, emb) in enumerate(alone):
        assert frames[i] == n
        torch.testing.assert_close(in_batch[i], emb, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- featurizer

def layers(n, b=2, t=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, d, generator=g) * (i + 1) + i for i in range(n)]


def test_single_layer_passes_through():
    ws = WeightedSum(1, 4)
    assert list(ws.parameters()) == []
    h = layers(1)
    assert ws(h) is h[0]
    assert ws.layer_weights() == [1.0]


def test_zero_weights_average_the_layers():
    ws = WeightedSum(3, 4)
    h = layers(3)
    torch.testing.assert_close(ws(h), torch.stack(h).mean(0))
    assert ws.layer_weights() == pytest.approx([1 / 3] * 3)


def test_layer_weights_are_a_softmax():
    ws = WeightedSum(4, 4)
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, math.log(3.0), 0.0, -50.0]))
    w = ws.layer_weights()
    assert sum(w) == pytest.approx(1.0)
    assert w == pytest.approx([0.2, 0.6, 0.2, 0.0], abs=1e-6)
    h = layers(4)
    torch.testing.assert_close(ws(h), 0.2 * h[0] + 0.6 * h[1] + 0.2 * h[2], atol=1e-5, rtol=1e-5)


def test_weighted_sum_is_trainable():
    ws = WeightedSum(3, 4)
    ws(layers(3))[..., 0].sum().backward()
    assert ws.weights.grad is not None and ws.weights.grad.abs().sum() > 0


def test_layer_norm_normalises_each_frame_of_each_layer():
    ws = WeightedSum(2, 4, layer_norm=True)
    h = layers(2)
    by_hand = [(x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) for x in h]
    torch.testing.assert_close(ws(h), (by_hand[0] + by_hand[1]) / 2, atol=1e-5, rtol=1e-5)
    # scaling or shifting one frame of one layer changes nothing (per frame, per layer)
    h2 = [x.clone() for x in h]
    h2[1][0, 2] = h2[1][0, 2] * 100 + 7
    torch.testing.assert_close(ws(h2), ws(h), atol=1e-4, rtol=1e-4)
    # an all-zero (padding) frame stays zero and leaves the others untouched
    h3 = [x.clone() for x in h]
    for x in h3:
        x[1, 4] = 0
    out = ws(h3)
    assert torch.all(out[1, 4] == 0)
    torch.testing.assert_close(out[1, :4], ws(h)[1, :4])


def test_wrong_number_of_layers():
    with pytest.raises(ValueError, match="3"):
        WeightedSum(3, 4)(layers(2))
    with pytest.raises(ValueError):
        WeightedSum(1, 4)(layers(2))


# ---------------------------------------------------------------- x-vector

def small_xvector(input_dim=6):
    torch.manual_seed(0)
    return XVector(input_dim, proj_dim=8, channels=8, stats_dim=12, embed_dim=5).eval()


def test_xvector_output_shape():
    xv = small_xvector()
    with torch.no_grad():
        out = xv(torch.randn(3, 40, 6), torch.tensor([40, 30, 20]))
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()


def test_xvector_needs_15_frames():
    xv = small_xvector()
    assert xv.context == 14
    with torch.no_grad():
        assert xv(torch.randn(1, 15, 6), torch.tensor([15])).shape == (1, 5)
        with pytest.raises(ValueError, match="14 frames"):
            xv(torch.randn(1, 14, 6), torch.tensor([14]))


def test_xvector_ignores_padded_frames():
    xv = small_xvector()
    x = torch.randn(2, 50, 6)
    x[1, 20:] = 123.0  # garbage where the second utterance is padded
    with torch.no_grad():
        batch = xv(x, torch.tensor([50, 20]))
        alone = xv(x[1:, :20], torch.tensor([20]))
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)


def test_stats_pool_uses_valid_frames_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 10, generator=g)
    lengths = torch.tensor([10, 6, 2])
    x[1, :, 6:] = 1e3  # padding must not count
    x[2, :, 2:] = -7.0
    out = stats_pool(x, lengths)
    assert out.shape == (3, 8)
    for i, n in enumerate(lengths.tolist()):
        valid = x[i, :, :n]
        torch.testing.assert_close(out[i, :4], valid.mean(-1))
        torch.testing.assert_close(out[i, 4:], valid.std(-1, unbiased=False))


# ---------------------------------------------------------------- margin heads

def head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    return emb, labels


def test_am_softmax_loss_by_hand():
    emb, labels = head_inputs()
    head = MarginSoftmax(8, 5, "amsoftmax", margin=0.4, scale=30.0)
    loss, cosine = head(emb, labels)
    cos = F.normalize(emb) @ F.normalize(head.weight).T
    torch.testing.assert_close(cosine, cos)
    logits = 30.0 * (cos - 0.4 * F.one_hot(labels, 5))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_aam_softmax_target_logit_is_cos_theta_plus_m():
    emb, labels = head_inputs(1)
    m, s = 0.2, 30.0
    head = MarginSoftmax(8, 5, "aamsoftmax", margin=m, scale=s)
    loss, cosine = head(emb, labels)
    cos = (F.normalize(emb) @ F.normalize(head.weight).T).detach()
    theta = torch.acos(cos.gather(1, labels[:, None]))
    assert torch.all(theta + m < math.pi)  # normal angles
    logits = cos.clone()
    logits.scatter_(1, labels[:, None], torch.cos(theta + m))
    torch.testing.assert_close(loss, F.cross_entropy(s * logits, labels))


def test_aam_softmax_past_pi_minus_m_keeps_penalising():
    head = MarginSoftmax(4, 2, "aamsoftmax", margin=0.3, scale=10.0)
    emb = -head.weight[:1].detach().clone()  # theta = pi for class 0
    with torch.no_grad():
        loss, cosine = head(emb, torch.tensor([0]))
    other = float(cosine[0, 1])
    target = -1.0 - 0.3 * math.sin(0.3)
    assert float(loss) == pytest.approx(float(F.cross_entropy(10.0 * torch.tensor([[target, other]]), torch.tensor([0]))),
                                        rel=1e-4)


@pytest.mark.parametrize("kind", ["amsoftmax", "aamsoftmax"])
def test_returned_cosines_are_margin_free(kind):
    head = MarginSoftmax(8, 5, kind, margin=0.4, scale=30.0)
    labels = torch.tensor([3, 1, 4])
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    emb = head.weight[labels].detach() * 2.5 + 0.01 * noise  # close to each class centre
    loss, cosine = head(emb, labels)
    assert torch.equal(cosine.argmax(1), labels)  # accuracy without the margin
    assert torch.all(cosine.gather(1, labels[:, None]) > 0.99)
    head0 = MarginSoftmax(8, 5, kind, margin=0.0, scale=30.0)
    head0.load_state_dict(head.state_dict())
    loss0, cosine0 = head0(emb, labels)
    torch.testing.assert_close(cosine0, cosine)
    assert loss.detach().item() > loss0.detach().item()  # the margin makes the target harder


@pytest.mark.parametrize("kind", ["amsoftmax", "aamsoftmax"])
def test_gradients_flow_through_the_head(kind):
    emb, labels = head_inputs(2)
    head = MarginSoftmax(8, 5, kind)
    loss, _ = head(emb, labels)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_unknown_loss_kind():
    with pytest.raises(ValueError, match="softmax2"):
        MarginSoftmax(8, 5, "softmax2")


# ---------------------------------------------------------------- scoring

def test_cosine_scores_by_hand():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 5))
    enroll = rng.integers(0, 7, 20)
    test = rng.integers(0, 7, 20)
    want = [emb[a] @ emb[b] / (np.linalg.norm(emb[a]) * np.linalg.norm(emb[b])) for a, b in zip(enroll, test)]
    got = cosine_scores(emb, enroll, test)
    assert got.shape == (20,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cosine_scores(emb, enroll, test, chunk=3), got, rtol=1e-6)
    scaled = emb * rng.uniform(0.01, 100, size=(7, 1))
    np.testing.assert_allclose(cosine_scores(scaled, enroll, test), got, rtol=1e-5, atol=1e-6)
    same = cosine_scores(emb, np.arange(7), np.arange(7))
    np.testing.assert_allclose(same, 1.0, rtol=1e-6)


# ---------------------------------------------------------------- shortest input

@pytest.mark.parametrize("name", FILTERBANKS)
def test_min_input_samples_is_exactly_the_shortest_input(name):
    up = make_upstream(name)
    encoder = build_encoder(make_cfg(name), up).eval()
    n = min_input_samples(up, encoder)
    with torch.no_grad():
        hidden, frames = up(randn(n, 0)[None], torch.tensor([n]))
        emb = encoder(hidden, frames)
        assert emb.shape == (1, 128) and torch.isfinite(emb).all()
        hidden, frames = up(randn(n - 1, 0)[None], torch.tensor([n - 1]))
        with pytest.raises(ValueError):
            encoder(hidden, frames)


def test_min_input_samples_for_an_ssl_upstream():
    up = make_upstream("wav2vec2_base")
    encoder = build_encoder(make_cfg("wav2vec2_base"), up).eval()
    n = min_input_samples(up, encoder)
    with torch.no_grad():
        assert encoder(*up(randn(n, 0)[None], torch.tensor([n]))).shape == (1, 128)
        with pytest.raises(ValueError):
            encoder(*up(randn(n - 1, 0)[None], torch.tensor([n - 1])))


# ---------------------------------------------------------------- model file

META = {"upstream": "fbank", "downstream": "xvector", "embed_dim": 128}


def fbank_encoder(seed, **downstream):
    cfg = make_cfg("fbank")
    for k, v in downstream.items():
        setattr(cfg.downstream, k, v)
    up = build_upstream(cfg.upstream, SR)
    torch.manual_seed(seed)
    return build_encoder(cfg, up), up


def test_model_file_round_trip(tmp_path):
    enc, up = fbank_encoder(1)
    path = str(tmp_path / "model.pt")
    save_model_file(path, enc, up, False, META)
    assert not os.path.exists(path + ".tmp")
    other, up2 = fbank_encoder(2)
    assert not torch.equal(other.downstream.embedding.weight, enc.downstream.embedding.weight)
    assert load_model_file(path, other, up2, dict(META)) == META
    want = enc.state_dict()
    got = other.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_model_file_with_a_trainable_upstream(tmp_path):
    up = make_upstream("wavlm_base_plus", seed=1, trainable=True)
    torch.manual_seed(1)
    enc = build_encoder(make_cfg("wavlm_base_plus"), up)
    meta = {"upstream": "wavlm_base_plus", "downstream": "xvector", "embed_dim": 128}
    path = str(tmp_path / "model.pt")
    save_model_file(path, enc, up, True, meta)
    up2 = make_upstream("wavlm_base_plus", seed=2, trainable=True)
    torch.manual_seed(2)
    enc2 = build_encoder(make_cfg("wavlm_base_plus"), up2)
    load_model_file(path, enc2, up2, meta)
    for (k, a), b in zip(up.state_dict().items(), up2.state_dict().values()):
        assert torch.equal(a, b), k


def test_frozen_upstream_is_not_saved(tmp_path):
    up = make_upstream("wav2vec2_base")
    enc = build_encoder(make_cfg("wav2vec2_base"), up)
    path = tmp_path / "model.pt"
    save_model_file(str(path), enc, up, False, {"upstream": "wav2vec2_base"})
    state = torch.load(path, weights_only=True)
    assert set(state) == {"encoder", "meta"}


@pytest.mark.parametrize("key, value", [("upstream", "mfcc"), ("downstream", "ecapa"), ("embed_dim", 256)])
def test_checkpoint_from_another_config_names_file_and_key(tmp_path, key, value):
    enc, up = fbank_encoder(1)
    path = str(tmp_path / "model.pt")
    save_model_file(path, enc, up, False, {**META, key: value})
    with pytest.raises(ValueError) as e:
        load_model_file(path, fbank_encoder(2)[0], up, META)
    assert path in str(e.value) and key in str(e.value)


def test_checkpoint_with_another_embed_dim_names_the_file(tmp_path):
    enc, up = fbank_encoder(1)
    path = str(tmp_path / "model.pt")
    save_model_file(path, enc, up, False, META)
    small, _ = fbank_encoder(2, embed_dim=64)
    with pytest.raises(ValueError, match=str(path)):
        load_model_file(path, small, up, {**META, "embed_dim": 64})


def test_checkpoint_with_other_sizes_but_the_same_meta_names_the_file(tmp_path):
    enc, up = fbank_encoder(1)
    path = str(tmp_path / "model.pt")
    save_model_file(path, enc, up, False, META)
    narrow, _ = fbank_encoder(2, proj_dim=64)
    with pytest.raises(ValueError, match=str(path)):
        load_model_file(path, narrow, up, META)


class Trap:
    """Unpickling this runs os.makedirs(marker): a model file must never execute code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_model_file_with_a_pickled_object_is_refused(tmp_path):
    enc, up = fbank_encoder(1)
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"encoder": enc.state_dict(), "meta": META, "trap": Trap(str(marker))}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_model_file(str(path), enc, up, META)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["tensor", "garbage"])
def test_a_file_that_is_not_a_model_file_is_a_value_error(tmp_path, content):
    enc, up = fbank_encoder(1)
    path = tmp_path / "not_a_model.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)  # loads fine with weights_only, but is not a model file
    else:
        path.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not_a_model.pt"):
        load_model_file(str(path), enc, up, META)


def test_speaker_encoder_is_featurizer_then_downstream():
    up = make_upstream("hubert_base")
    torch.manual_seed(0)
    enc = build_encoder(make_cfg("hubert_base"), up).eval()
    assert isinstance(enc, SpeakerEncoder)
    assert enc.featurizer.num_layers == up.num_layers == 3
    wavs, lengths = padded([randn(6000, 1), randn(5000, 2)])
    with torch.no_grad():
        hidden, frames = up(wavs, lengths)
        emb = enc(hidden, frames)
        by_hand = enc.downstream(enc.featurizer(hidden), frames)
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb, by_hand)
