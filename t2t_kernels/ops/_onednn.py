"""oneDNN's linear for float32 CPU products: torch's mkldnn::_linear_pointwise (what inductor's CPU freezing path
calls), whose float32 GEMMs beat MKL's (what F.linear calls) by 15-35% at the model's shapes on AMD Zen 4. On an
Intel Xeon MKL's are the faster: there oneDNN made T2T-ViT-14's forward 2-6% slower (interleaved in-process runs,
2026-11-28; its qkv product without bias 8-16% slower) and its train step no faster, so by default oneDNN is used on
every CPU but Intel's. The inference paths take it for the products before the fused ops, the training pairs
(layers/recompute.py) for their forward product and their input's gradient. The post_attention op's wide path and the
pairs' C++ ops (csrc/cpu/onednn_linear.h) use the same op, with the same switches: T2T_ONEDNN=1 takes it for all of
them on an Intel CPU too, T2T_ONEDNN=0 or torch.backends.mkldnn.enabled = False turns them off everywhere."""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

from .._env import env_flag
from ._registry import needs_eager_autodiff

ONEDNN_ENV = "T2T_ONEDNN"


def _linear_pointwise_registered() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return True


ONEDNN_LINEAR_REGISTERED = _linear_pointwise_registered()


@functools.cache
def intel_cpu() -> bool:
    """Whether the CPU is Intel's (x86 vendor GenuineIntel): the extension's onednn_by_default asks the CPU itself."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "GenuineIntel" in platform.processor()  # Windows: "Intel64 Family 6 Model ..., GenuineIntel"


def onednn_wanted() -> bool:
    """T2T_ONEDNN's answer (_env.env_flag): unset or empty, oneDNN except on an Intel CPU; else what it says."""
    return env_flag(ONEDNN_ENV, not intel_cpu())


def onednn_linear_applies(x: torch.Tensor) -> bool:
    """Whether linear() runs x through oneDNN: float32 on the CPU outside CPU autocast (where F.linear computes in the
    autocast dtype), torch built with oneDNN and not told otherwise (torch.backends.mkldnn.enabled, onednn_wanted),
    outside torch.compile (whose inductor picks its own GEMMs) and torch.jit.trace (which cannot record the op's
    optional-scalar list argument)."""
    return (ONEDNN_LINEAR_REGISTERED and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() > 0 and x.shape[-1] > 0  # (oneDNN has no primitive for an empty reduction)
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and onednn_wanted())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for inference (the oneDNN op has no derivative: where a gradient or a forward-mode
    tangent is wanted, or oneDNN does not apply, F.linear)."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    if (wants_grad or weight.dtype != x.dtype or not onednn_linear_applies(x)
            or needs_eager_autodiff(x, weight, bias)):
        return F.linear(x, weight, bias)
    # (oneDNN ignores a bias's strides: an expanded or strided one would be misread)
    return torch.ops.mkldnn._linear_pointwise(x, weight, None if bias is None else bias.contiguous(), "none", [], "")
