"""soft_split: forward and forward+backward at the three soft splits of T2T-ViT-14 at 224.

stage0: the image (B, 3, 224, 224), k7 s4 p2; stage1/stage2: tokens (B, 3136, 64) and (B, 784, 64) seen as images
(B, 64, 56, 56) and (B, 64, 28, 28) through the official transpose + reshape (a free view), k3 s2 p1.
Providers: "eager" is the official expression (reshape, F.unfold, transpose, .contiguous() as the LayerNorm after it
needs), "compile" is torch.compile of that same expression, the others are our backends on the same view. Timing
ends in a device sync (conftest.run_timed). extra_info carries the byte floor (read x once, write the output once;
backward adds read grad_out, write grad_x); at the end of the module a table of speedups over eager and compile,
all measured in this run, goes to the terminal.

CPU target (B=8, fp32): cpp >= 3x eager forward and forward+backward.
"""
import pytest
import torch
import torch.nn.functional as F

from t2t_kernels.ops import soft_split
from t2t_kernels.ops.soft_split import BACKENDS

from conftest import BATCH, DEVICE, ON_GPU, backend_params, run_timed

# stage -> (C, H, W) of the image the op sees, whether it is the token view, kernel, stride, padding
STAGES = {
    "stage0": ((3, 224, 224), False, 7, 4, 2),
    "stage1": ((64, 56, 56), True, 3, 2, 1),
    "stage2": ((64, 28, 28), True, 3, 2, 1),
}
DTYPES = (torch.bfloat16, torch.float32) if ON_GPU else (torch.float32,)
PASSES = ("forward", "forward+backward")
_medians = {}  # (stage, dtype, pass) -> {provider: median seconds}


def as_image(inp, stage):
    """The official T2T module's input to its soft split: the image, or tokens (B, N, C) -> (B, C, h, w)."""
    (C, H, W), tokens, *_ = STAGES[stage]
    if not tokens:
        return inp
    B = inp.shape[0]
    return inp.transpose(1, 2).reshape(B, C, H, W)


def official(inp, stage):
    _, _, k, s, p = STAGES[stage]
    return F.unfold(as_image(inp, stage), k, padding=p, stride=s).transpose(1, 2).contiguous()


_compiled_official = torch.compile(official)


def provider_fn(provider):
    if provider == "eager":
        return official
    if provider == "compile":
        return _compiled_official

    def ours(inp, stage):
        _, _, k, s, p = STAGES[stage]
        return soft_split(as_image(inp, stage), k, s, p, backend=provider)

    return ours


def make_input(stage, dtype, requires_grad):
    (C, H, W), tokens, *_ = STAGES[stage]
    shape = (BATCH, H * W, C) if tokens else (BATCH, C, H, W)
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def output_shape(stage):
    (C, H, W), _, k, s, p = STAGES[stage]
    oh, ow = ((n + 2 * p - k) // s + 1 for n in (H, W))
    return BATCH, oh * ow, C * k * k


def byte_floor(stage, dtype, backward):
    (C, H, W), *_ = STAGES[stage]
    B, L, Fk = output_shape(stage)
    one_way = (BATCH * C * H * W + B * L * Fk) * dtype.itemsize
    return one_way * (2 if backward else 1)


def params():
    return [
        pytest.param(provider, dtype, stage, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}-{stage}")
        for dtype in DTYPES
        for stage in STAGES
        for p in backend_params(BACKENDS, dtype)
        for provider in p.values
    ]


def record(benchmark, provider, stage, dtype, pass_):
    benchmark.extra_info.update(byte_floor=byte_floor(stage, dtype, pass_ != "forward"), dtype=str(dtype),
                                stage=stage, provider=provider)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info["bytes_per_s"] = benchmark.extra_info["byte_floor"] / median
        _medians.setdefault((stage, str(dtype).removeprefix("torch."), pass_), {})[provider] = median


@pytest.fixture(scope="module", autouse=True)
def speedup_table(request):
    """After the module: each backend's speedup over eager and over compile, from the medians of this run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _medians:
        return
    reporter.write_line("")
    reporter.write_line(f"soft_split speedups (median times, this run; {DEVICE}, B={BATCH}, "
                        f"{torch.get_num_threads()} CPU threads)")
    for (stage, dtype, pass_), times in sorted(_medians.items()):
        cells = []
        for provider, t in times.items():
            if provider in ("eager", "compile"):
                continue
            ratios = [f"{times[ref] / t:.2f}x {ref}" for ref in ("eager", "compile") if ref in times]
            cells.append(f"{provider} {t * 1e3:.3f} ms ({', '.join(ratios)})")
        base = ", ".join(f"{ref} {times[ref] * 1e3:.3f} ms" for ref in ("eager", "compile") if ref in times)
        reporter.write_line(f"  {stage} {dtype} {pass_}: {base}; " + "; ".join(cells))


@pytest.mark.parametrize("provider,dtype,stage", params())
def test_forward(benchmark, provider, dtype, stage):
    benchmark.group = f"soft_split forward {stage} {str(dtype).removeprefix('torch.')}"
    inp = make_input(stage, dtype, requires_grad=False)
    fn = provider_fn(provider)

    def forward():
        with torch.no_grad():
            return fn(inp, stage)

    run_timed(benchmark, forward)
    record(benchmark, provider, stage, dtype, "forward")


@pytest.mark.parametrize("provider,dtype,stage", params())
def test_forward_backward(benchmark, provider, dtype, stage):
    benchmark.group = f"soft_split forward+backward {stage} {str(dtype).removeprefix('torch.')}"
    inp = make_input(stage, dtype, requires_grad=True)
    grad_out = torch.randn(output_shape(stage), device=DEVICE, dtype=dtype)
    fn = provider_fn(provider)

    def forward_backward():
        inp.grad = None
        fn(inp, stage).backward(grad_out)

    run_timed(benchmark, forward_backward)
    record(benchmark, provider, stage, dtype, "forward+backward")
