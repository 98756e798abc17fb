"""The fused ops, forward and forward+backward, against their eager formula and torch.compile of it at T2T-ViT-14's
shapes. The cases are t2t_kernels/bench/cases.py's (the same ones `python -m t2t_kernels bench` times; each case
class says what its eager baseline is):

- soft_split at the model's three splits: the image (B, 3, 224, 224), k7 s4 p2, then the tokens (B, 3136, 64) and
  (B, 784, 64) seen as images through the official transpose + reshape (a free view), k3 s2 p1; soft_split+layer_norm
  at the first two with the LayerNorm after each (eager: F.unfold then F.layer_norm; ours: the fused op), and
  soft_split+layer_norm+linear there up to the next layer's kqv product (forward: the model's inference path);
- performer_attention at the two Performer layers (T=3136, 784; E=64, m=32), and dropout_add at their residual
  dropout (p = 0.1, CPU training);
- post_attention at the T2T layers' width (64) and a block's (384, hidden 1152: the kernel's wide path), forward
  only (the model runs it for inference);
- softmax_attention at a block's attention after its qkv projection (T=197, 6 heads of 64).

Providers: "eager", "compile", and our backends ("cpp", "cuda", "triton"), a missing one skipped with the reason.
Timing ends in a device sync (conftest.run_timed). extra_info carries the byte floor (inputs read once, outputs
written once) and its fraction of the copy bandwidth measured in the same session, and the memory; at the end of the
session a table of speedups over eager and compile, all measured in this run, goes to the terminal
(conftest.pytest_terminal_summary).

CPU target (B=8, fp32): cpp soft split >= 3x eager forward and forward+backward.
"""
import pytest

from t2t_kernels.bench.cases import FORWARD, FORWARD_BACKWARD, op_cases

from conftest import SETTINGS, case_params, op_cases_per_dtype, run_case_benchmark

# the ops with GPU kernels, in each of conftest.OP_DTYPES (T2T_BENCH_DTYPE's alone when set); the CPU-kernel ops in
# the run's dtype only
PER_DTYPE = ("soft_split", "soft_split+layer_norm", "performer_attention", "dropout_add")
RUN_DTYPE = ("soft_split+layer_norm+linear", "post_attention", "softmax_attention")


def cases(pass_):
    return op_cases_per_dtype(PER_DTYPE, pass_) + op_cases(SETTINGS, ops=RUN_DTYPE, passes=(pass_,))


@pytest.mark.parametrize("case,provider", case_params(cases(FORWARD)))
def test_forward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)


@pytest.mark.parametrize("case,provider", case_params(cases(FORWARD_BACKWARD)))
def test_forward_backward(benchmark, case, provider):
    run_case_benchmark(benchmark, case, provider)
