"""Triton kernels of soft_split_layer_norm: the soft split's gather and the LayerNorm of each token in one pass.

A program owns BLOCK_L windows of one image with all their C*kh*kw features in one tile (F <= MAX_FEATURES), so the
per-token statistics are row reductions of the tile. Forward writes the normalised tokens and the fp32 mean and rstd.
Backward re-gathers the tokens from x, writes the fp32 token gradient
    grad_u = rstd * (g*w - mean_f(g*w) - xhat * mean_f(g*w*xhat)),  xhat = (u - mean) * rstd,
and the program's partial sums of g*xhat and g; the partials are summed by torch (a fixed reduction order, so
deterministic) and grad_u folds into grad_x with the soft split's gather backward. No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting
from ..soft_split.triton import check_tensor, gather_windows, geometry, soft_split_backward, window_block

OP = "soft_split_layer_norm"
MAX_FEATURES = 8192  # a token's features must fit one tile


@triton.jit
def _load_features(ptr, f_offs, F):
    """A per-feature (F,) parameter as fp32, zero past F."""
    return tl.load(ptr + f_offs, mask=f_offs < F, other=0.0).to(tl.float32)


@triton.jit
def _gather_tokens(
    x_ptr, H, W, OW, L, F, stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """This program's BLOCK_L tokens with all their features: (b, l_offs, f_offs, tokens in x's dtype, in_tile)."""
    b, l_offs = window_block(L, BLOCK_L)
    f_offs = tl.arange(0, BLOCK_F)
    u, in_tile = gather_windows(x_ptr, b, l_offs, f_offs, H, W, OW, L, F, stride_xb, stride_xc, stride_xh,
                                stride_xw, KH, KW, SH, SW, PH, PW)
    return b, l_offs, f_offs, u, in_tile


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
    H, W, OW, L, F, eps,
    stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
):
    b, l_offs, f_offs, u, in_tile = _gather_tokens(x_ptr, H, W, OW, L, F, stride_xb, stride_xc, stride_xh, stride_xw,
                                                   KH, KW, SH, SW, PH, PW, BLOCK_L, BLOCK_F)
    u = u.to(tl.float32)
    mean = tl.sum(u, axis=1) / F
    centred = tl.where(in_tile, u - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / F + eps)
    w = _load_features(w_ptr, f_offs, F)
    bias = _load_features(b_ptr, f_offs, F)
    y = centred * rstd[:, None] * w[None, :] + bias[None, :]
    token = b.to(tl.int64) * L + l_offs
    tl.store(out_ptr + token[:, None] * F + f_offs[None, :], y.to(out_ptr.dtype.element_ty), mask=in_tile)
    tl.store(mean_ptr + token, mean, mask=l_offs < L)
    tl.store(rstd_ptr + token, rstd, mask=l_offs < L)


@triton.jit
def _backward_kernel(
    grad_out_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, grad_u_ptr, partial_ptr,
    H, W, OW, L, F,
    stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
):
    b, l_offs, f_offs, u, in_tile = _gather_tokens(x_ptr, H, W, OW, L, F, stride_xb, stride_xc, stride_xh, stride_xw,
                                                   KH, KW, SH, SW, PH, PW, BLOCK_L, BLOCK_F)
    token = b.to(tl.int64) * L + l_offs
    mean = tl.load(mean_ptr + token, mask=l_offs < L, other=0.0)
    rstd = tl.load(rstd_ptr + token, mask=l_offs < L, other=0.0)
    xhat = tl.where(in_tile, (u.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    offs = token[:, None] * F + f_offs[None, :]
    g = tl.load(grad_out_ptr + tl.where(in_tile, offs, 0), mask=in_tile, other=0.0).to(tl.float32)
    w = _load_features(w_ptr, f_offs, F)
    gw = g * w[None, :]
    a = tl.sum(gw, axis=1) / F
    c = tl.sum(gw * xhat, axis=1) / F
    grad_u = rstd[:, None] * (gw - a[:, None] - xhat * c[:, None])
    tl.store(grad_u_ptr + offs, grad_u, mask=in_tile)
    partial = partial_ptr + tl.program_id(0).to(tl.int64) * 2 * F + f_offs  # one partial per program
    tl.store(partial, tl.sum(g * xhat, axis=0), mask=f_offs < F)
    tl.store(partial + F, tl.sum(g, axis=0), mask=f_offs < F)


def _tile(F: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_F, num_warps): all features in one tile, ~4K elements a program (16K in the interpreter,
    whose cost is per program)."""
    block_f = triton.next_power_of_2(F)
    budget = 16384 if triton_interpreting() else 4096
    block_l = min(triton.next_power_of_2(max(1, L)), max(1, budget // block_f))
    return block_l, block_f, 8 if block_l * block_f >= 4096 else 4


def _check_inputs(x: torch.Tensor, params: dict, kernel_size, stride, padding):
    if x.dim() != 4:
        raise ValueError(f"{OP} (triton): x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    check_tensor("x", x, OP)
    (B, C, H, W), geo, (oh, ow) = geometry(x.shape, kernel_size, stride, padding, OP)
    F = C * geo["KH"] * geo["KW"]
    if F > MAX_FEATURES:
        raise ValueError(f"{OP} (triton): C*kh*kw = {F} features exceed one tile ({MAX_FEATURES})")
    for name, t in params.items():
        if tuple(t.shape) != (F,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{OP} (triton): {name} must be a floating ({F},) tensor on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return (B, H, W), geo, (oh, ow), F


def soft_split_layer_norm_forward(x, weight, bias, kernel_size, stride, padding, eps):
    """-> (normalised tokens (B, L, F) in x's dtype, mean (B, L) fp32, rstd (B, L) fp32)."""
    (B, H, W), geo, (oh, ow), F = _check_inputs(x, {"weight": weight, "bias": bias}, kernel_size, stride, padding)
    if not 0 <= eps < float("inf"):
        raise ValueError(f"{OP} (triton): eps must be finite and non-negative, got {eps!r}")
    L = oh * ow
    out = torch.empty((B, L, F), device=x.device, dtype=x.dtype)
    mean = torch.empty((B, L), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if out.numel() == 0:
        return out, mean, rstd
    block_l, block_f, warps = _tile(F, L)
    _forward_kernel[(B * triton.cdiv(L, block_l),)](
        x, weight.contiguous(), bias.contiguous(), out, mean, rstd, H, W, ow, L, F, float(eps), *x.stride(), **geo,
        BLOCK_L=block_l, BLOCK_F=block_f, num_warps=warps,
    )
    return out, mean, rstd


def soft_split_layer_norm_backward(grad_out, x, weight, mean, rstd, kernel_size, stride, padding,
                                   channels_last=False, x_grad=True):
    """-> (grad_x in x's dtype, contiguous or channels_last (without x_grad: empty, not computed); grad_weight and
    grad_bias in weight's dtype)."""
    (B, H, W), geo, (oh, ow), F = _check_inputs(x, {"weight": weight}, kernel_size, stride, padding)
    L = oh * ow
    check_tensor("grad_out", grad_out, OP)
    if tuple(grad_out.shape) != (B, L, F):
        raise ValueError(f"{OP}_backward (triton): grad_out must be (B, L, C*kh*kw) = {(B, L, F)}, "
                         f"got {tuple(grad_out.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != (B, L) or t.dtype != torch.float32:
            raise ValueError(f"{OP}_backward (triton): {name} must be float32 (B, L) = {(B, L)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    block_l, block_f, warps = _tile(F, L)
    programs = B * triton.cdiv(L, block_l)
    grad_u = torch.empty((B, L, F), device=x.device, dtype=torch.float32)
    partials = torch.empty((programs, 2, F), device=x.device, dtype=torch.float32)
    if grad_u.numel() > 0:
        _backward_kernel[(programs,)](
            grad_out.contiguous(), x, weight.contiguous(), mean.contiguous(), rstd.contiguous(), grad_u, partials,
            H, W, ow, L, F, *x.stride(), **geo, BLOCK_L=block_l, BLOCK_F=block_f, num_warps=warps,
        )
    grad_weight, grad_bias = (partials[:, n].sum(0).to(weight.dtype) for n in (0, 1))
    if not x_grad:
        return x.new_empty(0), grad_weight, grad_bias
    grad_x = soft_split_backward(grad_u, x.shape, kernel_size, stride, padding, channels_last, dtype=x.dtype)
    return grad_x, grad_weight, grad_bias
