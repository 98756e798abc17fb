"""Tensors past 2^31 elements on the CUDA backends (int64 indexing): a soft split whose output has more than 2^31
elements (one big image; a big batch of stage-1 token views), and Performer attention with B*T*E > 2^31 (a big batch;
one very long sequence). Checked where a full float64 reference does not fit: index-arithmetic spot checks and the
exact tail for the soft split, a chunked float64 reference at chosen rows (incl. the last) for the Performer.

Memory: each test needs 12-40 GiB of free GPU memory (it skips, saying so, when less is free).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gpu_utils import (
    assert_close_scaled, chunked_performer_reference, gpu_backend_params, require_free_memory,
    skip_unless_runs, soft_split_spot_check, window_counts,
)
from t2t_kernels.ops import performer_attention, soft_split
from t2t_kernels.ops.performer_attention import reference as performer_reference

INT32_MAX = 2**31 - 1

# name -> (B, C, H, W, kernel, stride, padding, token view?)
SOFT_SPLIT_HUGE = {
    # one 2048x2048 image with 64 channels, 3x3 windows at stride 1: 4.19M tokens x 576 = 2.42e9 outputs
    "big-image": (1, 64, 2048, 2048, 3, 1, 1, False),
    # stage 1 of the model (56x56 grid of 64-wide tokens, 3x3 stride 2) on a batch of 4800: 2.17e9 outputs
    "big-batch-tokens": (4800, 64, 56, 56, 3, 2, 1, True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(SOFT_SPLIT_HUGE))
@pytest.mark.parametrize("backend,dtype", gpu_backend_params("soft_split", (torch.bfloat16, torch.float32)))
def test_soft_split_output_beyond_int32(case, backend, dtype):
    skip_unless_runs("soft_split", backend, dtype)
    B, C, H, W, k, s, p, tokens = SOFT_SPLIT_HUGE[case]
    h, w = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out_numel = B * h * w * C * k * k
    assert out_numel > INT32_MAX
    itemsize = torch.tensor([], dtype=dtype).element_size()
    require_free_memory(2.5 * out_numel * itemsize / 2**30 + 4)
    check_big_soft_split(B, C, H, W, k, s, p, tokens, backend, dtype, "cuda")


def check_big_soft_split(B, C, H, W, k, s, p, tokens, backend, dtype, device):
    kernel_size, stride, padding = (k, k), (s, s), (p, p)
    h, w = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    gen = torch.Generator(device=device).manual_seed(0)
    # small integers: every sum the backward makes is exact, so the checks are equalities
    if tokens:
        base = torch.randint(-8, 9, (B, H * W, C), device=device, generator=gen).to(dtype).requires_grad_()
        x = base.transpose(1, 2).view(B, C, H, W)
    else:
        base = torch.randint(-8, 9, (B, C, H, W), device=device, generator=gen).to(dtype).requires_grad_()
        x = base
    y = soft_split(x, kernel_size, stride, padding, backend=backend)
    assert y.shape == (B, h * w, C * k * k) and y.is_contiguous()

    mismatches = soft_split_spot_check(x.detach(), y.detach(), kernel_size, stride, padding, generator=gen)
    assert mismatches == 0, f"{mismatches} sampled outputs differ from the index arithmetic"
    # the whole tail, past element 2^31: the last image (or the last rows of windows of the one image) by F.unfold
    if B > 1:
        tail = F.unfold(x[-1:].detach().float(), kernel_size, padding=padding, stride=stride).transpose(1, 2)
        assert torch.equal(y[-1:].float(), tail)
    else:
        rows = min(16, h)  # the last rows of windows start at input row (h - rows) * s - p
        first = (h - rows) * s - p
        band = x[:, :, max(first, 0):, :].detach().float()
        band = F.pad(band, (p, p, max(-first, 0), max(0, (h - 1) * s - p + k - H)))
        tail = F.unfold(band, kernel_size, stride=stride).transpose(1, 2)
        assert torch.equal(y[:, -rows * w:].float(), tail)

    # backward of sum(y * y) / 2: grad x = x * (windows covering the pixel), exact for these values
    y.backward(y.detach())
    counts = window_counts(H, W, kernel_size, stride, padding, device, dtype)
    expected = x.detach() * counts
    got = base.grad.transpose(1, 2).view(B, C, H, W) if tokens else base.grad
    assert torch.equal(got, expected), f"{int((got != expected).sum())} gradient elements differ"


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("case", [(1, 5, 37, 29, 3, 1, 1, False), (7, 16, 14, 14, 3, 2, 1, True),
                                  (1, 3, 30, 22, 7, 4, 2, False), (1, 2, 9, 9, 2, 3, 0, False)],
                         ids=["image-k3s1", "tokens-k3s2", "image-k7s4", "image-k2s3"])
def test_big_soft_split_checks_on_small_cpu_tensors(case, backend):
    """The checks of the CUDA test above, on small CPU tensors: they pass for a correct op (runs here)."""
    if backend == "cpp":
        skip_unless_available_cpu("soft_split", "cpp")
    check_big_soft_split(*case, backend, torch.float32, "cpu")


def skip_unless_available_cpu(op, backend):
    from gpu_utils import OPS

    reason = OPS[op].unavailable_reason(backend, torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,dtype", gpu_backend_params("performer_attention", (torch.bfloat16,)))
def test_performer_batch_beyond_int32(backend, dtype):
    """B * T * E > 2^31 through the batch: T = 3136 (stage 1 at 224), E = 64, B = 10752; y and grads at the first,
    middle and last sequences against float64 autograd of the reference."""
    skip_unless_runs("performer_attention", backend, dtype)
    B, T, E, m = 10752, 3136, 64, 32
    assert B * T * E > INT32_MAX
    require_free_memory(9 * B * T * E * 2 / 2**30 + 4)
    check_big_performer_batch(B, T, E, m, backend, dtype, "cuda")


def check_big_performer_batch(B, T, E, m, backend, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = ((0.5 * torch.randn(B, T, E, device=device, generator=gen)).to(dtype).requires_grad_()
               for _ in range(3))
    w = (torch.nn.init.orthogonal_(torch.empty(m, E)) * math.sqrt(m)).to(device)
    y = performer_attention(q, k, v, w, backend=backend)
    grad_y = torch.randn(B, T, E, device=device, generator=gen).to(dtype)
    y.backward(grad_y)
    for b in sorted({0, 1, B // 2, B - 2, B - 1}):
        leaves = [t[b].detach().double().requires_grad_() for t in (q, k, v)]
        expected = performer_reference.performer_attention(*leaves, w.double(), 1e-8)
        expected.backward(grad_y[b].double())
        assert_close_scaled(y[b], expected.detach(), dtype, f"y[{b}]")
        for name, t, leaf in zip("qkv", (q, k, v), leaves):
            assert_close_scaled(t.grad[b], leaf.grad, dtype, f"grad {name}[{b}]")


@pytest.mark.cuda
@pytest.mark.parametrize("backend,dtype", gpu_backend_params("performer_attention", (torch.bfloat16,)))
def test_performer_sequence_beyond_int32(backend, dtype):
    """B * T * E > 2^31 through one sequence: T = 2^25 + 4097 tokens of width 64 (reductions over 33.6M tokens);
    y and grads at random rows and the last rows against a chunked float64 reference."""
    skip_unless_runs("performer_attention", backend, dtype)
    T, E, m = 2**25 + 4097, 64, 32
    assert T * E > INT32_MAX
    require_free_memory(9 * T * E * 2 / 2**30 + 8)
    check_long_performer_sequence(T, E, m, backend, dtype, "cuda")


def check_long_performer_sequence(T, E, m, backend, dtype, device, chunk=1 << 20):
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = ((0.5 * torch.randn(1, T, E, device=device, generator=gen)).to(dtype).requires_grad_()
               for _ in range(3))
    w = (torch.nn.init.orthogonal_(torch.empty(m, E)) * math.sqrt(m)).to(device)
    y = performer_attention(q, k, v, w, backend=backend)
    grad_y = torch.randn(1, T, E, device=device, generator=gen).to(dtype)
    y.backward(grad_y)
    rows = torch.cat([torch.randint(0, T, (4096,), device=device, generator=gen),
                      torch.arange(max(0, T - 256), T, device=device)])
    expected = chunked_performer_reference(q[0].detach(), k[0].detach(), v[0].detach(), w, grad_y[0], rows,
                                           chunk=chunk)
    for name, got, want in zip(("y", "gq", "gk", "gv"), (y[0], q.grad[0], k.grad[0], v.grad[0]), expected):
        assert_close_scaled(got[rows], want, dtype, name)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_big_performer_checks_on_small_cpu_tensors(backend):
    """The checks of the two CUDA Performer tests, on small CPU tensors (runs here)."""
    if backend == "cpp":
        skip_unless_available_cpu("performer_attention", "cpp")
    check_big_performer_batch(5, 33, 16, 8, backend, torch.bfloat16, "cpu")
    check_long_performer_sequence(3000, 16, 8, backend, torch.bfloat16, "cpu", chunk=700)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_reference_matches_autograd(dtype):
    """The chunked reference the long-sequence test trusts, against autograd of the eager reference (runs on CPU)."""
    T, E, m = 300, 16, 8
    q, k, v = (0.5 * torch.randn(T, E, dtype=dtype) for _ in range(3))
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * math.sqrt(m)
    grad_y = torch.randn(T, E, dtype=dtype)
    rows = torch.tensor([0, 7, 150, 298, 299])
    y, gq, gk, gv = chunked_performer_reference(q, k, v, w, grad_y, rows, chunk=64)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = performer_reference.performer_attention(*leaves, w.double(), 1e-8)
    expected.backward(grad_y.double())
    for got, want in zip((y, gq, gk, gv), (expected.detach(), *(t.grad for t in leaves))):
        torch.testing.assert_close(got, want[rows], rtol=1e-10, atol=1e-12)


def test_spot_check_and_counts_match_unfold():
    """The soft-split spot check finds a planted error and passes the true output; the window counts are what
    fold(unfold(ones)) says (runs on CPU)."""
    x = torch.randint(-8, 9, (2, 3, 9, 11)).float()
    y = F.unfold(x, (3, 3), padding=(1, 1), stride=(2, 2)).transpose(1, 2).contiguous()
    assert soft_split_spot_check(x, y, (3, 3), (2, 2), (1, 1), samples=4096) == 0
    y[1, -1, -1] += 1
    assert soft_split_spot_check(x, y, (3, 3), (2, 2), (1, 1), samples=16) >= 1
    xg = x.clone().requires_grad_()
    out = F.unfold(xg, 3, padding=1, stride=2)
    out.backward(out.detach())
    torch.testing.assert_close(xg.grad, x * window_counts(9, 11, (3, 3), (2, 2), (1, 1), "cpu", torch.float32))
