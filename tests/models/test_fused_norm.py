"""The T2T module runs each soft split and the next layer's norm1 as one op (issue 5, item 7), keeps the official
keys, and falls back to split-then-norm when norm1 is not a LayerNorm."""
import pytest
import torch

import t2t_kernels
from op_log import OpLog
from t2t_kernels.layers import T2T_module
from t2t_kernels.ops import SOFT_SPLIT_LAYER_NORM_BACKENDS


def _run_logged(module, x):
    with OpLog() as log:
        module(x).sum().backward()
    return log.names


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_fused_op_replaces_split_and_norm1(tokens_type):
    if SOFT_SPLIT_LAYER_NORM_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32):
        pytest.skip("the compiled soft_split_layer_norm is not available")
    module = T2T_module(img_size=(32, 32), tokens_type=tokens_type, embed_dim=32, backend="cpp")
    names = _run_logged(module, torch.randn(2, 3, 32, 32))
    # stages 0 and 1, each run again in backward: the kqv Linear keeps the split's image, not the normalised tokens
    # (layers/recompute.py)
    assert names.count("t2t_kernels::soft_split_layer_norm") == 2 * 2
    # stage 1 only: the image into stage 0 needs no gradient, so that layer's backward takes its norm1 and kqv
    # gradients from the recomputed normalised tokens (recompute.py, _grads_of_affine_input)
    assert names.count("t2t_kernels::soft_split_layer_norm_backward") == 1
    assert names.count("t2t_kernels::soft_split") == 1  # the last split feeds the projection, no norm
    # left for torch: the two layers' norm2 only (also recomputed in backward)
    assert sum(n.startswith("aten::native_layer_norm") and "backward" not in n for n in names) == 2 * 2


def test_state_dict_keys_are_the_official_ones():
    module = T2T_module(img_size=(32, 32), embed_dim=32)
    keys = set(module.state_dict())
    assert {"attention1.norm1.weight", "attention1.norm1.bias", "attention2.norm1.weight"} <= keys
    assert not any("soft_split" in k for k in keys)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_other_norm1_is_applied_after_the_split(backend):
    """A norm1 that is not a LayerNorm (here RMSNorm) cannot be fused: the split runs alone and norm1 after it."""
    torch.manual_seed(0)
    module = T2T_module(img_size=(32, 32), embed_dim=32, backend=backend).eval()  # eval: no dropout
    for layer in (module.attention1, module.attention2):
        layer.norm1 = torch.nn.RMSNorm(layer.norm1.normalized_shape)
        torch.nn.init.normal_(layer.norm1.weight)
    x = torch.randn(2, 3, 32, 32)
    H = W = 32
    # the layers given tokens apply their norm1 themselves
    expected = module.attention1(torch.nn.functional.unfold(x, 7, padding=2, stride=4).transpose(1, 2))
    image = expected.transpose(1, 2).reshape(2, -1, H // 4, W // 4)
    expected = module.attention2(torch.nn.functional.unfold(image, 3, padding=1, stride=2).transpose(1, 2))
    image = expected.transpose(1, 2).reshape(2, -1, H // 8, W // 8)
    expected = module.project(torch.nn.functional.unfold(image, 3, padding=1, stride=2).transpose(1, 2))
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


def test_checkpointing_recomputes_the_first_stage_too():
    """The image needs no gradient, yet the first stage (split + attention1) is checkpointed: its forward runs
    again in backward."""
    if SOFT_SPLIT_LAYER_NORM_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32):
        pytest.skip("the compiled soft_split_layer_norm is not available")
    model = t2t_kernels.t2t_vit_7(img_size=32, backend="cpp")
    model.set_grad_checkpointing(True)
    names = _run_logged(model, torch.randn(2, 3, 32, 32))
    assert names.count("t2t_kernels::soft_split_layer_norm") == 4  # stages 0 and 1, each run twice
