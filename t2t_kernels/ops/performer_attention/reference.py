"""Eager Performer attention: the documented truth for every kernel, the fallback, and the official formula."""
import math

import torch

from .._registry import autocast_off


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exponent, phi(k)^T v, sums, numerator and denominator run in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_map(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m): (..., T, E), (m, E) -> (..., T, m)."""
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def performer_attention_with_state(q, k, v, w, eps: float = 1e-8):
    """y plus the state the kernels keep for backward: kv_state = phi(k)^T v (..., m, E), k_sum = sum_t phi(k) (..., m).

    Computed in fp32 (fp64 for fp64 inputs) with autocast off, so fp16/bf16 inputs cannot overflow; y is cast back
    to the input dtype, the state stays in the accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    with autocast_off(q.device.type):
        qf, kf, vf, wf = (t.to(acc) for t in (q, k, v, w))
        q_feat, k_feat = feature_map(qf, wf), feature_map(kf, wf)
        kv_state = k_feat.transpose(-1, -2) @ vf
        k_sum = k_feat.sum(-2)
        numerator = q_feat @ kv_state
        denominator = (q_feat @ k_sum.unsqueeze(-1)) + eps
        return (numerator / denominator).to(q.dtype), kv_state, k_sum


def performer_attention(q, k, v, w, eps: float = 1e-8) -> torch.Tensor:
    """y = phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k) + eps), for q, k, v (..., T, E) and w (m, E)."""
    return performer_attention_with_state(q, k, v, w, eps)[0]


def performer_attention_official(q, k, v, w, eps: float = 1e-8) -> torch.Tensor:
    """The official Token_performer.single_attn core (yitu-opensource/T2T-ViT), op for op, for (B, T, E) inputs.

    Kept for the benchmarks' "eager" provider and to show its failure: under fp16 autocast its einsums run in fp16,
    |x|^2/2 and the sums over T overflow, and y becomes inf/NaN.
    """
    m, emb = w.shape

    def prm_exp(x):
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
    return torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, emb) + eps)
