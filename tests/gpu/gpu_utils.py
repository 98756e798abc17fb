"""Helpers of the CUDA tests: which CUDA backends run an op, free-memory guards, and references that scale to
tensors of more than 2^31 elements (index arithmetic spot checks, a chunked float64 Performer with its gradients).
The references run on any device, so tests/gpu/test_huge_tensors.py checks them against autograd on the CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2t_kernels.ops.performer_attention import BACKENDS as PERFORMER_BACKENDS
from t2t_kernels.ops.soft_split import BACKENDS as SOFT_SPLIT_BACKENDS
from t2t_kernels.ops.soft_split_layer_norm import BACKENDS as SOFT_SPLIT_LAYER_NORM_BACKENDS

OPS = {"soft_split": SOFT_SPLIT_BACKENDS, "soft_split_layer_norm": SOFT_SPLIT_LAYER_NORM_BACKENDS,
       "performer_attention": PERFORMER_BACKENDS}
GPU_BACKENDS = ("cuda", "triton")


def gpu_backend_params(op: str, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """(backend, dtype) params for a CUDA test; unavailable pairs skip at run time with the reason."""
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}") for b in GPU_BACKENDS for d in dtypes]


def skip_unless_runs(op: str, backend: str, dtype: torch.dtype) -> None:
    reason = OPS[op].unavailable_reason(backend, torch.device("cuda"), dtype)
    if reason:
        pytest.skip(reason)


def require_free_memory(gib: float) -> None:
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")


# --- soft split ---------------------------------------------------------------------------------------------------


def soft_split_spot_check(x, y, kernel_size, stride, padding, samples=1 << 22, generator=None):
    """y[b, l, f] == padded x[b, c, oy*s + i, ox*s + j] at `samples` random (b, l, f), indices in int64. Returns the
    number of mismatches (0 expected)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, C, H, W = x.shape
    _, L, Fdim = y.shape
    ow = (W + 2 * pw - kw) // sw + 1
    dev = y.device
    b = torch.randint(0, B, (samples,), device=dev, generator=generator)
    l = torch.randint(0, L, (samples,), device=dev, generator=generator)
    f = torch.randint(0, Fdim, (samples,), device=dev, generator=generator)
    # the last outputs too: their flat offsets are the largest
    b = torch.cat([b, torch.full((Fdim,), B - 1, device=dev)])
    l = torch.cat([l, torch.full((Fdim,), L - 1, device=dev)])
    f = torch.cat([f, torch.arange(Fdim, device=dev)])
    oy, ox = l // ow, l % ow
    c, rest = f // (kh * kw), f % (kh * kw)
    row, col = oy * sh + rest // kw - ph, ox * sw + rest % kw - pw
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    expected = torch.zeros(b.shape, dtype=x.dtype, device=dev)
    expected[inside] = x[b[inside], c[inside], row[inside], col[inside]]
    got = y[b, l, f]
    return int((got != expected).sum())


def window_counts(H, W, kernel_size, stride, padding, device, dtype):
    """How many windows cover each pixel (1, 1, H, W): the gradient of sum(soft_split(x) * soft_split(x)) / 2 is
    x * counts, exact for small-integer x."""
    ones = torch.ones(1, 1, H, W, dtype=torch.float64, device=device)
    cols = F.unfold(ones, kernel_size, padding=padding, stride=stride)
    counts = F.fold(cols, (H, W), kernel_size, padding=padding, stride=stride)
    return counts.to(dtype)


# --- performer attention ------------------------------------------------------------------------------------------


def _features(x, w):
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def chunked_performer_reference(q, k, v, w, grad_y, rows, eps=1e-8, chunk=1 << 20):
    """float64 y, gq, gk, gv at the token indices `rows` of one (T, E) sequence, with the sums over T taken in chunks
    (so T * E may exceed 2^31 and the float64 copies stay small). Formulas of DESIGN.md §4."""
    T, E = q.shape
    wd = w.double()
    kv_state = torch.zeros(w.shape[0], E, dtype=torch.float64, device=q.device)
    k_sum = torch.zeros(w.shape[0], dtype=torch.float64, device=q.device)
    for t0 in range(0, T, chunk):
        kf = _features(k[t0:t0 + chunk].double(), wd)
        kv_state += kf.T @ v[t0:t0 + chunk].double()
        k_sum += kf.sum(0)

    def rows_of(qr, gr):
        qf = _features(qr, wd)
        d = qf @ k_sum + eps
        y = (qf @ kv_state) / d[:, None]
        gn = gr / d[:, None]
        gd = -(gr * y).sum(-1) / d
        return qf, y, gn, gd

    grad_state = torch.zeros_like(kv_state)
    grad_sum = torch.zeros_like(k_sum)
    for t0 in range(0, T, chunk):
        qf, _, gn, gd = rows_of(q[t0:t0 + chunk].double(), grad_y[t0:t0 + chunk].double())
        grad_state += qf.T @ gn
        grad_sum += qf.T @ gd

    def feature_grad(G, P, x):
        return (G * P) @ wd - x * (G * P).sum(-1, keepdim=True)

    qr, kr, vr = q[rows].double(), k[rows].double(), v[rows].double()
    qf, y, gn, gd = rows_of(qr, grad_y[rows].double())
    gq = feature_grad(gn @ kv_state.T + gd[:, None] * k_sum[None], qf, qr)
    kf = _features(kr, wd)
    gk = feature_grad(vr @ grad_state.T + grad_sum[None], kf, kr)
    gv = kf @ grad_state
    return y, gq, gk, gv


def assert_close_scaled(actual, expected, dtype, what=""):
    """Per-dtype tolerances of the op tests, atol scaled by the reference's magnitude."""
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2),
                  torch.float64: (1e-10, 1e-10)}[dtype]
    scale = expected.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")
