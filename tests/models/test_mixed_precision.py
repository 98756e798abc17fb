"""Mixed precision: the official Performer overflows to NaN under fp16 autocast; ours stays finite and close."""
import pytest
import torch
import torch.nn.functional as F
from official_forward import official_forward

import t2t_kernels


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _large_activation_model():
    """A t2t_vit_7 whose first Performer sees large-norm q/k (as trained weights can produce): |x|^2/2 and the sums
    over tokens then exceed the fp16 range in the official einsums."""
    torch.manual_seed(0)
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10).eval()
    with torch.no_grad():
        for p in model.tokens_to_token.attention1.kqv.parameters():
            p.mul_(200)
    return model


def test_official_formula_overflows_under_fp16_autocast_ours_does_not():
    model = _large_activation_model()
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        fp32_logits = model(x)
        with torch.autocast("cpu", dtype=torch.float16):
            official = official_forward(model.state_dict(), x, "performer", num_heads=4)
            ours = model(x)
    assert not torch.isfinite(F.cross_entropy(official.float(), labels))  # the official failure, reproduced
    loss = F.cross_entropy(ours.float(), labels)
    assert torch.isfinite(loss)
    assert _relative_error(ours, fp32_logits) < 2e-2


def _train_losses(model, steps, dtype=None, scaler=None):
    torch.manual_seed(1)
    x, labels = torch.randn(steps, 4, 3, 32, 32), torch.randint(0, 10, (steps, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x[step]), labels[step])
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"non-finite parameters at step {step}"
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_is_finite_and_close_to_fp32(dtype):
    def fresh():
        torch.manual_seed(0)
        model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    reference = _train_losses(fresh(), steps=3)
    # a moderate initial scale: with the default 2**16 the first fp16 steps overflow and are skipped by design,
    # which would compare different numbers of updates
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if dtype == torch.float16 else None
    mixed = _train_losses(fresh(), steps=3, dtype=dtype, scaler=scaler)
    if scaler is not None:
        assert scaler.get_scale() == 2.0**10, "a step was skipped for inf/NaN gradients"
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-2
    for got, want in zip(mixed, reference):
        assert got == pytest.approx(want, rel=tolerance)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_cpu_bf16_autocast_inference_runs_the_attention_op(name):
    """Under CPU bf16 autocast (where the blocks' post_attention op does not apply) inference runs each block's
    attention as the softmax_attention op on the bf16 qkv (cpp: fp32 inside), and the logits stay as close to the
    fp32 model's as the eager backend's are."""
    from op_log import OpLog

    from t2t_kernels.ops.softmax_attention import BACKENDS

    torch.manual_seed(0)
    fused = t2t_kernels.create_model(name, img_size=(32, 48), num_classes=10).eval()
    eager = t2t_kernels.create_model(name, img_size=(32, 48), num_classes=10, backend="eager").eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        fp32_logits = eager(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
            ours = fused(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = eager(x)
    if BACKENDS.unavailable_reason("cpp", x.device, torch.bfloat16) is None:
        # every block but the last (which runs for the class token alone)
        assert log.names.count("t2t_kernels::softmax_attention") == len(fused.blocks) - 1
    assert ours.dtype == theirs.dtype
    assert _relative_error(ours, fp32_logits) < max(2e-2, 2 * _relative_error(theirs, fp32_logits))
