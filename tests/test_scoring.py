"""Cosine scoring and AS-norm against hand-worked numbers; chunked upstream against a full pass."""
import numpy as np
import pytest
import torch

from asv.config import load_config
from asv.models import asnorm_scores, build_encoder, build_upstream, cohort_stats, cosine_scores, run_chunked


def test_asnorm_hand_worked():
    # 2-d unit embeddings: enroll e = (1, 0), test t = (0.6, 0.8); raw cosine s = 0.6.
    emb = np.array([[1.0, 0.0], [0.6, 0.8]])
    # cohort at angles whose cosines with e are 0.8, 0.6, 0.0 and with t are 0.96, 0.0, 0.8
    cohort = np.array([[0.8, 0.6], [0.6, -0.8], [0.0, 1.0]])
    mean, std = cohort_stats(emb, cohort, top_k=2)
    # e: top-2 of (0.8, 0.6, 0.0) = (0.8, 0.6): mean 0.7, std 0.1
    # t: scores (0.48 + 0.48 = 0.96, 0.36 - 0.64 = -0.28, 0.8): top-2 = (0.96, 0.8): mean 0.88, std 0.08
    assert mean == pytest.approx([0.7, 0.88])
    assert std == pytest.approx([0.1, 0.08])
    raw = cosine_scores(emb, np.array([0]), np.array([1]))
    assert raw == pytest.approx([0.6])
    # 0.5 * ((0.6 - 0.7) / 0.1 + (0.6 - 0.88) / 0.08) = 0.5 * (-1 - 3.5) = -2.25
    assert asnorm_scores(raw, np.array([0]), np.array([1]), mean, std) == pytest.approx([-2.25])


def test_asnorm_top_k_larger_than_cohort_uses_all():
    rng = np.random.default_rng(0)
    emb, cohort = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    mean, std = cohort_stats(emb, cohort, top_k=300)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    # tolerance: float32 cosines vs float64 numpy: a few u (6e-8) x dim
    assert mean == pytest.approx((unit @ c.T).mean(1), abs=1e-6)


def test_chunked_upstream_close_to_full_pass():
    """Long files through windows: the embedding stays close to a full-length pass."""
    cfg = load_config(None, ["upstream.name=wavlm_base_plus", "upstream.random_init=true"])
    cfg.upstream.arch = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_num_heads": 2,
                         "encoder_ff_interm_features": 64, "encoder_pos_conv_kernel": 8,
                         "encoder_pos_conv_groups": 2, "extractor_mode": "layer_norm",
                         "extractor_conv_layer_config": [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2}
    torch.manual_seed(0)
    upstream = build_upstream(cfg.upstream, 16000)
    encoder = build_encoder(upstream, cfg.downstream).eval()  # SUPERB's x-vector
    wavs = torch.randn(2, 16000 * 12)
    lengths = torch.tensor([16000 * 12, 16000 * 5])
    with torch.no_grad():
        full = encoder(*upstream(wavs, lengths))
        hidden, frames = run_chunked(upstream, wavs, lengths, 16000 * 4)
        chunked = encoder(hidden, frames)
    assert all(h.shape[1] >= int(frames.max()) for h in hidden)
    assert frames[0] > frames[1] > 0
    # tolerance: chunking approximates by design (each window sees its own context only), not float error:
    # 0.999 checks "close to a full pass", as run_chunked documents
    assert torch.nn.functional.cosine_similarity(full, chunked).min() > 0.999
    # short batches are not chunked at all
    with torch.no_grad():
        same = encoder(*run_chunked(upstream, wavs[:, :16000], torch.tensor([16000, 8000]), 16000 * 4))
        ref = encoder(*upstream(wavs[:, :16000], torch.tensor([16000, 8000])))
    assert torch.equal(same, ref)


def test_asnorm_of_symmetric_statistics_is_symmetric():
    rng = np.random.default_rng(1)
    emb, cohort = rng.normal(size=(6, 8)), rng.normal(size=(40, 8))
    mean, std = cohort_stats(emb, cohort, top_k=10)
    a, b = np.array([0, 1, 2]), np.array([3, 4, 5])
    # tolerance: AS-norm is symmetric in exact arithmetic; float32 cosines in another order: ~1e-7
    np.testing.assert_allclose(asnorm_scores(cosine_scores(emb, a, b), a, b, mean, std),
                               asnorm_scores(cosine_scores(emb, b, a), b, a, mean, std), rtol=1e-6)


def test_chunked_upstream_on_selected_layers():
    """Windows and layer selection together: the same layers come back, joined in time."""
    cfg = load_config(None, ["upstream.random_init=true", "featurizer.layer_selections=[0, 1]"])
    cfg.upstream.arch = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_num_heads": 2,
                         "encoder_ff_interm_features": 64, "encoder_pos_conv_kernel": 8, "encoder_pos_conv_groups": 2,
                         "extractor_conv_layer_config": [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2}
    torch.manual_seed(0)
    upstream = build_upstream(cfg.upstream, 16000, cfg.featurizer.layer_selections)
    wavs, lengths = torch.randn(2, 16000 * 3), torch.tensor([16000 * 3, 16000 * 2])
    with torch.no_grad():
        hidden, frames = run_chunked(upstream, wavs, lengths, 16000)
    assert len(hidden) == 2 and all(h.shape[0] == 2 and h.shape[2] == 32 for h in hidden)
    assert frames.tolist() == [3 * 49, 2 * 49]  # 49 frames per 1 s window
