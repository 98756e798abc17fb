"""performer_attention: forward and forward+backward at the T2T-ViT-14 stage shapes (T=3136, 784; E=64, m=32).

Providers: "eager" is the official formula (reference.performer_attention_official) with autograd, "compile" is
torch.compile of it, the others are our backends. The cases are t2t_kernels/bench/cases.py's PerformerCase (the
same ones `python -m t2t_kernels bench` times); extra_info carries the byte floor, its fraction of the copy
bandwidth measured in the same session, and the memory.
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, FORWARD_BACKWARD

from conftest import case_params, op_cases_per_dtype, run_case_benchmark

OPS = ("performer_attention",)


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD)))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)


@pytest.mark.parametrize("case,provider", case_params(op_cases_per_dtype(OPS, FORWARD_BACKWARD)))
def test_forward_backward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
