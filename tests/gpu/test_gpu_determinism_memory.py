"""CUDA backends of soft_split, soft_split_layer_norm and performer_attention: bitwise determinism run to run (forward and backward, model shapes and odd ones), no growth of
allocated GPU memory over repeated calls, and correct results when several host threads launch at once."""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from gpu_utils import assert_close_scaled, gpu_backend_params, skip_unless_runs
from t2t_kernels.ops import performer_attention, soft_split, soft_split_layer_norm
from t2t_kernels.ops.performer_attention import reference as performer_reference

pytestmark = pytest.mark.cuda

# (B, C, H, W, kernel, stride, padding, token view?): the model's three soft splits at 224, and odd ones
SOFT_SPLIT_SHAPES = [
    (16, 3, 224, 224, 7, 4, 2, False), (16, 64, 56, 56, 3, 2, 1, True), (16, 64, 28, 28, 3, 2, 1, True),
    (3, 5, 37, 23, 3, 1, 1, False), (2, 7, 19, 31, 5, 6, 3, True),
]
# (B, T, E, m): stage 1 and 2 at 224, and odd ones
PERFORMER_SHAPES = [(16, 3136, 64, 32), (16, 784, 64, 32), (3, 1001, 40, 7), (5, 1, 64, 32), (2, 127, 1, 1)]


def soft_split_input(shape, dtype, gen):
    """(leaf, (B, C, H, W) view of it): an image, or tokens (B, H*W, C) through the model's transpose view."""
    B, C, H, W, k, s, p, tokens = shape
    base = torch.randn((B, H * W, C) if tokens else (B, C, H, W), device="cuda", generator=gen).to(dtype)
    base.requires_grad_()
    return base, (base.transpose(1, 2).view(B, C, H, W) if tokens else base)


def norm_params(shape, gen):
    """fp32 LayerNorm weight and bias for the split's C*k*k features (fp32 parameters, as under autocast)."""
    B, C, H, W, k, s, p, tokens = shape
    weight = 1 + 0.1 * torch.randn(C * k * k, device="cuda", generator=gen)
    return weight, 0.1 * torch.randn(C * k * k, device="cuda", generator=gen)


def soft_split_run(shape, backend, dtype, seed=0):
    k, s, p = shape[4:7]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base, x = soft_split_input(shape, dtype, gen)
    y = soft_split(x, k, s, p, backend=backend)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype))
    return y.detach(), base.grad


def soft_split_layer_norm_run(shape, backend, dtype, seed=0):
    k, s, p = shape[4:7]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base, x = soft_split_input(shape, dtype, gen)
    weight, bias = (t.requires_grad_() for t in norm_params(shape, gen))
    y = soft_split_layer_norm(x, k, s, p, weight, bias, backend=backend)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype))
    return y.detach(), base.grad, weight.grad, bias.grad


def performer_run(shape, backend, dtype, seed=0):
    B, T, E, m = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (0.5 * torch.randn(B, T, 3 * E, device="cuda", generator=gen)).to(dtype).requires_grad_()
    w = torch.randn(m, E, device="cuda", generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * math.sqrt(m)
    y = performer_attention(*qkv.split(E, dim=-1), w, backend=backend)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype))
    return y.detach(), qkv.grad


RUNS = {"soft_split": (soft_split_run, SOFT_SPLIT_SHAPES),
        "soft_split_layer_norm": (soft_split_layer_norm_run, SOFT_SPLIT_SHAPES[:2] + SOFT_SPLIT_SHAPES[3:]),
        "performer_attention": (performer_run, PERFORMER_SHAPES)}


def params(op):
    return [pytest.param(op, b, d, id=f"{op}-{b}-{str(d).removeprefix('torch.')}")
            for b, d in ((p.values[0], p.values[1]) for p in gpu_backend_params(op))]


ALL_OPS = [param for op in RUNS for param in params(op)]


@pytest.mark.parametrize("op,backend,dtype", ALL_OPS)
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


@pytest.mark.parametrize("op,backend,dtype", ALL_OPS)
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
    if op in ("soft_split", "soft_split_layer_norm"):
        k, s, p = shape[4:7]
        base, _ = soft_split_input(shape, dtype, gen)
        base = base.detach().double().requires_grad_()
        B, C, H, W = shape[:4]
        x = base.transpose(1, 2).view(B, C, H, W) if shape[7] else base
        y = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
        if op == "soft_split":
            y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype).double())
            return y.detach(), base.grad
        weight, bias = (t.double().requires_grad_() for t in norm_params(shape, gen))
        y = F.layer_norm(y, y.shape[-1:], weight, bias)
        y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype).double())
        return y.detach(), base.grad, weight.grad, bias.grad
    B, T, E, m = shape
    qkv = (0.5 * torch.randn(B, T, 3 * E, device="cuda", generator=gen)).to(dtype).double().requires_grad_()
    w = torch.randn(m, E, device="cuda", generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * math.sqrt(m)
    y = performer_reference.performer_attention(*qkv.split(E, dim=-1), w.double(), 1e-8)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).to(dtype).double())
    return y.detach(), qkv.grad


@pytest.mark.parametrize("op,backend,dtype", ALL_OPS)
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
    for (shape, seed), (y, *grads) in zip(jobs, results):
        y_ref, *grads_ref = reference_of(op, shape, dtype, seed)
        if op == "soft_split":
            assert torch.equal(y.double(), y_ref), shape
        else:
            assert_close_scaled(y, y_ref, dtype, f"y {shape}")
        for n, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
            assert_close_scaled(grad, grad_ref, dtype, f"grad {n} {shape}")
