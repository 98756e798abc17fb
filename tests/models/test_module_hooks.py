"""The fused and lean paths of a layer read its modules' parameters without calling them. Where a module inside the
layer has hooks, a forward set on the instance or its own compilation, the layer runs its plain modules instead:
hooks fire as in the official model, and weight-recomputing pre-hooks (the old weight_norm, spectral_norm) are
honoured. Only the official module classes are fused: replaced dropouts, drop-paths and norms run as modules.
Without any of this the fused paths stay on (test_fused_post_attention, test_recompute)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import t2t_kernels
from op_log import OpLog
from perturb import perturbed


# logits of a fused path against the unfused or eager one: the CPU products differ (oneDNN's linear in the fused
# inference paths, MKL's through F.linear), as in the other model-level comparisons (test_fused_post_attention); a
# stale weight or a skipped module moves them by orders of magnitude more
LOGITS_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _model(backend="auto"):
    return perturbed(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10, backend=backend), 0.05).eval()


WATCHED = ["tokens_to_token.soft_split0", "tokens_to_token.attention1.norm1", "tokens_to_token.attention1.proj",
           "tokens_to_token.attention2.mlp.0", "blocks.0.attn", "blocks.0.norm2", "blocks.0.mlp.fc1",
           "blocks.0.mlp"]


@pytest.mark.parametrize("name", WATCHED)
def test_a_hooked_module_runs_and_its_hook_fires(name):
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        hooked = model(x)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(hooked, plain, **LOGITS_TOLERANCE)
    if name == "tokens_to_token.soft_split0":  # the raw split, not the split fused with the next norm
        torch.testing.assert_close(seen[0], F.unfold(x, 7, stride=4, padding=2).transpose(1, 2))


def test_hooks_turn_off_only_their_own_layer():
    """A hook inside one block leaves the other layers on the fused post_attention op (CPU inference)."""
    model = _model()
    if model.blocks[0].backend == "auto" and not any(
            n == "t2t_kernels::post_attention" for n in _op_names(model)):
        pytest.skip("the compiled post_attention is not available")
    fused_before = _op_names(model).count("t2t_kernels::post_attention")
    handle = model.blocks[0].mlp.fc2.register_forward_hook(lambda *args: None)
    fused_after = _op_names(model).count("t2t_kernels::post_attention")
    handle.remove()
    assert fused_after == fused_before - 1


def _op_names(model):
    with torch.no_grad(), OpLog() as log:
        model(torch.randn(2, 3, 32, 32))
    return log.names


NORMED = ("tokens_to_token.attention1.kqv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv")


def _old_weight_norm(module):
    """The old torch.nn.utils.weight_norm: a forward pre-hook recomputes `weight` from weight_g and weight_v."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for the parametrization
        torch.nn.utils.weight_norm(module)
    return module.weight_g


def _parametrized_weight_norm(module):
    """The new one: a parametrization (the module becomes a subclass of nn.Linear; `weight` is computed on access)."""
    torch.nn.utils.parametrizations.weight_norm(module)
    return module.parametrizations.weight.original0


@pytest.mark.parametrize("style", [_old_weight_norm, _parametrized_weight_norm], ids=["pre-hook", "parametrization"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "gradients"])
def test_weight_norm_is_honoured(style, train):
    """With the pre-hook, `weight` is stale until the module is called: a path that read it without calling the
    module would compute with the old one. The fused model gives the eager model's logits and gradients."""
    model = _model()
    with torch.no_grad():
        for name in NORMED:
            style(model.get_submodule(name)).mul_(1.5)  # each row's norm g: `weight` changes with it
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for backend in ("auto", "eager"):  # fused first: an eager pass would refresh the stale weights
        model.set_backend(backend)
        model.zero_grad()
        with torch.set_grad_enabled(train):
            out = model(x)
        if train:
            out.square().sum().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}
    (out, grads), (ref, ref_grads) = results["auto"], results["eager"]
    torch.testing.assert_close(out, ref, **LOGITS_TOLERANCE)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:  # fp32 GEMM rounding scales with the gradient's size
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


class _McDropout(torch.nn.Dropout):  # Monte-Carlo dropout: stays on in eval
    def forward(self, x):
        return F.dropout(x, self.p, training=True)


class _Halve(torch.nn.Module):  # a replaced drop-path
    def forward(self, x):
        return 0.5 * x


REPLACED_DROPOUTS = {
    "blocks.0.mlp.drop": lambda: _McDropout(0.2),
    "blocks.0.attn.proj_drop": lambda: _McDropout(0.2),
    "blocks.0.drop_path": _Halve,
    "tokens_to_token.attention1.dp": lambda: _McDropout(0.2),
}


@pytest.mark.parametrize("name", REPLACED_DROPOUTS)
def test_replaced_dropouts_run(name):
    """The fused post_attention op skips dropout and drop-path only where they are the official modules, inactive:
    a replacement (Monte-Carlo dropout in eval, a rescaling drop-path) runs, as on the eager backend."""
    model = _model()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, REPLACED_DROPOUTS[name]())
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    for backend in ("auto", "eager"):
        model.set_backend(backend)
        torch.manual_seed(0)  # the same dropout masks, drawn in the same order
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], **LOGITS_TOLERANCE)


@pytest.mark.parametrize("layer", ["attention1", "attention2"])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_a_layer_norm_subclass_before_a_t2t_layer_runs(name, layer):
    """Only the official LayerNorm is fused into the soft split before it: a subclass's own forward runs (on every
    backend), the same as when a hook on the split forces the plain path."""
    class Shifted(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2 + 1

    model = t2t_kernels.create_model(name, img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    t2t = model.tokens_to_token
    old = getattr(t2t, layer).norm1
    new = Shifted(old.normalized_shape)
    new.load_state_dict(old.state_dict())
    with torch.no_grad():
        official_norm = model(x)
        getattr(t2t, layer).norm1 = new
        for backend in ("auto", "eager"):
            model.set_backend(backend)
            out = model(x)
            split = t2t.soft_split0 if layer == "attention1" else t2t.soft_split1
            handle = split.register_forward_hook(lambda *args: None)  # forces norm1(split(x)) through the module
            plain = model(x)
            handle.remove()
            torch.testing.assert_close(out, plain, **LOGITS_TOLERANCE)
            assert not torch.allclose(out, official_norm, atol=1e-3)
