"""performer_attention: forward and forward+backward at the T2T-ViT-14 stage shapes (T=3136, 784; E=64, m=32).

Providers: "eager" is the official formula (reference.performer_attention_official) with autograd, "compile" is
torch.compile of it, the others are our backends. extra_info carries the HBM byte floor and the peak memory.
"""
import pytest
import torch

from t2t_kernels.ops import performer_attention
from t2t_kernels.ops.performer_attention import BACKENDS, reference

from conftest import BATCH, DEVICE, ON_GPU, backend_params, run_timed, synchronize

E, M, EPS = 64, 32, 1e-8
SEQ_LENS = (3136, 784)
DTYPES = (torch.bfloat16, torch.float32) if ON_GPU else (torch.float32,)
_compiled_official = torch.compile(reference.performer_attention_official)


def provider_fn(provider):
    if provider == "eager":
        return reference.performer_attention_official
    if provider == "compile":
        return _compiled_official
    return lambda q, k, v, w, eps: performer_attention(q, k, v, w, eps=eps, backend=provider)


def byte_floor(T, dtype, backward):
    """HBM traffic no implementation can avoid: read q, k, v and write y; backward adds read g, write gq, gk, gv."""
    tensor_bytes = BATCH * T * E * dtype.itemsize
    return tensor_bytes * (8 if backward else 4)


def params():
    return [
        pytest.param(provider, dtype, T, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}-T{T}")
        for dtype in DTYPES
        for T in SEQ_LENS
        for p in backend_params(BACKENDS, dtype)
        for provider in p.values
    ]


def qkv(T, dtype, requires_grad):
    """q, k, v as thirds of one kqv output, as the model produces them."""
    x = (0.5 * torch.randn(BATCH, T, 3 * E, device=DEVICE)).to(dtype).requires_grad_(requires_grad)
    w = torch.nn.init.orthogonal_(torch.empty(M, E)).mul_(M**0.5).to(DEVICE)
    return x, w


def record(benchmark, T, dtype, backward):
    benchmark.extra_info["byte_floor"] = byte_floor(T, dtype, backward)
    benchmark.extra_info["peak_memory"] = torch.cuda.max_memory_allocated(DEVICE) if ON_GPU else None
    benchmark.extra_info["dtype"] = str(dtype)


def reset_peak():
    synchronize()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(DEVICE)


@pytest.mark.parametrize("provider,dtype,T", params())
def test_forward(benchmark, provider, dtype, T):
    benchmark.group = f"performer_attention forward T={T} {str(dtype).removeprefix('torch.')}"
    x, w = qkv(T, dtype, requires_grad=False)
    fn = provider_fn(provider)

    def forward():
        with torch.no_grad():
            return fn(*x.split(E, dim=-1), w, EPS)

    reset_peak()
    run_timed(benchmark, forward)
    record(benchmark, T, dtype, backward=False)


@pytest.mark.parametrize("provider,dtype,T", params())
def test_forward_backward(benchmark, provider, dtype, T):
    benchmark.group = f"performer_attention forward+backward T={T} {str(dtype).removeprefix('torch.')}"
    x, w = qkv(T, dtype, requires_grad=True)
    fn = provider_fn(provider)
    grad_y = torch.randn(BATCH, T, E, device=DEVICE, dtype=dtype)

    def forward_backward():
        x.grad = None
        y = fn(*x.split(E, dim=-1), w, EPS)
        y.backward(grad_y.to(y.dtype))

    reset_peak()
    run_timed(benchmark, forward_backward)
    record(benchmark, T, dtype, backward=True)
