"""dropout_add: forward and forward+backward of a Performer layer's residual dropout (p = 0.1) at the T2T-ViT-14
stage shapes (T=3136, 784; E=64), as the layers run it in CPU training.

Providers: "eager" is the official skip + F.dropout(x) (torch's Bernoulli mask), "compile" is torch.compile of it,
the others are our backends (which draw a seed from torch's generator per call, as the layers do). The cases are
t2t_kernels/bench/cases.py's DropoutAddCase (the same ones `python -m t2t_kernels bench` times).
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, FORWARD_BACKWARD

from conftest import case_params, op_cases_per_dtype, run_case_benchmark

OPS = ("dropout_add",)


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD)))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD_BACKWARD)))
def test_forward_backward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
