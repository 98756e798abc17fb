"""Triton kernels of soft_split (DESIGN §4): one read of x and one write of the output, both ways.

Forward: a program writes a (BLOCK_L windows x BLOCK_F features) tile of the contiguous (B, L, C*kh*kw) output, so
its stores are contiguous along the features; each element loads x[b, c, oy*sh - ph + i, ox*sw - pw + j] through
x's strides (any layout: contiguous, channels_last, the token view), zero in the padding.
Backward, as a gather: a program owns a tile of grad_x and each element sums the <= ceil(kh/sh) * ceil(kw/sw)
windows that cover it, in fp32, kernel row then kernel column ascending (ATen's col2im order). No atomics, so it is
deterministic. grad_x is contiguous, or channels_last (the token view's layout) when asked.
Kernel size, stride and padding are constexpr (the model has two settings), so the index arithmetic divides by
constants. Offsets into memory are int64; padded positions are masked and their offsets clamped to 0 before any
pointer is formed. On GPU the tile shapes are autotuned per shape; under TRITON_INTERPRET=1 (CPU tensors, tests) a
large fixed tile keeps the interpreter's per-program overhead low.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._env import env_flag
from .._backends import triton_interpreting
from .reference import output_grid


@triton.jit
def window_block(L, BLOCK_L: tl.constexpr):
    """(b, l_offs): the image and the BLOCK_L windows of this program, the grid's first axis running over
    B * cdiv(L, BLOCK_L) blocks of windows. The fused layer norm's kernels use it too."""
    pid = tl.program_id(0)
    n_l_blocks = tl.cdiv(L, BLOCK_L)
    return pid // n_l_blocks, (pid % n_l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)


@triton.jit
def gather_windows(
    x_ptr, b, l_offs, f_offs, H, W, OW, L, F, stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
):
    """The (len(l_offs) windows x len(f_offs) features) tile of batch b's soft split, zero in the padding and outside
    (L, F); returns (values in x's dtype, mask of the tile's elements inside (L, F)). The fused layer norm uses it too."""
    oy, ox = l_offs // OW, l_offs % OW
    c, r = f_offs // (KH * KW), f_offs % (KH * KW)
    i, j = r // KW, r % KW
    y = oy[:, None] * SH - PH + i[None, :]
    x = ox[:, None] * SW - PW + j[None, :]
    in_tile = (l_offs[:, None] < L) & (f_offs[None, :] < F)
    inside = in_tile & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    src = (b.to(tl.int64) * stride_xb + c[None, :].to(tl.int64) * stride_xc + y.to(tl.int64) * stride_xh
           + x.to(tl.int64) * stride_xw)
    return tl.load(x_ptr + tl.where(inside, src, 0), mask=inside, other=0.0), in_tile


@triton.jit
def _soft_split_fwd_kernel(
    x_ptr, out_ptr,
    H, W, OW, L, F,
    stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr,
):
    b, l_offs = window_block(L, BLOCK_L)
    f_offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    value, in_tile = gather_windows(x_ptr, b, l_offs, f_offs, H, W, OW, L, F, stride_xb, stride_xc, stride_xh,
                                    stride_xw, KH, KW, SH, SW, PH, PW)
    dst = (b.to(tl.int64) * L + l_offs[:, None]) * F + f_offs[None, :]
    tl.store(out_ptr + dst, value, mask=in_tile)


@triton.jit
def _soft_split_bwd_kernel(
    grad_out_ptr, grad_x_ptr,
    C, H, W, OH, OW, L, F, n_rows, n_cols,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grad_x memory as a (n_rows, n_cols) matrix: rows (b, c, y) and columns x, or channels_last rows (b, y, x)
    # and columns c; the tile's stores are contiguous along the columns.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if CHANNELS_LAST:
        b, y, x = rows // (H * W), (rows // W) % H, rows % W
        b, y, x = b[:, None], y[:, None], x[:, None]
        c = cols[None, :]
    else:
        b, c, y = rows // (C * H), (rows // H) % C, rows % H
        b, c, y = b[:, None], c[:, None], y[:, None]
        x = cols[None, :]
    in_tile = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    # window oy covers row y with kernel row i = y + ph - oy*sh; descending oy from (y + ph) // sh is ascending i
    for di in tl.static_range((KH + SH - 1) // SH):
        oy = (y + PH) // SH - di
        i = y + PH - oy * SH
        row_ok = (oy >= 0) & (oy < OH) & (i < KH)
        for dj in tl.static_range((KW + SW - 1) // SW):
            ox = (x + PW) // SW - dj
            j = x + PW - ox * SW
            ok = in_tile & row_ok & (ox >= 0) & (ox < OW) & (j < KW)
            src = (b * L + oy * OW + ox) * F + c * (KH * KW) + i * KW + j
            acc += tl.load(grad_out_ptr + tl.where(ok, src, 0), mask=ok, other=0.0).to(tl.float32)
    dst = rows[:, None] * n_cols + cols[None, :]
    tl.store(grad_x_ptr + dst, acc.to(grad_x_ptr.dtype.element_ty), mask=in_tile)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _tile(n_rows: int, n_cols: int, max_cols: int, max_elems: int) -> tuple[int, int]:
    """(rows, cols) of a power-of-two tile: the columns cover n_cols up to max_cols, the rows fill max_elems."""
    cols = _pow2_at_most(n_cols, max_cols)
    return _pow2_at_most(n_rows, max(1, max_elems // cols)), cols


def _gpu_configs(row_name: str, col_name: str):
    return [
        triton.Config({row_name: r, col_name: c}, num_warps=w)
        for r, c, w in ((8, 128, 4), (16, 64, 4), (32, 32, 4), (16, 128, 4), (32, 64, 4), (64, 32, 4),
                        (32, 128, 8), (64, 64, 8), (128, 32, 8))
    ]


def autotuning() -> bool:
    """T2T_TRITON_AUTOTUNE=0: one fixed tile per launch instead of timing every config per new shape (GPU test and
    sanitizer runs: on an H100 the 9 configs' compiles and timings at each odd test shape took minutes)."""
    return env_flag("T2T_TRITON_AUTOTUNE", True)


def _fixed_tile(n_rows: int, n_cols: int, interpreter_elems: int) -> tuple[int, int]:
    """(rows, cols) of a launch that is not autotuned: interpreter_elems in the interpreter (large: fewer programs
    to simulate), 4K elements on a GPU (the autotune configs' middle size; 4 warps)."""
    if triton_interpreting():
        return _tile(n_rows, n_cols, max_cols=1024, max_elems=interpreter_elems)
    return _tile(n_rows, n_cols, max_cols=128, max_elems=4096)


@functools.cache
def _autotuned_forward():
    return triton.autotune(_gpu_configs("BLOCK_L", "BLOCK_F"), key=["L", "F", "stride_xc", "stride_xw"])(
        _soft_split_fwd_kernel
    )


@functools.cache
def _autotuned_backward():
    return triton.autotune(_gpu_configs("BLOCK_R", "BLOCK_N"), key=["n_rows", "n_cols", "L", "F"])(
        _soft_split_bwd_kernel
    )


def check_tensor(name: str, t: torch.Tensor, op: str = "soft_split") -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op} (triton): {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (t.is_cuda or (t.device.type == "cpu" and triton_interpreting())):
        raise RuntimeError(
            f"{op} (triton): {name} must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), "
            f"got {t.device}"
        )


def geometry(input_size, kernel_size, stride, padding, op: str = "soft_split"):
    """((B, C, H, W), the kernels' constexpr geometry, (oh, ow)) after checking it."""
    B, C, H, W = (int(n) for n in input_size)
    (kh, kw), (sh, sw), (ph, pw) = (tuple(int(v) for v in a) for a in (kernel_size, stride, padding))
    if min(kh, kw, sh, sw, C, H, W) < 1 or min(ph, pw) < 0 or H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(
            f"{op} (triton): invalid geometry: input {input_size}, kernel_size {kernel_size}, stride {stride}, "
            f"padding {padding}"
        )
    oh, ow = output_grid((H, W), (kh, kw), (sh, sw), (ph, pw))
    return (B, C, H, W), dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw), (oh, ow)


def soft_split_forward(x: torch.Tensor, kernel_size, stride, padding) -> torch.Tensor:
    """(B, C, H, W) with any strides -> contiguous (B, L, C*kh*kw)."""
    if x.dim() != 4:
        raise ValueError(f"soft_split (triton): x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    check_tensor("x", x)
    (B, C, H, W), geo, (oh, ow) = geometry(x.shape, kernel_size, stride, padding)
    L, F = oh * ow, C * geo["KH"] * geo["KW"]
    out = torch.empty((B, L, F), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    args = (x, out, H, W, ow, L, F, *x.stride())
    if x.is_cuda and not triton_interpreting() and autotuning():
        def grid(meta):
            return (B * triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(F, meta["BLOCK_F"]))

        _autotuned_forward()[grid](*args, **geo)
    else:
        block_l, block_f = _fixed_tile(L, F, interpreter_elems=16384)
        grid = (B * triton.cdiv(L, block_l), triton.cdiv(F, block_f))
        _soft_split_fwd_kernel[grid](*args, **geo, BLOCK_L=block_l, BLOCK_F=block_f, num_warps=4)
    return out


def soft_split_backward(grad_out: torch.Tensor, input_size, kernel_size, stride, padding,
                        channels_last: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fold of grad_out (B, L, C*kh*kw) into grad_x of input_size (B, C, H, W), contiguous or channels_last, in
    dtype (default grad_out's: the fused layer norm folds an fp32 token gradient into a bf16/fp16 grad_x)."""
    check_tensor("grad_out", grad_out)
    (B, C, H, W), geo, (oh, ow) = geometry(input_size, kernel_size, stride, padding)
    L, F = oh * ow, C * geo["KH"] * geo["KW"]
    if tuple(grad_out.shape) != (B, L, F):
        raise ValueError(
            f"soft_split_backward (triton): grad_out must be (B, L, C*kh*kw) = {(B, L, F)} for input_size "
            f"{tuple(input_size)}, got shape {tuple(grad_out.shape)}"
        )
    grad_out = grad_out.contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = torch.empty((B, C, H, W), device=grad_out.device, dtype=dtype or grad_out.dtype, memory_format=fmt)
    if grad_x.numel() == 0:
        return grad_x
    n_rows, n_cols = (B * H * W, C) if channels_last else (B * C * H, W)
    args = (grad_out, grad_x, C, H, W, oh, ow, L, F, n_rows, n_cols)
    if grad_out.is_cuda and not triton_interpreting() and autotuning():
        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(n_cols, meta["BLOCK_N"]))

        _autotuned_backward()[grid](*args, **geo, CHANNELS_LAST=channels_last)
    else:
        block_r, block_n = _fixed_tile(n_rows, n_cols, interpreter_elems=8192)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_n))
        _soft_split_bwd_kernel[grid](*args, **geo, CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_N=block_n,
                                     num_warps=4)
    return grad_x
