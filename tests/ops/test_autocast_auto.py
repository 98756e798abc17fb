"""Under autocast, "auto" gives what autocast gives the eager formula for the ops whose formula has products
(softmax_attention, post_attention, soft_split_layer_norm_linear: OpBackends.follows_autocast): a float32 input is
left to the formula (autocast casts its products), so the result's dtype and values do not depend on whether a
kernel is built; an input already in the low dtype keeps the kernel (softmax_attention's cpp takes CPU autocast's
bf16 qkv). The Performer keeps fp32 inside on purpose (tests/ops/test_performer_attention.py)."""
import pytest
import torch
import torch.nn.functional as F

from op_log import OpLog
from t2t_kernels.ops import (POST_ATTENTION_BACKENDS, SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS, SOFTMAX_ATTENTION_BACKENDS,
                             post_attention, soft_split_layer_norm, soft_split_layer_norm_linear, softmax_attention)


def kernels_run(fn):
    with OpLog() as log:
        out = fn()
    return out, [n for n in log.names if n.startswith("t2t_kernels::")]


def post_attention_args(D=16, E=24, H=40):
    shapes = [(E, D), (E,), (E,), (E,), (H, E), (H,), (E, H), (E,)]
    return (torch.randn(2, 5, D), torch.randn(2, 5, E), *(torch.randn(s) * 0.3 for s in shapes))


CASES = {
    "softmax_attention": (lambda b: softmax_attention(QKV, num_heads=2, backend=b)),
    "post_attention": (lambda b: post_attention(*POST_ARGS, backend=b)),
    "soft_split_layer_norm_linear": (lambda b: soft_split_layer_norm_linear(IMAGE, 7, 4, 2, *SPLIT_PARAMS, backend=b)),
}
BACKENDS = {"softmax_attention": SOFTMAX_ATTENTION_BACKENDS, "post_attention": POST_ATTENTION_BACKENDS,
            "soft_split_layer_norm_linear": SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS}
torch.manual_seed(0)
QKV = torch.randn(2, 9, 3 * 16)
POST_ARGS = post_attention_args()
IMAGE = torch.randn(2, 3, 16, 16)
SPLIT_PARAMS = (1 + 0.3 * torch.randn(147), 0.3 * torch.randn(147), torch.randn(64, 147) / 12, 0.3 * torch.randn(64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", list(CASES))
def test_float32_inputs_under_cpu_autocast_get_autocasts_result(op, dtype):
    with torch.autocast("cpu", dtype=dtype):
        want = CASES[op]("eager")
        got, kernels = kernels_run(lambda: CASES[op]("auto"))
    assert got.dtype == want.dtype
    if op == "soft_split_layer_norm_linear":  # the fused split + norm (fp32, its own roundings), then autocast's product
        assert kernels in ([], ["t2t_kernels::soft_split_layer_norm"]), kernels
        with torch.autocast("cpu", dtype=dtype):
            torch.testing.assert_close(got, F.linear(soft_split_layer_norm(IMAGE, 7, 4, 2, *SPLIT_PARAMS[:2]),
                                                     *SPLIT_PARAMS[2:]), rtol=0, atol=0)
    else:  # the eager formula itself
        assert kernels == [], kernels
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # outside autocast: the op's kernel where it is built
    _, kernels = kernels_run(lambda: CASES[op]("auto"))
    if BACKENDS[op].unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None:
        assert f"t2t_kernels::{op}" in kernels, kernels


def test_low_precision_qkv_under_autocast_keeps_the_kernel():
    """What the layers feed softmax_attention under CPU autocast (the qkv Linear's bf16 output) still runs the cpp
    kernel, within bf16 rounding of the eager formula."""
    if SOFTMAX_ATTENTION_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.bfloat16) is not None:
        pytest.skip("the softmax_attention kernel is not built here")
    qkv = QKV.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, kernels = kernels_run(lambda: softmax_attention(qkv, num_heads=2))
        want = softmax_attention(qkv, num_heads=2, backend="eager")
    assert kernels == ["t2t_kernels::softmax_attention"] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
