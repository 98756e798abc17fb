"""soft_split: forward and forward+backward at the three soft splits of T2T-ViT-14 at 224; soft_split+layer_norm:
the first two with the LayerNorm after each (eager: F.unfold then F.layer_norm; ours: the fused op).

stage0: the image (B, 3, 224, 224), k7 s4 p2; stage1/stage2: tokens (B, 3136, 64) and (B, 784, 64) seen as images
(B, 64, 56, 56) and (B, 64, 28, 28) through the official transpose + reshape (a free view), k3 s2 p1.
Providers: "eager" is the official expression (reshape, F.unfold, transpose, .contiguous() as the LayerNorm after it
needs), "compile" is torch.compile of that same expression, the others are our backends on the same view. The cases
are t2t_kernels/bench/cases.py's SoftSplitCase (the same ones `python -m t2t_kernels bench` times). Timing ends in a
device sync (conftest.run_timed). extra_info carries the byte floor (read x once, write the output once; backward
adds read grad_out, write grad_x) and its fraction of the copy bandwidth; at the end of the session a table of
speedups over eager and compile, all measured in this run, goes to the terminal (conftest.pytest_terminal_summary).

CPU target (B=8, fp32): cpp soft split >= 3x eager forward and forward+backward.
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, FORWARD_BACKWARD

from conftest import case_params, op_cases_per_dtype, run_case_benchmark

OPS = ("soft_split", "soft_split+layer_norm")


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD)))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD_BACKWARD)))
def test_forward_backward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
