"""Triton kernels of performer_attention (DESIGN §4): two passes each way, one program per (batch element, T-block
or chunk of them), on a 1-D grid (a grid's y and z stop at 65535 programs: a long sequence passes that).

A program loads blocks of rows, computes their features phi in registers (never a (B, T, m) tensor) and either
writes its partial of a reduction over T (a chunk of blocks), or its rows of the outputs (one block). Partials
(B, chunks, m, E) are summed with torch over the chunk dim, a fixed-order reduction, so outputs and gradients are
bitwise reproducible.

All math is fp32, products included, because an error in x w^T is a relative error in phi. How the products run
depends on the input dtype (SPLIT):
- fp32 and fp16 inputs: fp32 FMA (tl.dot input_precision="ieee"), full fp32 accuracy.
- bf16 inputs: each fp32 operand is split into bf16 hi + lo parts (bf16 inputs exactly: their lo is zero), and
  a @ b is the three tensor-core products hi hi + hi lo + lo hi, accumulated in fp32: each operand to about 16 bits
  (two products where an operand is an input's bf16 rows, kept as they are: its lo product is zero and skipped).
  The FMA path ran at about 5% of the H100's copy bandwidth at the model's shapes (the backward's query kernel
  723 us at B=128, T=3136), bound by its fp32 products; split, the op ran 2.5x faster forward, 1.8x forward+backward
  there. The tests hold y within 1.25 ulps of the float64 result (1.06 interpreted, where the bf16 store truncates;
  FMA products 1.0 there); fp16 outputs, 8 times finer, were 2.6 ulps off this way, so fp16 keeps the FMA path.
  bf16 parts keep fp32's range: phi reaches e^16 / sqrt(m), past fp16's.
T2T_PERFORMER_SPLIT_BF16=0 runs bf16 inputs on the FMA path too (to compare the two on a GPU).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..._env import env_flag
from .._backends import triton_interpreting

# fp32 products in full precision (not TF32); a constexpr, the only kind of global a compiled kernel may read
IEEE = tl.constexpr("ieee")


@triton.jit
def _load_rows(ptr, stride_t, t_offs, e_offs, T, E):
    """Rows t_offs of one sequence (ptr: its first row) of a tensor with unit last stride, in its dtype (zeros
    outside): bf16 rows stay bf16, exact in one part for _dot's split products and half the registers of fp32.
    The row offsets are int64: t * stride_t passes 2^31 in long sequences and in views of larger tensors."""
    mask = (t_offs[:, None] < T) & (e_offs[None, :] < E)
    ptrs = ptr + t_offs[:, None].to(tl.int64) * stride_t + e_offs[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, T, E, t_offs, e_offs):
    """Stores a block of rows into one sequence (ptr: its first row) of a contiguous (B, T, E) output, converting to
    its dtype; int64 row offsets, as in _load_rows."""
    mask = (t_offs[:, None] < T) & (e_offs[None, :] < E)
    ptrs = ptr + t_offs[:, None].to(tl.int64) * E + e_offs[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_matrix(ptr, rows, cols, r_offs, c_offs):
    """A contiguous (rows, cols) fp32 matrix padded with zeros to the block shape."""
    mask = (r_offs[:, None] < rows) & (c_offs[None, :] < cols)
    return tl.load(ptr + r_offs[:, None] * cols + c_offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _split_bf16(a, PART: tl.constexpr):
    """a (fp32) as bf16 hi + lo: hi rounded to nearest, lo the rounded remainder (a to about 16 significant bits);
    returned in PART (bf16, or fp32 holding the same values where Triton's interpreter, whose dot multiplies bf16's
    raw bits, runs the kernel)."""
    hi = a.to(tl.bfloat16)
    return hi.to(PART), (a - hi.to(tl.float32)).to(tl.bfloat16).to(PART)


@triton.jit
def _dot(a, b, SPLIT: tl.constexpr, PART: tl.constexpr):
    """a @ b of fp32 (or input-dtype) tiles, accumulated in fp32: FMA products, or SPLIT, three products of bf16
    parts on the tensor cores (see the module doc). A bf16 operand (an input's rows) is its own hi part with a zero
    lo part, so the product of its lo part is skipped: the same sum, one tensor-core product fewer."""
    if SPLIT:
        if a.dtype == tl.bfloat16:
            b_hi, b_lo = _split_bf16(b, PART)
            acc = tl.dot(a.to(PART), b_lo, input_precision=IEEE, out_dtype=tl.float32)
            return tl.dot(a.to(PART), b_hi, acc, input_precision=IEEE, out_dtype=tl.float32)
        elif b.dtype == tl.bfloat16:
            a_hi, a_lo = _split_bf16(a, PART)
            acc = tl.dot(a_lo, b.to(PART), input_precision=IEEE, out_dtype=tl.float32)
            return tl.dot(a_hi, b.to(PART), acc, input_precision=IEEE, out_dtype=tl.float32)
        else:
            a_hi, a_lo = _split_bf16(a, PART)
            b_hi, b_lo = _split_bf16(b, PART)
            acc = tl.dot(a_lo, b_hi, input_precision=IEEE, out_dtype=tl.float32)  # the small terms first
            acc = tl.dot(a_hi, b_lo, acc, input_precision=IEEE, out_dtype=tl.float32)
            return tl.dot(a_hi, b_hi, acc, input_precision=IEEE, out_dtype=tl.float32)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=IEEE)


@triton.jit
def _features(x, w, t_offs, m_offs, T, m, scale, SPLIT: tl.constexpr, PART: tl.constexpr):
    """phi(x) = exp(x w^T - |x|^2 / 2) * scale, zero on padded rows and features (they must not enter any sum)."""
    xw = _dot(x, tl.trans(w), SPLIT, PART)
    x = x.to(tl.float32)
    half_sq = 0.5 * tl.sum(x * x, axis=1)
    phi = tl.exp(xw - half_sq[:, None]) * scale
    return tl.where((t_offs[:, None] < T) & (m_offs[None, :] < m), phi, 0.0)


@triton.jit
def _feature_grad(G, phi, w, x, SPLIT: tl.constexpr, PART: tl.constexpr):
    """Gradient through phi for upstream G: (G * phi) w - x * rowsum(G * phi)."""
    gp = G * phi
    return _dot(gp, w, SPLIT, PART) - x.to(tl.float32) * tl.sum(gp, axis=1)[:, None]


@triton.jit
def _program_rows(n_per_sequence):
    """(batch element, block or chunk of blocks within its sequence) of this program of a 1-D grid; b as int64:
    b * (T * E) passes 2^31 in big batches."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // n_per_sequence, (pid % n_per_sequence).to(tl.int32)


@triton.jit
def _store_partial(state_ptr, sum_ptr, state, total, b, chunk, n_chunks, m, E, m_offs, e_offs):
    """One program's partial of a (B, chunks, m, E) state and a (B, chunks, m) sum."""
    base = b * n_chunks + chunk
    mask = (m_offs[:, None] < m) & (e_offs[None, :] < E)
    tl.store(state_ptr + base * m * E + m_offs[:, None] * E + e_offs[None, :], state, mask=mask)
    tl.store(sum_ptr + base * m + m_offs, total, mask=m_offs < m)


@triton.jit
def _load_state(state_ptr, sum_ptr, b, m, E, m_offs, e_offs):
    """Batch element b's reduced (m, E) state and (m,) sum (fp32), as the reducing kernels' partials sum to."""
    state = _load_matrix(state_ptr + b * m * E, m, E, m_offs, e_offs)
    total = tl.load(sum_ptr + b * m + m_offs, mask=m_offs < m, other=0.0)
    return state, total


@triton.jit
def _performer_fwd_state_kernel(
    k_ptr, v_ptr, w_ptr, part_kv_ptr, part_ksum_ptr,
    T, E, m, scale, n_chunks, stride_kb, stride_kt, stride_vb, stride_vt,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    SPLIT: tl.constexpr, PART: tl.constexpr,
):
    """The partials of A = phi(k)^T v and s = phi(k)^T 1 over BLOCKS_PER_PROGRAM blocks of rows."""
    b, chunk = _program_rows(n_chunks)
    e_offs, m_offs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_M)
    w = _load_matrix(w_ptr, m, E, m_offs, e_offs)
    kv = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(BLOCKS_PER_PROGRAM):
        t_offs = (chunk * BLOCKS_PER_PROGRAM + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        k = _load_rows(k_ptr + b * stride_kb, stride_kt, t_offs, e_offs, T, E)
        v = _load_rows(v_ptr + b * stride_vb, stride_vt, t_offs, e_offs, T, E)
        phi = _features(k, w, t_offs, m_offs, T, m, scale, SPLIT, PART)
        kv += _dot(tl.trans(phi), v, SPLIT, PART)
        ksum += tl.sum(phi, axis=0)
    _store_partial(part_kv_ptr, part_ksum_ptr, kv, ksum, b, chunk, n_chunks, m, E, m_offs, e_offs)


@triton.jit
def _performer_fwd_output_kernel(
    q_ptr, w_ptr, kv_ptr, ksum_ptr, y_ptr,
    T, E, m, scale, eps, n_blocks, stride_qb, stride_qt,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
    PART: tl.constexpr,
):
    b, blk = _program_rows(n_blocks)
    t_offs = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    e_offs, m_offs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_M)
    w = _load_matrix(w_ptr, m, E, m_offs, e_offs)
    kv, ksum = _load_state(kv_ptr, ksum_ptr, b, m, E, m_offs, e_offs)
    q = _load_rows(q_ptr + b * stride_qb, stride_qt, t_offs, e_offs, T, E)
    phi = _features(q, w, t_offs, m_offs, T, m, scale, SPLIT, PART)
    numerator = _dot(phi, kv, SPLIT, PART)
    denominator = tl.sum(phi * ksum[None, :], axis=1) + eps
    _store_rows(y_ptr + b * T * E, numerator / denominator[:, None], T, E, t_offs, e_offs)


@triton.jit
def _performer_bwd_query_kernel(
    g_ptr, q_ptr, w_ptr, kv_ptr, ksum_ptr, gq_ptr, part_gkv_ptr, part_gksum_ptr,
    T, E, m, scale, eps, n_chunks, stride_gb, stride_gt, stride_qb, stride_qt,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    SPLIT: tl.constexpr, PART: tl.constexpr,
):
    """gq for BLOCKS_PER_PROGRAM blocks of rows, and their partials of gA = phi(q)^T gn and gs = phi(q)^T gd."""
    b, chunk = _program_rows(n_chunks)
    e_offs, m_offs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_M)
    w = _load_matrix(w_ptr, m, E, m_offs, e_offs)
    kv, ksum = _load_state(kv_ptr, ksum_ptr, b, m, E, m_offs, e_offs)
    g_kv = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    g_ksum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(BLOCKS_PER_PROGRAM):
        t_offs = (chunk * BLOCKS_PER_PROGRAM + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        q = _load_rows(q_ptr + b * stride_qb, stride_qt, t_offs, e_offs, T, E)
        g = _load_rows(g_ptr + b * stride_gb, stride_gt, t_offs, e_offs, T, E).to(tl.float32)
        phi = _features(q, w, t_offs, m_offs, T, m, scale, SPLIT, PART)
        inv_den = 1.0 / (tl.sum(phi * ksum[None, :], axis=1) + eps)
        y = _dot(phi, kv, SPLIT, PART) * inv_den[:, None]  # recomputed, not saved
        g_num = g * inv_den[:, None]
        g_den = -tl.sum(g * y, axis=1) * inv_den
        g_phi = _dot(g_num, tl.trans(kv), SPLIT, PART) + g_den[:, None] * ksum[None, :]
        _store_rows(gq_ptr + b * T * E, _feature_grad(g_phi, phi, w, q, SPLIT, PART), T, E, t_offs, e_offs)
        g_kv += _dot(tl.trans(phi), g_num, SPLIT, PART)
        g_ksum += tl.sum(phi * g_den[:, None], axis=0)
    _store_partial(part_gkv_ptr, part_gksum_ptr, g_kv, g_ksum, b, chunk, n_chunks, m, E, m_offs, e_offs)


@triton.jit
def _performer_bwd_key_value_kernel(
    k_ptr, v_ptr, w_ptr, gkv_ptr, gksum_ptr, gk_ptr, gv_ptr,
    T, E, m, scale, n_blocks, stride_kb, stride_kt, stride_vb, stride_vt,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
    PART: tl.constexpr,
):
    """gk and gv for a block of rows: gK' = v gA^T + 1 gs^T, gv = phi(k) gA."""
    b, blk = _program_rows(n_blocks)
    t_offs = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    e_offs, m_offs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_M)
    w = _load_matrix(w_ptr, m, E, m_offs, e_offs)
    g_kv, g_ksum = _load_state(gkv_ptr, gksum_ptr, b, m, E, m_offs, e_offs)
    k = _load_rows(k_ptr + b * stride_kb, stride_kt, t_offs, e_offs, T, E)
    phi = _features(k, w, t_offs, m_offs, T, m, scale, SPLIT, PART)
    # gv first and v loaded late: fewer tiles live at once (at 64 rows and 4 warps the other order spilled 108 B)
    _store_rows(gv_ptr + b * T * E, _dot(phi, g_kv, SPLIT, PART), T, E, t_offs, e_offs)
    v = _load_rows(v_ptr + b * stride_vb, stride_vt, t_offs, e_offs, T, E)
    g_phi = _dot(v, tl.trans(g_kv), SPLIT, PART) + g_ksum[None, :]
    _store_rows(gk_ptr + b * T * E, _feature_grad(g_phi, phi, w, k, SPLIT, PART), T, E, t_offs, e_offs)


# programs the reducing kernels aim for (a few per SM of a large GPU) before they sum several blocks per program
TARGET_PROGRAMS = 1024


def _default_tile(block_e: int, split: bool) -> tuple[int, int]:
    """(rows, warps) of a launch when T2T_PERFORMER_TILE is unset. With split-bf16 products at E <= 64 every kernel,
    forward and backward, takes 64 rows and 4 warps: on the H100 (scripts/tune_performer.py, B=128, E=64) the op's
    forward ran 1.90x faster at T=3136 (259 vs 494 us; 2026-11-27, no ptxas spills: 158 and 179 registers), and the
    backward's kernels at that tile too made forward + backward's kernel time 1.97x shorter at T=3136 (493 vs 972
    us) and 1.69x at T=784 (173 vs 293 us; 2026-11-27, late) than with them at 32 rows and 8 warps, though ptxas
    spilled 36-108 bytes a thread in them then (16-60 since the bf16 rows stay bf16, Triton 3.8)."""
    if split and block_e <= 64:
        return 64, 4
    return (32 if block_e <= 64 else 16), 8


def _launch_config(B: int, T: int, E: int, m: int, dtype: torch.dtype):
    """(blocks of rows, programs of the reducing kernels, blocks per such program, kernel meta) for the shape and
    input dtype (SPLIT: bf16 inputs take the split-bf16 tensor-core products, see the module doc), both passes.

    tl.dot needs every block dim >= 16. The FMA paths' default tiles (32 rows at E <= 64, 16 beyond, and 8 warps)
    compile for sm_90 without register pressure at E <= 64 in every kernel and dtype, with Triton 3.6 and 3.8
    (scripts/triton_aot_check.py: at most 20 bytes a thread spilled by ptxas's own occupancy choice; 64 rows and 4
    warps spilled up to 1.4 KB in the FMA products; E = 128 spills a few dozen bytes); the split-bf16 kernels take
    64 rows and 4 warps (_default_tile: measured faster despite the backward's small spills). The
    reducing kernels (the forward's state, the backward's query pass) sum up to 4 blocks per program (8 spilled in
    fp16 with Triton 3.6): each program writes one (m, E) fp32 partial, at 32 rows as large as the rows' k and v, so
    fewer partials save memory traffic, while B * T / rows stays near TARGET_PROGRAMS or above. A power of two and a
    constexpr: three variants (a runtime loop bound also trips Triton 3.6's interpreter under NumPy 2)."""
    block_e = max(16, triton.next_power_of_2(E))
    block_m = max(16, triton.next_power_of_2(m))
    split = dtype == torch.bfloat16 and env_flag("T2T_PERFORMER_SPLIT_BF16", True)
    rows, warps = tile_override() or _default_tile(block_e, split)
    block_t = max(16, min(rows, triton.next_power_of_2(max(T, 1))))
    n_blocks = max(1, triton.cdiv(T, block_t))
    blocks_per_program = 1 << (max(1, min(4, B * n_blocks // TARGET_PROGRAMS)).bit_length() - 1)  # 1, 2, 4
    n_chunks = triton.cdiv(n_blocks, blocks_per_program)
    meta = dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_M=block_m, SPLIT=split,
                PART=tl.float32 if triton_interpreting() else tl.bfloat16, num_warps=warps)
    return n_blocks, n_chunks, blocks_per_program, meta


TILE_ENV = "T2T_PERFORMER_TILE"


def tile_override() -> tuple[int, int] | None:
    """T2T_PERFORMER_TILE="rows,warps": the tile every kernel launch takes instead of the default, for
    scripts/tune_performer.py to time candidates on a GPU."""
    text = os.environ.get(TILE_ENV, "").strip()
    return parse_tile(text) if text else None


def parse_tile(text: str) -> tuple[int, int]:
    """A tile written "rows,warps" as (rows, warps): rows a power of two >= 16, warps 1-16, a power of two; else a
    ValueError that names T2T_PERFORMER_TILE."""
    try:
        rows, warps = (int(part) for part in text.split(","))
    except ValueError:
        rows = warps = 0
    if rows < 16 or rows & (rows - 1) or warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{TILE_ENV} must be 'rows,warps' with rows a power of two >= 16 and warps one of "
                         f"1, 2, 4, 8, 16; got {text!r}")
    return rows, warps


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def performer_attention_forward(q, k, v, w, eps):
    """(B, T, E) q, k, v and (m, E) w -> y (B, T, E) in q's dtype, kv_state (B, m, E) and k_sum (B, m) in fp32."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    B, T, E = q.shape
    m = w.shape[0]
    w32 = w.to(torch.float32).contiguous()
    scale = 1.0 / math.sqrt(m)
    n_blocks, n_chunks, blocks_per_program, meta = _launch_config(B, T, E, m, q.dtype)
    part_kv = torch.empty((B, n_chunks, m, E), device=q.device, dtype=torch.float32)
    part_ksum = torch.empty((B, n_chunks, m), device=q.device, dtype=torch.float32)
    _performer_fwd_state_kernel[(B * n_chunks,)](k, v, w32, part_kv, part_ksum, T, E, m, scale, n_chunks,
                                                 k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                                 BLOCKS_PER_PROGRAM=blocks_per_program, **meta)
    kv_state, k_sum = part_kv.sum(1), part_ksum.sum(1)
    y = torch.empty((B, T, E), device=q.device, dtype=q.dtype)
    _performer_fwd_output_kernel[(B * n_blocks,)](q, w32, kv_state, k_sum, y, T, E, m, scale, eps, n_blocks,
                                                  q.stride(0), q.stride(1), **meta)
    return y, kv_state, k_sum


def performer_attention_backward(grad_y, q, k, v, w, kv_state, k_sum, eps):
    """Gradients (gq, gk, gv), contiguous in q's dtype, from grad_y and the forward's fp32 state."""
    grad_y, q, k, v = (_unit_last_stride(t) for t in (grad_y, q, k, v))
    B, T, E = q.shape
    m = w.shape[0]
    w32 = w.to(torch.float32).contiguous()
    kv_state, k_sum = kv_state.to(torch.float32).contiguous(), k_sum.to(torch.float32).contiguous()
    scale = 1.0 / math.sqrt(m)
    n_blocks, n_chunks, blocks_per_program, meta = _launch_config(B, T, E, m, q.dtype)
    gq, gk, gv = (torch.empty((B, T, E), device=q.device, dtype=q.dtype) for _ in range(3))
    part_gkv = torch.empty((B, n_chunks, m, E), device=q.device, dtype=torch.float32)
    part_gksum = torch.empty((B, n_chunks, m), device=q.device, dtype=torch.float32)
    _performer_bwd_query_kernel[(B * n_chunks,)](grad_y, q, w32, kv_state, k_sum, gq, part_gkv, part_gksum,
                                                 T, E, m, scale, eps, n_chunks, grad_y.stride(0), grad_y.stride(1),
                                                 q.stride(0), q.stride(1), BLOCKS_PER_PROGRAM=blocks_per_program,
                                                 **meta)
    g_kv, g_ksum = part_gkv.sum(1), part_gksum.sum(1)
    _performer_bwd_key_value_kernel[(B * n_blocks,)](k, v, w32, g_kv, g_ksum, gk, gv, T, E, m, scale, n_blocks,
                                                     k.stride(0), k.stride(1), v.stride(0), v.stride(1), **meta)
    return gq, gk, gv
