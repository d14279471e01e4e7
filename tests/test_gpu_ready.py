"""The CUDA path, proven on the CPU (issue 24): where CUDA behaves differently from the CPU, the test
emulates CUDA's rule (an autocast that runs `acos` in fp32, an upstream on another device than the
loader's batches) so that what would break on the first GPU run breaks here."""
import os

import pytest
import torch
from asv.models import LOSSES
from torch.utils._python_dispatch import TorchDispatchMode


def cuda_acos(monkeypatch):
    """CUDA autocast's rule for acos (fp32 list): its input is cast to float32 while autocast is on.
    CPU autocast has no rule for acos, which is why the plain CPU run cannot see the mismatch."""
    plain = torch.acos

    def acos(x, *args, **kwargs):
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return plain(x, *args, **kwargs)
    monkeypatch.setattr(torch, "acos", acos)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_margin_head_is_float32_under_bf16_autocast(monkeypatch, name):
    cuda_acos(monkeypatch)
    torch.manual_seed(0)
    head = LOSSES[name](16, 5, margin=0.2, scale=30.0)
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.arange(8) % 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = emb * 1.0  # an activation as the encoder gives it under autocast
        loss, cosine = head(torch.nn.functional.linear(x, torch.eye(16)), labels)  # bf16 under autocast
    assert cosine.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # fp32 all through: the same numbers as the head run without autocast, to float32 rounding; the
    # input was rounded to bf16 by the linear under autocast, so compare against that rounded input
    with torch.no_grad():
        rounded = emb.detach().bfloat16().float()
        ref_loss, ref_cosine = head(rounded, labels)
    torch.testing.assert_close(cosine.detach(), ref_cosine, rtol=1e-6, atol=1e-6)  # fp32 arithmetic
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)


class ElsewhereUpstream(torch.nn.Module):
    """An upstream whose weights live on the `meta` device, standing in for a CUDA upstream: like a CUDA
    module it refuses a batch left on the loader's device (the CPU). Meta tensors hold no values, so
    it returns zero hidden states on the CPU for the encoder (which sits on the loader's device)."""

    def __init__(self, hidden_size: int = 8, hop: int = 160):
        super().__init__()
        self.register_buffer("weight", torch.empty(1, device="meta"))
        self.hidden_size, self.num_layers, self.hop, self.min_samples = hidden_size, 1, hop, 400
        self.seen = []

    def forward(self, wavs, lengths):
        if wavs.device != self.weight.device or lengths.device != self.weight.device:
            raise RuntimeError(f"input on {wavs.device}, weights on {self.weight.device}")  # what CUDA raises, in short
        self.seen.append(wavs.shape)
        frames = wavs.shape[1] // self.hop
        return [torch.zeros(wavs.shape[0], frames, self.hidden_size)], torch.full((wavs.shape[0],), frames)


def test_embed_feeds_each_batch_on_its_upstreams_device():
    """Validation's loader yields CPU tensors; the upstream sits on the accelerator's device."""
    from accelerate import Accelerator
    from asv.models import build_encoder

    from asv.config import downstream_options
    from asv.embed import embed

    upstream = ElsewhereUpstream()
    encoder = build_encoder(upstream, downstream_options("xvector_bn"))
    batches = [(torch.zeros(2, 16000), torch.tensor([16000, 12000]), torch.tensor([0, 1])),
               (torch.zeros(1, 8000), torch.tensor([8000]), torch.tensor([2]))]
    (table,), done = embed(Accelerator(cpu=True), [upstream], [encoder], batches, 3)
    assert done.all() and table.shape[0] == 3
    assert upstream.seen == [torch.Size([2, 16000]), torch.Size([1, 8000])]


def bf16_frames(channels=3, frames=2999, pad=40):
    """Activations exactly representable in bf16 (so the float64 reference sees the same inputs): mean ~1,
    std ~0.1, one row of `frames` valid frames padded to frames + pad."""
    torch.manual_seed(0)
    x = (1 + 0.1 * torch.randn(1, channels, frames + pad)).bfloat16()
    return x, torch.tensor([frames])


def reference_stats(x, n, unbiased):
    v = x[..., :n].double()
    return torch.cat([v.mean(-1), v.std(-1, unbiased=unbiased)], dim=1)


@pytest.mark.parametrize("unbiased", [False, True])
def test_stats_pool_counts_2999_frames_under_bf16(unbiased):
    """bf16 holds integers exactly only up to 256: a count cast to it makes 2999 frames 2992 (0.23% off)."""
    from asv.models.pooling import StatsPool
    x, lengths = bf16_frames()
    ref = reference_stats(x, 2999, unbiased).float()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = StatsPool(3, unbiased=unbiased)(x.clone(), lengths)
    assert out.dtype == torch.float32
    # float32 sums over 3000 frames: error ~sqrt(T) * 2^-24 ~ 3e-6 relative on the mean; the variance
    # E[x^2] - mean^2 loses ~100x to cancellation (std/mean = 0.1), so 1e-3 on the std
    torch.testing.assert_close(out[:, :3], ref[:, :3], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[:, 3:], ref[:, 3:], rtol=1e-3, atol=0)
    # the packed path (SUPERB's x-vector pools each utterance alone)
    one = StatsPool(3, unbiased=unbiased).one(x[0, :, :2999])
    torch.testing.assert_close(one, ref[0], rtol=1e-3, atol=0)


def test_attentive_pool_counts_2999_frames_under_bf16():
    """Uniform attention (zero scores) is the plain mean and std over the 2999 valid frames."""
    from asv.models.pooling import AttentiveStatsPool
    x, lengths = bf16_frames()
    pool = AttentiveStatsPool(3, attention_dim=4).eval()
    with torch.no_grad():
        pool.score.weight.zero_()
        pool.score.bias.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pool(x, lengths)
    ref = reference_stats(x, 2999, False).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=0)  # float32 sums (see the stats pool test)


def quick_run(demo, exp, *overrides):
    from asv.config import load_config
    from tests.conftest import REPO
    return load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.dir={demo}", f"exp_dir={exp}", "num_workers=0", "data.batch_size=8", "train.total_steps=2",
        "train.log_step=1", "train.save_step=2", "eval_batch=1", "train.test_after_train=false",
        "train.log_with=none", *overrides])


def test_deterministic_mode_is_in_force_in_the_training_step(demo, tmp_path, monkeypatch):
    import train_asv
    seen = []
    real_step = train_asv.train_step

    def step(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train_asv, "train_step", step)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (absent) after the test
    try:
        train_asv.train(quick_run(demo, tmp_path / "exp", "train.deterministic=true"))
        assert len(seen) == 2 and set(seen) == {(True, True, False, ":4096:8")}
    finally:
        from asv.config import TrainConfig
        from asv.train import set_backends
        set_backends(TrainConfig())  # the defaults again, for the tests that follow in this process
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


class HostReads(TorchDispatchMode):
    """Counts, op by op, what makes the host wait for a CUDA device: a value read back (item, int(),
    bool(): aten._local_scalar_dense; tolist, counted where it is called), an output whose size depends
    on the data (nonzero, masked_select, indexing with a boolean mask), and a copy from the host (from
    pageable memory it waits for the device first). The CPU has no such waits, so a CPU run counts them
    by construction; `to` names the device that stands in for CUDA in the copies counted."""

    def __init__(self, monkeypatch, to: str = "cuda"):
        super().__init__()
        self.reads, self.to = [], to
        plain = torch.Tensor.tolist

        def tolist(t):
            self.reads.append("tolist")
            return plain(t)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select"):
            self.reads.append(name)
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.append("boolean index")
        elif name == "_to_copy" and args[0].device.type == "cpu" and str(kwargs.get("device")) == self.to:
            self.reads.append("copy from the host")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["superb_xvector", "xvector_bn", "ecapa"])
def test_a_training_micro_batch_waits_for_the_device_at_most_once(monkeypatch, name):
    """Encoder (featurizer, SpecAugment, downstream) and margin head, forward and backward. SUPERB's
    x-vector packs its valid frames (data-dependent sizes): it reads the frame counts once; the others
    never wait. (The step's one other wait, the finite-gradient check, is once per optimizer step.)"""
    from asv.models import build_encoder, build_head

    from asv.augment import spec_augment
    from asv.config import AugmentConfig, LossConfig, downstream_options

    class Frames(torch.nn.Module):  # hidden states as a 3-layer SSL upstream gives them (sizes only)
        num_layers, hidden_size = 3, 32
    torch.manual_seed(0)
    opts = downstream_options(name)
    for key in ("channels", "proj_dim", "hidden_size"):
        if hasattr(opts, key):
            setattr(opts, key, 32 if name != "ecapa" else 64)
    encoder = build_encoder(Frames(), opts).train()
    aug = AugmentConfig(specaug_prob=1.0)
    encoder.feature_augment = lambda feats, lengths: spec_augment(feats, lengths, aug, torch.Generator().manual_seed(0))
    head = build_head(opts.embed_dim, 4, LossConfig(name="aamsoftmax"))
    hidden = [torch.randn(3, 200, 32) for _ in range(3)]
    frames, labels = torch.tensor([200, 150, 90]), torch.tensor([0, 1, 3])
    with HostReads(monkeypatch) as reads:
        loss, _ = head(encoder(hidden, frames), labels)
        loss.backward()
    assert reads.reads == (["tolist"] if name == "superb_xvector" else [])


def test_spec_augment_copies_its_draws_to_the_device_once(monkeypatch):
    """The draws are made on the CPU generator (the run's seed decides them); the features sit on the
    device (`meta` stands in for CUDA): one copy for all of them, not one per mask."""
    from asv.augment import spec_augment
    from asv.config import AugmentConfig
    cfg = AugmentConfig(specaug_prob=1.0, specaug_time_masks=2, specaug_freq_masks=2)
    feats, lengths = torch.empty(4, 100, 40, device="meta"), torch.full((4,), 100, device="meta")
    with HostReads(monkeypatch, to="meta") as reads:
        out = spec_augment(feats, lengths, cfg, torch.Generator().manual_seed(0))
    assert out.shape == feats.shape and reads.reads == ["copy from the host"]


def test_tf32_is_on_for_cuda_matmuls_and_convolutions_unless_asked_off():
    """torch's default is off: base.yaml trains in fp32, so WavLM's matmuls on an H100 would be full fp32."""
    from asv.config import Config
    from asv.train import make_accelerator
    cfg = Config()
    try:
        make_accelerator(cfg)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        cfg.train.tf32 = False
        make_accelerator(cfg)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_loaders_pin_their_batches_when_cuda_is_there(monkeypatch):
    """Pinned batches let the prepared loader's non_blocking copy overlap the step before."""
    from asv.config import Config
    from asv.data import Utterance, train_loader
    from asv.embed import eval_loader
    from asv.train import make_accelerator
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config()
    cfg.num_workers = 0
    utts = [Utterance(f"u{i}", f"/nowhere/{i}.wav", "s", 3.0, 16000, "train") for i in range(12)]
    assert train_loader(cfg, utts, [0] * 12, [3.0] * 12).pin_memory
    assert eval_loader([u.path for u in utts], [3.0] * 12, cfg, 400, "cuda").pin_memory
    monkeypatch.undo()
    assert make_accelerator(cfg).dataloader_config.non_blocking


def test_ecapa_squeeze_is_the_mean_over_2999_frames_under_bf16():
    """The SE squeeze of each ECAPA block: the mean of the block's output over the valid frames, in float32
    (its input, h, is bf16 under autocast; its count and sum must not be)."""
    from asv.models.ecapa import ECAPA
    torch.manual_seed(0)
    model = ECAPA(8, ECAPA.Options(channels=16, embed_dim=4, attention_dim=8)).eval()
    block = model.blocks[0]
    seen = {}
    block.post.register_forward_hook(lambda m, args, out: seen.__setitem__("h", out))
    block.se.register_forward_pre_hook(lambda m, args: seen.__setitem__("squeeze", args[0]))
    # bf16 features, as an SSL upstream run under autocast hands them over
    feats, lengths = torch.randn(1, 2999 + 40, 8).bfloat16(), torch.tensor([2999])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(feats, lengths)
    assert seen["squeeze"].dtype == torch.float32
    ref = seen["h"][..., :2999].double().mean(-1).float()
    # float32 sums of 2999 bf16 values: ~sqrt(T) * 2^-24 relative; a bf16 count (2992) is 2.3e-3 off
    torch.testing.assert_close(seen["squeeze"], ref, rtol=1e-4, atol=1e-6)
