"""ResNet34 (models/resnet.py) and CAM++ (models/campplus.py): sized as their reference recipes, and
padding never changes an embedding."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from asv.config import load_config
from asv.models import DOWNSTREAMS
from tests.test_models import randomise_batchnorm  # the one definition: BN statistics as after training


def build(name, input_dim=80, **options):
    cls = DOWNSTREAMS[name]
    return cls(input_dim, cls.Options(**options))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())




def test_resnet34_has_wespeakers_parameter_count():
    # WeSpeaker examples/voxceleb/v2/README.md, "ResNet34-TSTP-emb256 | 6.63M" (80-dim fbank, m_channels 32,
    # wespeaker/models/resnet.py ResNet34, two_emb_layer False); this build: 6,634,336
    assert round(n_params(build("resnet34")) / 1e6, 2) == 6.63


def test_campplus_has_3d_speakers_parameter_count():
    # 3D-Speaker egs/voxceleb/sv-cam++/README.md, "CAMPPLUS | 7.18M" (80-dim fbank, embedding_size 512,
    # speakerlab/models/campplus/DTDNN.py); this build: 7,176,224
    assert round(n_params(build("campplus")) / 1e6, 2) == 7.18


@pytest.mark.parametrize("name", ["resnet34", "campplus"])
def test_embedding_alone_equals_embedding_padded_beside_a_longer_one(name):
    torch.manual_seed(0)
    model = build(name, input_dim=40).eval()  # 40 bands: half the cost; the time axis is what is tested
    randomise_batchnorm(model)
    # 233 frames: odd at every halving (233 -> 117 -> 59 -> 30), so the stride-2 convs' last window
    # straddles the valid end; CAM++ runs at 117 frames after its TDNN: two 100-frame segments, the
    # second one ended inside. The longer neighbour pads it by 178 frames of large values.
    short, long = torch.randn(233, 40), 3 + 5 * torch.randn(411, 40)
    batch = torch.zeros(2, 411, 40)
    batch[0, :233], batch[1] = short, long
    batch[0, 233:] = 7.0  # whatever sits in the padding must not matter
    with torch.no_grad():
        alone = model(short[None], torch.tensor([233]))
        batched = model(batch, torch.tensor([233, 411]))
        long_alone = model(long[None], torch.tensor([411]))
    # float32: the same sums in another order/kernel (batch of 1 vs 2) agree to ~1e-6 relative
    assert F.cosine_similarity(alone, batched[:1]).item() >= 0.99999
    assert F.cosine_similarity(long_alone, batched[1:]).item() >= 0.99999
    assert torch.allclose(alone, batched[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet34", "campplus"])
def test_trains_from_a_config_and_short_inputs_work(name):
    cfg = load_config(None, ["upstream.name=logmel", f"downstream.name={name}", "downstream.embed_dim=32"])
    model = DOWNSTREAMS[name](80, cfg.downstream)
    assert model.embed_dim == 32 and model.context == 0
    out = model.train()(torch.randn(3, 40, 80), torch.tensor([40, 9, 1]))  # one frame is enough
    out.square().sum().backward()
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config, millions", [("resnet34.yaml", 6.63), ("cam_plus.yaml", 7.18)])
def test_recipes_build_the_reference_sized_models(config, millions):
    from tests.conftest import REPO
    cfg = load_config(str(REPO / "configs" / config))
    assert (cfg.upstream.name, cfg.upstream.n_mels) == ("logmel", 80)  # 80-band filterbank, as the references
    model = DOWNSTREAMS[cfg.downstream.name](cfg.upstream.n_mels, cfg.downstream)
    assert round(n_params(model) / 1e6, 2) == millions
