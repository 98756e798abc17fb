"""Every variant gives the same logits and parameter gradients on each available backend as on eager."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import t2t_kernels
from perturb import perturbed
from t2t_kernels.ops import PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS, SOFT_SPLIT_LAYER_NORM_BACKENDS


def _fused_backends():
    usable = set.intersection(*(set(b.available("cpu")) for b in (SOFT_SPLIT_BACKENDS, PERFORMER_BACKENDS,
                                                                  SOFT_SPLIT_LAYER_NORM_BACKENDS)))
    # triton runs here only through the interpreter: one small variant is enough (see the cases below)
    return [b for b in ("cpp", "triton") if b in usable]


def _logits_and_grads(model, x, backend):
    model.set_backend(backend)
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _dropout_off(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


CASES = [(name, b) for name in t2t_kernels.list_models() for b in _fused_backends() if b == "cpp"]
CASES += [("t2t_vit_7", "triton")] if "triton" in _fused_backends() else []


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
@pytest.mark.parametrize("name,backend", CASES or [("none", "none")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_backend_matches_eager(name, backend, mode):
    model = perturbed(_dropout_off(t2t_kernels.create_model(name, img_size=32, num_classes=10)), 0.02)
    model.train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    ref_out, ref_grads = _logits_and_grads(model, x, "eager")
    out, grads = _logits_and_grads(model, x, backend)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", ["eager"] + _fused_backends())
def test_channels_last_images(backend):
    """A channels_last image goes through every backend (the soft split reads its strides) with the same result."""
    model = t2t_kernels.t2t_vit_7(img_size=(32, 48), num_classes=10, backend=backend).eval()
    x = torch.randn(2, 3, 32, 48)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    assert not x_cl.is_contiguous()
    out = model(x_cl)
    out.sum().backward()
    x_ref = x.clone().requires_grad_()
    ref = model(x_ref)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def _gradient_penalty_grads(model, x, backend):
    """Parameter gradients of |d logits.sum() / d x|^2 (double backward through every layer)."""
    model.set_backend(backend)
    model.zero_grad()
    x = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_gradient_penalty_with_written_out_attention(name):
    """SDPA's fused kernels have no second derivative; set_fused_attn(False) writes the softmax attention out as the
    official code does (same logits), and then a gradient penalty goes through the whole fused model (its custom ops
    differentiate their eager formulas under create_graph) with the eager model's gradients."""
    model = perturbed(_dropout_off(t2t_kernels.create_model(name, img_size=32, num_classes=10)), 0.02).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused_attn = model(x)
        model.set_fused_attn(False)
        torch.testing.assert_close(model(x), fused_attn, rtol=1e-5, atol=1e-6)
    ref = _gradient_penalty_grads(model, x, "eager")
    got = _gradient_penalty_grads(model, x, CASES[0][1])
    assert got.keys() == ref.keys() and len(ref) > 0
    for n in ref:  # fp32 rounding through two backward passes scales with the gradient's size
        torch.testing.assert_close(got[n], ref[n], rtol=1e-3, atol=1e-5 * ref[n].abs().max().item(), msg=n)


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_forward_mode_jvp_matches_eager(name):
    """torch.func.jvp of the logits in inference: the fused ops take their eager formulas for inputs that carry a
    tangent (their kernels have none), so the fused model's jvp is eager's, not zero. Written-out attention, as
    SDPA's fused kernel has no forward derivative either."""
    model = _dropout_off(t2t_kernels.create_model(name, img_size=32, num_classes=10)).eval()
    model.set_fused_attn(False)
    x, tangent = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    jvps = {}
    for backend in ("eager", CASES[0][1]):
        model.set_backend(backend)
        with torch.no_grad():
            jvps[backend] = torch.func.jvp(model, (x,), (tangent,))[1]
    want = jvps.pop("eager")
    assert want.abs().max() > 0
    torch.testing.assert_close(jvps.popitem()[1], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_func_grad_of_a_train_step_matches_backward(name):
    """torch.func.grad over functional_call of the fused model in training (the lean recompute pairs, the fused ops)
    equals loss.backward()'s gradients and the eager backend's. It used to raise: torch.func needs setup_context on
    autograd Functions, which the lean pairs' and torch.library's generated one lack (under torch.func the ops take
    their eager formulas and the pairs run as plain modules). The Performer's fixed random features are passed as
    non-differentiated."""
    torch.manual_seed(0)
    model = _dropout_off(t2t_kernels.create_model(name, img_size=32, num_classes=10)).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def loss(params):
        return F.cross_entropy(torch.func.functional_call(model, {**params, **frozen}, (x,)), labels)

    results = {}
    for backend in (CASES[0][1], "eager"):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        results[backend] = (torch.func.grad(loss)(trainable), {k: p.grad for k, p in model.named_parameters()
                                                                if p.requires_grad})
    (func_grads, backward_grads), (eager_func, _) = results[CASES[0][1]], results["eager"]
    for k in trainable:
        scale = backward_grads[k].abs().max().item()
        torch.testing.assert_close(func_grads[k], backward_grads[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
        torch.testing.assert_close(func_grads[k], eager_func[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
def test_training_with_the_random_features_unfrozen():
    """model.requires_grad_(True) (common after a frozen phase) also unfreezes the Performers' w: the fused model
    ("auto") trains it as the official one would, through the eager Performer formula, with a warning (none while
    torch.compile traces: dynamo cannot trace warnings.warn, and fullgraph=True would fail), and gives the eager
    backend's gradients, w's included (it used to raise)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _dropout_off(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).train().requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = {}
    for run, backend in ((model, "auto"), (compiled, "auto"), (model, "eager")):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(x).square().mean().backward()
        warned = any("w requires a gradient" in str(c.message) for c in caught)
        assert warned == (run is model and backend == "auto")
        grads[run is model, backend] = {k: p.grad for k, p in model.named_parameters()}
    assert grads[True, "auto"]["tokens_to_token.attention1.w"].abs().max() > 0
    for k, g in grads[True, "eager"].items():
        for case in ((True, "auto"), (False, "auto")):
            torch.testing.assert_close(grads[case][k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
def test_func_grad_over_all_parameters():
    """torch.func.grad over every parameter of the fused model, the Performer's fixed random features w included
    (the usual `dict(model.named_parameters())`): the same gradients as the eager backend's, w's too (under torch.func
    the Performer runs its eager formula, which differentiates w; it used to refuse any w that required a gradient)."""
    torch.manual_seed(0)
    model = _dropout_off(t2t_kernels.t2t_vit_7(img_size=32, num_classes=10)).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(params):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), labels)

    grads = {}
    for backend in (CASES[0][1], "eager"):
        model.set_backend(backend)
        grads[backend] = torch.func.grad(loss)(params)
    fused, eager = grads[CASES[0][1]], grads["eager"]
    assert fused.keys() == params.keys()
    assert fused["tokens_to_token.attention1.w"].abs().max() > 0
    for k in params:
        scale = eager[k].abs().max().item()
        torch.testing.assert_close(fused[k], eager[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


@pytest.mark.skipif(not CASES, reason="no fused CPU backend available (extension not built)")
@pytest.mark.parametrize("transform", ["vjp", "jacrev", "vmap", "jvp", "dual"])
def test_func_transforms_in_training_match_eager(transform):
    """The other torch.func transforms and forward-AD dual tensors through the fused model in training: the lean
    LayerNorm/GELU pairs run as plain modules under them (their Function has no vmap or jvp rule, and torch.func.vjp
    runs its backward outside the transform; found by review: all five raised). Written-out attention (SDPA's fused
    kernel has no forward derivative)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = _dropout_off(t2t_kernels.create_model("t2t_vit_7", img_size=32, num_classes=10)).train()
    model.set_fused_attn(False)
    x, tangent, cotangent = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 10)

    def run(backend):
        model.set_backend(backend)
        if transform == "vjp":
            return torch.func.vjp(model, x)[1](cotangent)[0]
        if transform == "jacrev":
            return torch.func.jacrev(lambda t: model(t)[:, :3])(x[:, :, :8, :8].contiguous().repeat(1, 1, 4, 4))
        if transform == "vmap":
            return torch.func.vmap(model, in_dims=1)(torch.stack([x, x.flip(0)], dim=1))
        if transform == "jvp":
            return torch.func.jvp(model, (x,), (tangent,))[1]
        with fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent

    got, want = run(CASES[0][1]), run("eager")
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
