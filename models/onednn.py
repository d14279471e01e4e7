"""Float32 linear layers through oneDNN on CPU, in inference: `with onednn_linear(device): model(x)`.

torch's CPU `F.linear` calls MKL's sgemm. MKL picks its code by CPU vendor and on AMD CPUs runs its AVX2
kernels: on a 2-core AMD EPYC with AVX-512, one thread, the shapes of a Base SSL transformer (768 x 3072
and back, 150-400 frames) ran at 88-106 GFLOPS, and at 215-230 through oneDNN
(`python benchmarks/linear_kernels.py` prints both on the machine it runs on). oneDNN ships inside every
x86 torch wheel and already runs torch's CPU convolutions; its linear is the op torch.compile's CPU
backend emits for nn.Linear (`torch.ops.mkldnn._linear_pointwise`). The products and sums are the same
float32 ones in another order, so outputs differ from MKL's by float32 rounding, as any other kernel's do.

Inside the `with`, every `F.linear` (nn.Linear, and the attention projections torchaudio calls F.linear
for) on float32 CPU tensors, without autograd and outside autocast, runs as oneDNN's linear. Anything
else (training, bf16 autocast, CUDA, torch.export, a CPU other than x86-64, a torch without the op) runs
as before.
"""
from __future__ import annotations

import contextlib
import platform

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def available() -> bool:
    """An x86-64 CPU (where it was measured; ARM builds reach oneDNN through another backend) and a torch with the op."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            tensors = [t for t in (x, weight, bias) if t is not None]
            if (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided for t in tensors)
                    and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                    and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()):
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return func(*args, **kwargs)


def onednn_linear(device) -> contextlib.AbstractContextManager:
    """OneDNNLinear on a CPU device with a torch that has oneDNN's linear; elsewhere a no-op."""
    if torch.device(device).type == "cpu" and available():
        return OneDNNLinear()
    return contextlib.nullcontext()
