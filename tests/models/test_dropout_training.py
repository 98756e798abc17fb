"""Training with the T2T layers' dropouts active (the Performer layers' official hard-coded 0.1) on the CPU
backends: each residual dropout runs as the dropout_add op, whose masks come from seeds drawn from torch's
generator. The layer equals the official formula with those masks (values and gradients), the model is reproducible
under torch.manual_seed, and every switch that should keep nn.Dropout does."""
import pytest
import torch
import torch.nn.functional as F

import t2t_kernels
from op_log import OpLog
from t2t_kernels.layers.common import residual_dropout
from t2t_kernels.layers.t2t import Token_performer
from t2t_kernels.ops import DROPOUT_ADD_BACKENDS
from t2t_kernels.ops.dropout_add import draw_seed, reference
from t2t_kernels.ops.performer_attention.reference import performer_attention_official

needs_cpp = pytest.mark.skipif(DROPOUT_ADD_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32)
                               is not None, reason="the dropout_add kernel is not built here")
DROPOUT_OP = "t2t_kernels::dropout_add"
TORCH_DROPOUT = ("aten::bernoulli_.float", "aten::native_dropout")


def _ran(fn):
    with OpLog() as log:
        out = fn()
    return out, log.names


@needs_cpp
def test_token_performer_equals_the_official_formula_with_the_same_masks(fresh_seed):
    """Token_performer in training (cpp backend) against the official layer written out, whose two dropouts use
    dropout_add's eager formula with the seeds the layer draws, in order: the same output and gradients."""
    torch.manual_seed(fresh_seed)
    layer = Token_performer(dim=27, in_dim=16, backend="cpp").train()
    x = torch.randn(2, 50, 27, requires_grad=True)
    torch.manual_seed(fresh_seed + 1)
    out, names = _ran(lambda: layer(x))
    assert names.count(DROPOUT_OP) == 2 and not set(TORCH_DROPOUT) & set(names), names
    out.backward(torch.ones_like(out))
    grads = [t.grad.clone() for t in (x, *layer.parameters()) if t.grad is not None]
    layer.zero_grad()
    x.grad = None

    torch.manual_seed(fresh_seed + 1)
    seeds = (draw_seed(), draw_seed())
    fc1, act, fc2, _ = layer.mlp
    k, q, v = layer.kqv(layer.norm1(x)).split(layer.emb, dim=-1)
    y = performer_attention_official(q, k, v, layer.w, layer.epsilon)
    h = reference.dropout_add(layer.proj(y), v, 0.1, seeds[0])
    want = reference.dropout_add(fc2(act(fc1(layer.norm2(h)))), h, 0.1, seeds[1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    want.backward(torch.ones_like(want))
    want_grads = [t.grad for t in (x, *layer.parameters()) if t.grad is not None]
    assert len(grads) == len(want_grads) > 1
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _train_forward(model, x, seed):
    torch.manual_seed(seed)
    return _ran(lambda: model(x))


@needs_cpp
def test_model_training_is_reproducible_and_drops(fresh_seed):
    """T2T-ViT-7 in training: four dropout_adds (two per Performer layer), no torch dropout in the T2T module; the
    same torch.manual_seed gives bitwise the same logits and another seed other ones; the loss trains."""
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    first, names = _train_forward(model, x, fresh_seed)
    assert names.count(DROPOUT_OP) == 4, names.count(DROPOUT_OP)
    assert not set(TORCH_DROPOUT) & set(names)
    again, _ = _train_forward(model, x, fresh_seed)
    other, _ = _train_forward(model, x, fresh_seed + 1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    F.cross_entropy(first, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@needs_cpp
@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_blocks_residual_dropouts_run_the_op(drop_path_rate):
    """With drop_rate > 0 a training backbone block's two residual dropouts (attention projection, MLP output) run as
    the op too, where no DropPath sits between them and the sum; the MLP's dropout after its GELU stays nn.Dropout.
    Reproducible under torch.manual_seed; the loss trains."""
    depth = 7
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, drop_rate=0.2, drop_path_rate=drop_path_rate).train()
    x = torch.randn(2, 3, 32, 32)
    first, names = _train_forward(model, x, 5)
    # the last block runs the class token's row alone (its tiny dropouts stay nn.Dropout); the DropPath rates rise
    # linearly from 0, so the first block has none
    blocks_ops = 2 * (depth - 1) if drop_path_rate == 0.0 else 2
    assert names.count(DROPOUT_OP) == 4 + blocks_ops, names.count(DROPOUT_OP)
    assert set(TORCH_DROPOUT) & set(names)  # the GELU's dropout (and with DropPath the residual ones)
    again, _ = _train_forward(model, x, 5)
    assert torch.equal(first, again)
    F.cross_entropy(first, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("switch", ["eager-backend", "T2T_EAGER_OPS", "hooked-dropout"])
def test_switches_keep_torch_dropout(switch, monkeypatch):
    """The eager backend, T2T_EAGER_OPS=dropout_add and a hook on a layer's module (the layer then calls its modules,
    so the hook fires) keep nn.Dropout."""
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10,
                                  backend="eager" if switch == "eager-backend" else "auto").train()
    if switch == "T2T_EAGER_OPS":
        monkeypatch.setenv("T2T_EAGER_OPS", "dropout_add")
    hooked = []
    if switch == "hooked-dropout":
        for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2):
            layer.dp.register_forward_hook(lambda *args: hooked.append(True))
    _, names = _train_forward(model, torch.randn(2, 3, 32, 32), 0)
    assert DROPOUT_OP not in names
    assert set(TORCH_DROPOUT) & set(names), "the T2T layers' dropouts should still run"
    assert len(hooked) == (2 if switch == "hooked-dropout" else 0)


@needs_cpp
@pytest.mark.parametrize("switch", ["no-grad", "checkpointing", "T2T_RECOMPUTE_PAIRS=0"])
def test_plain_training_paths_run_the_op(switch, monkeypatch):
    """Where a Performer layer trains without its lean pairs (training without gradients, gradient checkpointing,
    T2T_RECOMPUTE_PAIRS=0) its two residual dropouts still run as the op."""
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10).train()
    if switch == "checkpointing":
        model.set_grad_checkpointing(True)
    if switch == "T2T_RECOMPUTE_PAIRS=0":
        monkeypatch.setenv("T2T_RECOMPUTE_PAIRS", "0")
    with torch.set_grad_enabled(switch != "no-grad"):
        _, names = _train_forward(model, torch.randn(2, 3, 32, 32), 0)
    assert names.count(DROPOUT_OP) == 4 and not set(TORCH_DROPOUT) & set(names), names


@needs_cpp
def test_checkpointed_training_gives_the_same_loss_and_gradients(monkeypatch, fresh_seed):
    """With gradient checkpointing the dropouts draw the same seeds as without it (the checkpoint replays torch's
    generator in the recomputation), so one torch.manual_seed gives one training step: the same loss and gradients
    (the same GEMMs on both sides, T2T_ONEDNN=0: see test_grad_checkpointing_gives_the_same_gradients)."""
    monkeypatch.setenv("T2T_ONEDNN", "0")
    model = t2t_kernels.t2t_vit_7(img_size=32, num_classes=10).train()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([3, 8])

    def step(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(fresh_seed)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = step(False)
    loss, checkpointed = step(True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert checkpointed.keys() == plain.keys() and len(plain) > 0
    for name, grad in plain.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@needs_cpp
def test_compiled_residual_dropout_runs_the_op():
    """Under torch.compile the helper calls the op with a seed the graph draws (torch.randint: inductor's generator,
    itself seeded from torch's): a fresh mask at every call, reproducible under torch.manual_seed, and backward
    regenerates the forward's mask; with inductor's fallback_random, eager's mask."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    dropout = torch.nn.Dropout(0.5).train()
    fn = lambda skip, x: residual_dropout(skip, x, dropout, "auto")  # noqa: E731
    torch.compile(fn, fullgraph=True, backend=recording_backend)(torch.zeros(64), torch.ones(64))
    assert "t2t_kernels.dropout_add" in targets and not any("dropout" in t and "t2t" not in t for t in targets), targets

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    skip, x = torch.randn(2, 300), torch.randn(2, 300).abs_().add_(0.5).requires_grad_()
    outs, grads = [], []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out = compiled(skip, x)
        grads.append(torch.autograd.grad(out.sum(), x)[0])
        outs.append(out.detach())
    kept = grads[0] != 0
    assert set(grads[0].unique().tolist()) == {0.0, 2.0} and 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(outs[0], torch.where(kept, skip + 2 * x.detach(), skip), rtol=0, atol=0)
    assert torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])  # torch.manual_seed reproduces it
    assert not torch.equal(grads[2], grads[0])  # another seed, another mask

    # with inductor's fallback_random the graph draws the seed from torch's generator, as the uncompiled call does:
    # the same mask as eager for the same torch.manual_seed
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(7)
        compiled_out = torch.compile(fn, fullgraph=True)(skip, x.detach())
    torch.manual_seed(7)
    torch.testing.assert_close(compiled_out, fn(skip, x.detach()), rtol=0, atol=0)
