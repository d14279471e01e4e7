"""The CUDA path, proven on the CPU (issue 24): where CUDA behaves differently from the CPU, the test
emulates CUDA's rule (an autocast that runs `acos` in fp32, an upstream on another device than the
loader's batches) so that what would break on the first GPU run breaks here."""
import pytest
import torch

from asv.models import LOSSES


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

    from asv.config import downstream_options
    from asv.embed import embed
    from asv.models import build_encoder

    upstream = ElsewhereUpstream()
    encoder = build_encoder(upstream, downstream_options("xvector_bn"))
    batches = [(torch.zeros(2, 16000), torch.tensor([16000, 12000]), torch.tensor([0, 1])),
               (torch.zeros(1, 8000), torch.tensor([8000]), torch.tensor([2]))]
    (table,), done = embed(Accelerator(cpu=True), [upstream], [encoder], batches, 3)
    assert done.all() and table.shape[0] == 3
    assert upstream.seen == [torch.Size([2, 16000]), torch.Size([1, 8000])]
