"""CUDA backends: bitwise determinism run to run (forward and backward, model shapes and odd ones), no growth of
allocated GPU memory over repeated calls, and correct results when several host threads launch at once."""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from gpu_utils import assert_close_scaled, gpu_backend_params, skip_unless_runs
from t2t_kernels.ops import performer_attention, soft_split
from t2t_kernels.ops.performer_attention import reference as performer_reference

pytestmark = pytest.mark.cuda

# (B, C, H, W, kernel, stride, padding, token view?): the model's three soft splits at 224, and odd ones
SOFT_SPLIT_SHAPES = [
    (16, 3, 224, 224, 7, 4, 2, False), (16, 64, 56, 56, 3, 2, 1, True), (16, 64, 28, 28, 3, 2, 1, True),
    (3, 5, 37, 23, 3, 1, 1, False), (2, 7, 19, 31, 5, 6, 3, True),
]
# (B, T, E, m): stage 1 and 2 at 224, and odd ones
PERFORMER_SHAPES = [(16, 3136, 64, 32), (16, 784, 64, 32), (3, 1001, 40, 7), (5, 1, 64, 32), (2, 127, 1, 1)]


def soft_split_run(shape, backend, dtype, seed=0):
    B, C, H, W, k, s, p, tokens = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if tokens:
        base = torch.randn(B, H * W, C, device="cuda", generator=gen).to(dtype).requires_grad_()
        x = base.transpose(1, 2).view(B, C, H, W)
    else:
        base = torch.randn(B, C, H, W, device="cuda", generator=gen).to(dtype).requires_grad_()
        x = base
    y = soft_split(x, k, s, p, backend=backend)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype))
    return y.detach(), base.grad


def performer_run(shape, backend, dtype, seed=0):
    B, T, E, m = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (0.5 * torch.randn(B, T, 3 * E, device="cuda", generator=gen)).to(dtype).requires_grad_()
    w = torch.randn(m, E, device="cuda", generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * math.sqrt(m)
    y = performer_attention(*qkv.split(E, dim=-1), w, backend=backend)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype))
    return y.detach(), qkv.grad


RUNS = {"soft_split": (soft_split_run, SOFT_SPLIT_SHAPES), "performer_attention": (performer_run, PERFORMER_SHAPES)}


def params(op):
    return [pytest.param(op, b, d, id=f"{op}-{b}-{str(d).removeprefix('torch.')}")
            for b, d in ((p.values[0], p.values[1]) for p in gpu_backend_params(op))]


@pytest.mark.parametrize("op,backend,dtype", params("soft_split") + params("performer_attention"))
def test_bitwise_deterministic_run_to_run(op, backend, dtype):
    """Three runs of forward + backward give the same bits, with other kernels (and another shape) run in between,
    so no result depends on leftover memory, launch order or atomics."""
    skip_unless_runs(op, backend, dtype)
    run, shapes = RUNS[op]
    for shape in shapes:
        first = run(shape, backend, dtype)
        run(shapes[-1], backend, dtype, seed=7)  # something else in between
        torch.randn(1 << 24, device="cuda").sin_()  # and dirty memory
        for _ in range(2):
            again = run(shape, backend, dtype)
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"{op} {backend} {dtype} {shape}: results differ run to run"


@pytest.mark.parametrize("op,backend,dtype", params("soft_split") + params("performer_attention"))
def test_repeated_calls_do_not_grow_gpu_memory(op, backend, dtype):
    skip_unless_runs(op, backend, dtype)
    run, shapes = RUNS[op]
    shape = shapes[1]
    for _ in range(3):
        run(shape, backend, dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(50):
        run(shape, backend, dtype)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before, "allocated GPU memory grew over 50 calls"


def reference_of(op, shape, dtype, seed):
    """float64 output and input grad of the same inputs as soft_split_run/performer_run (same generator draws)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if op == "soft_split":
        B, C, H, W, k, s, p, tokens = shape
        base = torch.randn((B, H * W, C) if tokens else (B, C, H, W), device="cuda", generator=gen).to(dtype)
        base = base.double().requires_grad_()
        x = base.transpose(1, 2).view(B, C, H, W) if tokens else base
        y = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
        y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype).double())
        return y.detach(), base.grad
    B, T, E, m = shape
    qkv = (0.5 * torch.randn(B, T, 3 * E, device="cuda", generator=gen)).to(dtype).double().requires_grad_()
    w = torch.randn(m, E, device="cuda", generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * math.sqrt(m)
    y = performer_reference.performer_attention(*qkv.split(E, dim=-1), w.double(), 1e-8)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype).double())
    return y.detach(), qkv.grad


@pytest.mark.parametrize("op,backend,dtype", params("soft_split") + params("performer_attention"))
def test_launches_from_several_threads(op, backend, dtype):
    """Eight host threads launch forward + backward at once (Triton's launcher and the CUDA kernels from threads);
    each result matches the float64 reference."""
    skip_unless_runs(op, backend, dtype)
    run, shapes = RUNS[op]
    jobs = [(shapes[i % len(shapes)], seed) for i, seed in enumerate(range(16)) if i % len(shapes) not in (0,)]

    def work(job):
        shape, seed = job
        out = run(shape, backend, dtype, seed)
        torch.cuda.synchronize()
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, jobs))
    for (shape, seed), (y, grad) in zip(jobs, results):
        y_ref, grad_ref = reference_of(op, shape, dtype, seed)
        if op == "soft_split":
            assert torch.equal(y.double(), y_ref), shape
            assert_close_scaled(grad, grad_ref, dtype, f"grad {shape}")
        else:
            assert_close_scaled(y, y_ref, dtype, f"y {shape}")
            assert_close_scaled(grad, grad_ref, dtype, f"grad {shape}")
