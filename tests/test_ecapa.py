"""Checks of models/ecapa.py (ECAPA-TDNN) and of the sub-center / scheduled-margin MarginSoftmax.

Small inputs throughout (input_dim 40, a few dozen frames) so the file runs in seconds on CPU.
(The attentive pooling itself, now models/pooling.py, is tested in test_models.py.)
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from asv.models.ecapa import ECAPA
from asv.models import LOSSES, AMSoftmax
from asv.models.pooling import AttentiveStatsPool, StatsPool


def ecapa(input_dim=40, **options):
    return ECAPA(input_dim, ECAPA.Options(**options))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model: nn.Module, seed: int = 0):
    """Non-trivial BN statistics and affine terms, as after training: eval-mode BN then shifts the zeroed
    padding frames away from zero, so a missing mask anywhere shows in the embeddings."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))


# ---------------------------------------------------------------- ECAPA

def test_ecapa_options():
    opts = ECAPA.Options()
    assert (opts.name, opts.channels, opts.embed_dim, opts.scale, opts.attention_dim, opts.pooling) == (
        "ecapa", 512, 192, 8, 128, "attentive")


@pytest.mark.parametrize("channels", [512, 1024])
def test_ecapa_output_shape(channels):
    torch.manual_seed(0)
    model = ecapa(channels=channels).eval()
    assert model.context == 0 and model.embed_dim == 192
    assert isinstance(model.pool, AttentiveStatsPool) and model.pool.out_dim == 2 * 3 * channels
    with torch.no_grad():
        emb = model(torch.randn(2, 50, 40), torch.tensor([50, 31]))
    assert emb.shape == (2, 192) and torch.isfinite(emb).all()


def test_ecapa_parameter_count_matches_the_paper():
    # Desplanques et al. 2020: C=512 with 80-dim fbank has 6.2M parameters (this build: 6,194,432)
    assert 5.9e6 < n_params(ecapa(80, channels=512, embed_dim=192)) < 6.5e6


def test_ecapa_with_stats_pooling_has_no_attention():
    model = ecapa(channels=64, embed_dim=16, pooling="stats")
    assert isinstance(model.pool, StatsPool) and not any(isinstance(m, AttentiveStatsPool) for m in model.modules())
    assert n_params(model) < n_params(ecapa(channels=64, embed_dim=16))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 30, 40), torch.tensor([30, 12])).shape == (2, 16)


def test_ecapa_channels_must_split_into_the_scale():
    with pytest.raises(ValueError, match="divisible"):
        ecapa(channels=60, scale=8)


def test_ecapa_single_frame_and_train_mode_gradients():
    torch.manual_seed(0)
    model = ecapa(channels=64, embed_dim=16)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 1, 40), torch.tensor([1]))).all()  # context 0: one frame is enough
    model.train()
    emb = model(torch.randn(3, 30, 40), torch.tensor([30, 12, 5]))  # -inf attention on padding must not give NaN grads
    emb.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("pooling", ["attentive", "stats"])
def test_ecapa_padding_never_changes_an_embedding(pooling):
    """A short utterance alone vs inside a padded batch with a longer one (eval mode).

    The padding is filled with noise, as an SSL upstream leaves it, and BN has non-trivial
    statistics, so removing any of the masks (input, block outputs, SE squeeze, global
    context, attention) breaks this test."""
    torch.manual_seed(0)
    model = ecapa(channels=64, embed_dim=32, attention_dim=16, pooling=pooling)
    randomise_batchnorm(model)
    model.eval()
    short, long = torch.randn(1, 17, 40), torch.randn(1, 60, 40)
    batch = torch.cat([torch.cat([short, 3 * torch.randn(1, 43, 40)], dim=1), long])  # (2, 60, 40)
    with torch.no_grad():
        alone_short = model(short, torch.tensor([17]))
        alone_long = model(long, torch.tensor([60]))
        both = model(batch, torch.tensor([17, 60]))
    # tolerance: float32 rounding (u = 6e-8) through a few layers of O(1) values: ~1e-6, 1e-5 is 10x
    torch.testing.assert_close(both[0:1], alone_short, atol=1e-5, rtol=0)
    # tolerance: float32 rounding (u = 6e-8) through a few layers of O(1) values: ~1e-6, 1e-5 is 10x
    torch.testing.assert_close(both[1:2], alone_long, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- sub-center, scheduled-margin head

def test_sub_center_cosine_is_the_max_over_a_class_sub_centers():
    head = AMSoftmax(2, 2, margin=0.3, scale=10.0, sub_centers=3)
    assert head.weight.shape == (6, 2)
    with torch.no_grad():  # rows 0-2: class 0 at 0, 90, 180 degrees; rows 3-5: class 1 at 45, 135, 270 degrees
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0],
                                        [1.0, 1.0], [-1.0, 1.0], [0.0, -3.0]]))
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    labels = torch.tensor([0, 1, 1])
    loss, cosine = head(emb, labels)
    r = 0.5 ** 0.5
    by_hand = torch.tensor([[1.0, r],   # class 0: max(1, 0, -1); class 1: max(r, -r, 0)
                            [1.0, r],   # class 0: max(0, 1, 0); class 1: max(r, r, -1)
                            [r, r]])    # class 0: max(-r, -r, r); class 1: max(-1, 0, r)
    torch.testing.assert_close(cosine, by_hand)
    logits = 10.0 * (by_hand - 0.3 * F.one_hot(labels, 2))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("kind", ["amsoftmax", "aamsoftmax"])
def test_sub_center_head_learns_a_separable_toy_problem(kind):
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(8)
    data = centres[labels] + 0.3 * torch.randn(32, 8, generator=g)
    torch.manual_seed(0)
    encoder, head = nn.Linear(8, 8), LOSSES[kind](8, 4, margin=0.2, scale=10.0, sub_centers=3)
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    losses = []
    for _ in range(30):
        loss, cosine = head(encoder(data), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (cosine.argmax(1) == labels).float().mean() == 1.0


@pytest.mark.parametrize("kind", ["amsoftmax", "aamsoftmax"])
@pytest.mark.parametrize("sub_centers", [1, 3])
def test_changing_the_margin_attribute_changes_the_loss(kind, sub_centers):
    torch.manual_seed(0)
    head = LOSSES[kind](8, 5, margin=0.1, scale=30.0, sub_centers=sub_centers)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        loss_small, cos_small = head(emb, labels)
        head.margin = 0.4  # what a margin schedule in the training loop does between steps
        loss_large, cos_large = head(emb, labels)
        head.margin = 0.1
        loss_back, _ = head(emb, labels)
    assert loss_large > loss_small
    torch.testing.assert_close(loss_back, loss_small)
    torch.testing.assert_close(cos_large, cos_small)  # accuracy cosines stay margin-free


def test_sub_centers_must_be_positive():
    with pytest.raises(ValueError, match="sub_centers"):
        AMSoftmax(8, 5, sub_centers=0)
