"""softmax_attention: forward at a T2T-ViT-14 block's shape (T=197 tokens, 6 heads of 64); the model runs the fused op
for inference only, so there is no backward case.

Providers: "eager" is what the layers run without the op (F.scaled_dot_product_attention on the heads' views),
"compile" is torch.compile of it, the others are our backends. The cases are t2t_kernels/bench/cases.py's
SoftmaxAttentionCase (the same ones `python -m t2t_kernels bench` times).
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, op_cases

from conftest import SETTINGS, case_params, run_case_benchmark


@pytest.mark.parametrize("case,provider",
                         case_params(op_cases(SETTINGS, ops=("softmax_attention",), passes=(FORWARD,))))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
