"""post_attention: forward at the T2T-ViT-14 token layers' shapes (T=3136, 784; width 64) and at its blocks' (T=197,
width 384, hidden 1152: the kernel's wide path); the model runs the fused op for inference only, so there is no
backward case.

Providers: "eager" is the layers' own chain (F.linear, F.layer_norm, F.gelu), "compile" is torch.compile of it, the
others are our backends. The cases are t2t_kernels/bench/cases.py's PostAttentionCase (the same ones
`python -m t2t_kernels bench` times).
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, op_cases

from conftest import SETTINGS, case_params, run_case_benchmark


@pytest.mark.parametrize("case,provider", case_params(op_cases(SETTINGS, ops=("post_attention",), passes=(FORWARD,))))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
