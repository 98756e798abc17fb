"""Model level (issue 5 item 8, issue 6 item 2): the T2T module alone and the whole model, forward (eval, no grad)
and AdamW train step (bf16 autocast on GPU, fp32 on CPU), for T2T-ViT-7/14/24 on GPU (T2T-ViT-14 on CPU; set
T2T_BENCH_MODELS), with timm's vit_small_patch16_224 on GPU as the plain-ViT reference.

Providers: eager (the official formulation: backend="eager" with the official Performer formula), fused (backend="auto"), compile-eager, compile-fused, and in train steps
eager+ckpt / fused+ckpt (set_grad_checkpointing(True)): their extra_info["activation_bytes"] (memory the forward
leaves for backward) against eager's is the gradient-checkpointing memory benchmark. extra_info also has
images_per_s, peak_bytes (the step's peak above what was allocated before it) and state_bytes (weights, grads,
optimizer state). The cases are t2t_kernels/bench/cases.py's ModelCase, shared with `python -m t2t_kernels bench`.
"""
import pytest

from t2t_kernels.bench.cases import model_cases

from conftest import ON_GPU, SETTINGS, case_params, run_case_benchmark

ROUNDS = None if ON_GPU else 3  # a CPU train step of T2T-ViT-14 at B=8 takes about a second


@pytest.mark.parametrize("case,provider", case_params(model_cases(SETTINGS, parts=("t2t_module",))))
def test_t2t_module(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider, rounds=ROUNDS)


@pytest.mark.parametrize("case,provider", case_params(model_cases(SETTINGS, parts=("model",))))
def test_model(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider, rounds=ROUNDS)
