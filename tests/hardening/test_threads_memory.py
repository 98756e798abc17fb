"""Memory and state: repeated calls of every op/backend do not grow memory or leave reference cycles; the ops give
correct (and bitwise repeatable) results when called from several Python threads at once and when their C++
kernels split work across intra-op threads.

Memory is read from /proc/self/statm (resident pages) after a warm-up; a leak of one output per call would be
tens of MB over the loop, far above the bound. The CUDA side (torch.cuda.memory_allocated) is in tests/gpu.
"""
import gc
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening_utils import (
    PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS, PerformerCase, SoftSplitCase, check_performer, check_soft_split,
    count_case, runnable_dtypes,
)
from t2t_kernels.ops import performer_attention, soft_split
from t2t_kernels.ops.performer_attention import reference as performer_reference

CPU_BACKENDS = ("eager", "cpp", "triton")  # triton: through the interpreter here


def soft_split_step(backend, B=4, C=16, H=28, W=28):
    """One forward + backward of the stage-1 soft split on a token view; returns the output and the input grad."""
    tokens = torch.randn(B, H * W, C, requires_grad=True)
    y = soft_split(tokens.transpose(1, 2).view(B, C, H, W), 3, 2, 1, backend=backend)
    y.backward(torch.randn_like(y))
    return y, tokens.grad


def performer_step(backend, B=4, T=196, E=64, m=32):
    qkv = (0.5 * torch.randn(B, T, 3 * E)).requires_grad_()
    q, k, v = qkv.split(E, dim=-1)
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * m**0.5
    y = performer_attention(q, k, v, w, backend=backend)
    y.backward(torch.randn_like(y))
    return y, qkv.grad


STEPS = {"soft_split": soft_split_step, "performer_attention": performer_step}
OPS = {"soft_split": SOFT_SPLIT_BACKENDS, "performer_attention": PERFORMER_BACKENDS}


def op_backend_params():
    return [pytest.param(op, b, id=f"{op}-{b}") for op in STEPS for b in CPU_BACKENDS]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("op,backend", op_backend_params())
def test_repeated_calls_do_not_grow_memory(op, backend, single_intraop_thread):
    runnable_dtypes(OPS[op], backend, "cpu")
    step = STEPS[op]
    # interpreted triton: fewer, smaller calls (each still ~0.3 MB of outputs and grads)
    kwargs = ({"B": 2} if op == "soft_split" else {"B": 2, "T": 128}) if backend == "triton" else {}
    warmup, calls = (3, 40) if backend == "triton" else (20, 100)
    for _ in range(warmup):
        step(backend, **kwargs)
    gc.collect()
    before = resident_bytes()
    for _ in range(calls):
        step(backend, **kwargs)
    gc.collect()
    growth = resident_bytes() - before
    y, grad = step(backend, **kwargs)
    leaked_if_kept = calls * (y.numel() * y.element_size() + grad.numel() * grad.element_size())
    # keeping each call's output and grad alive would add leaked_if_kept; allow the allocator up to 8 MB of slack,
    # and at most half of that leak, so a leak cannot hide below the bound
    bound = min(8 * 2**20, leaked_if_kept // 2)
    assert bound >= 4 * 2**20, "the loop is too small to tell a leak from noise"
    assert growth < bound, f"resident memory grew by {growth / 2**20:.1f} MB over {calls} calls"


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_no_reference_cycles(op, backend):
    """With the garbage collector off, dropping the output and the input frees both, and with them the graph (the
    autograd context and its saved tensors): nothing waits for a gc pass, with or without a backward."""
    runnable_dtypes(OPS[op], backend, "cpu")
    gc.collect()
    gc.disable()
    try:
        for do_backward in (False, True):
            if op == "soft_split":
                x = torch.randn(2, 3, 9, 9, requires_grad=True)
                y = soft_split(x, 3, 2, 1, backend=backend)
            else:
                x = torch.randn(3, 2, 7, 16, requires_grad=True)
                y = performer_attention(*x.unbind(0), torch.randn(8, 16), backend=backend)
            if do_backward:
                y.sum().backward()
            refs = weakref.ref(x), weakref.ref(y)
            del x, y
            assert [r() is None for r in refs] == [True, True], (
                f"input/output still alive after their last reference (backward={do_backward}): a reference cycle")
    finally:
        gc.enable()


# --- several Python threads at once --------------------------------------------------------------------------

THREAD_CASES = {
    "soft_split": [
        SoftSplitCase(B=2, C=3, H=17, W=13, kernel_size=7, stride=4, padding=2, layout=layout, dtype="float32",
                      seed=seed) for seed, layout in enumerate(["contiguous", "channels_last", "tokens", "sliced"] * 3)
    ] + [SoftSplitCase(B=3, C=8, H=14, W=14, kernel_size=3, stride=2, padding=1, layout="token_slice",
                       dtype=dtype, seed=100 + i) for i, dtype in enumerate(["float32", "bfloat16", "float64"] * 2)],
    "performer_attention": [
        PerformerCase(lead=lead, T=T, E=E, m=m, scale=0.5, layout=layout, w_layout="contiguous", w_dtype="float32",
                      eps=1e-8, dtype=dtype, seed=seed)
        for seed, (lead, T, E, m, layout, dtype) in enumerate([
            ((2,), 63, 64, 32, "kqv_split", "float32"), ((2, 2), 17, 24, 8, "contiguous", "float32"),
            ((3,), 100, 16, 16, "transposed", "bfloat16"), ((1,), 5, 64, 32, "aliased", "float64"),
            ((2,), 49, 32, 8, "token_strided", "float32"), ((), 33, 64, 32, "expanded", "bfloat16"),
        ] * 3)
    ],
}


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_concurrent_calls_from_python_threads(op, backend):
    """18 cases (different shapes, layouts, dtypes) on 4 Python threads at once, forward and backward, each checked
    against the float64 reference; then the same outputs again to the bit on one thread."""
    dtypes = {str(d).removeprefix("torch.") for d in runnable_dtypes(OPS[op], backend, "cpu")}
    cases = [c for c in THREAD_CASES[op] if c.dtype in dtypes]
    if backend == "triton":
        pytest.skip("the Triton interpreter (CPU) is not thread-safe: it patches triton.language globally while a "
                    "kernel runs; on CUDA, Triton launches from several threads are covered in tests/gpu")
    check = check_soft_split if op == "soft_split" else check_performer

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda case: check(case, backend), cases))  # re-raises the first failure

    def outputs(case):
        torch.manual_seed(case.seed)
        return run_case(op, case, backend)

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(outputs, cases))
    for case, got in zip(cases, concurrent):
        alone = outputs(case)
        assert all(torch.equal(a, b) for a, b in zip(got, alone)), case


def run_case(op, case, backend):
    """Output and input grad of one case (no reference): for bitwise comparisons."""
    gen = torch.Generator().manual_seed(case.seed)
    if op == "soft_split":
        x = torch.randn(case.B, case.C, case.H, case.W, generator=gen).to(getattr(torch, case.dtype))
        x.requires_grad_()
        y = soft_split(x, case.kernel_size, case.stride, case.padding, backend=backend)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad
    dtype = getattr(torch, case.dtype)
    qkv = (0.5 * torch.randn(3, *case.lead, case.T, case.E, generator=gen)).to(dtype).requires_grad_()
    w = torch.randn(case.m, case.E, generator=gen)
    y = performer_attention(*qkv.unbind(0), w, backend=backend)
    y.backward(torch.ones_like(y))
    return y.detach(), qkv.grad


# --- the C++ kernels' intra-op threads ------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["soft_split", "performer_attention"])
def test_intraop_parallel_paths(op, intraop_threads, request):
    """Shapes large enough that parallel_for splits them across threads (token grids of 14-56, several 128-token
    chunks of T), fuzzed
    on the cpp backend with several intra-op threads, checked against float64 (the fuzz files run on one thread)."""
    runnable_dtypes(OPS[op], "cpp", "cpu")

    if op == "soft_split":
        strategy = st.builds(
            SoftSplitCase, B=st.integers(1, 3), C=st.sampled_from([3, 16, 64]), H=st.integers(14, 56),
            W=st.integers(14, 56), kernel_size=st.sampled_from([3, 7, (3, 5)]), stride=st.sampled_from([1, 2, 4]),
            padding=st.sampled_from([0, 1, 2]), layout=st.sampled_from(["contiguous", "channels_last", "tokens"]),
            dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**31 - 1))
        check = check_soft_split
    else:
        strategy = st.builds(
            PerformerCase, lead=st.sampled_from([(1,), (2,), (3,)]), T=st.sampled_from([129, 257, 785]),
            E=st.sampled_from([16, 64]), m=st.sampled_from([8, 32]), scale=st.just(0.5),
            layout=st.sampled_from(["kqv_split", "contiguous"]), w_layout=st.just("contiguous"),
            w_dtype=st.just("float32"), eps=st.just(1e-8), dtype=st.sampled_from(["float32", "bfloat16"]),
            seed=st.integers(0, 2**31 - 1))
        check = check_performer

    @settings(max_examples=max(4, settings.default.max_examples // 8))
    @given(case=strategy)
    def run(case):
        count_case(request.node.nodeid, case, "cpp", "cpu")
        check(case, "cpp")

    run()


@pytest.mark.parametrize("op", ["soft_split", "performer_attention"])
def test_intraop_thread_count_does_not_change_results(op):
    """Bitwise the same output and grads with 1 and several intra-op threads (fixed-order reductions)."""
    runnable_dtypes(OPS[op], "cpp", "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 4):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            results.append(STEPS[op]("cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_reference_is_what_the_thread_tests_compare_to():
    """The float64 references the thread tests use agree with the plain formula (guards the harness itself)."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(soft_split(x, 3, 1, 1, backend="eager"), F.unfold(x, 3, padding=1).transpose(1, 2))
    q, k, v = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(performer_attention(q, k, v, w, backend="eager"),
                               performer_reference.performer_attention(q, k, v, w))
