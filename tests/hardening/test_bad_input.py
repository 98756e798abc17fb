"""Every public entry point, fed invalid input: a clear exception whose message names the argument and what was
expected, never a crash, a hang or a quietly wrong result. One table per function; each row is
(id, call, exception type, fragments the message must contain).

load_pretrained's table lives in test_checkpoint_files.py, next to the files it needs.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import t2t_kernels
from t2t_kernels import T2TViT, create_model
from t2t_kernels.__main__ import main as cli_main
from t2t_kernels.ops import (performer_attention, post_attention, soft_split, soft_split_layer_norm,
                             soft_split_layer_norm_linear, softmax_attention)
from t2t_kernels.ops.performer_attention import BACKENDS as PERFORMER_BACKENDS
from t2t_kernels.ops.soft_split import BACKENDS as SOFT_SPLIT_BACKENDS


def assert_raises_clearly(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{type(info.value).__name__} message {message!r} lacks {missing}"
    return message


def rows(table):
    return [pytest.param(call, error, fragments, id=name) for name, call, error, fragments in table]


# --- soft_split -------------------------------------------------------------------------------------------------


def image(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


SOFT_SPLIT_TABLE = [
    ("x-not-a-tensor", lambda b: soft_split([[1.0]], 3, 1, 0, backend=b), TypeError, ["x", "Tensor", "list"]),
    ("x-numpy", lambda b: soft_split(np.ones((1, 1, 4, 4)), 3, 1, 0, backend=b), TypeError, ["x", "Tensor"]),
    ("x-3d", lambda b: soft_split(image(3, 8, 8), 3, 1, 0, backend=b), ValueError, ["x", "4-D (B, C, H, W)", "(3, 8, 8)"]),
    ("x-5d", lambda b: soft_split(image(1, 1, 3, 8, 8), 3, 1, 0, backend=b), ValueError, ["x", "4-D"]),
    ("x-int", lambda b: soft_split(torch.ones(1, 3, 8, 8, dtype=torch.int64), 3, 1, 0, backend=b), TypeError,
     ["x", "floating-point", "torch.int64"]),
    ("x-bool", lambda b: soft_split(torch.ones(1, 3, 8, 8, dtype=torch.bool), 3, 1, 0, backend=b), TypeError,
     ["x", "floating-point"]),
    ("x-complex", lambda b: soft_split(torch.ones(1, 3, 8, 8, dtype=torch.cfloat), 3, 1, 0, backend=b), TypeError,
     ["x", "floating-point"]),
    ("x-no-channels", lambda b: soft_split(image(1, 0, 8, 8), 3, 1, 0, backend=b), ValueError,
     ["x", "at least one channel"]),
    ("kernel-zero", lambda b: soft_split(image(1, 3, 8, 8), 0, 1, 0, backend=b), ValueError, ["kernel_size", "positive"]),
    ("kernel-negative", lambda b: soft_split(image(1, 3, 8, 8), (3, -1), 1, 0, backend=b), ValueError,
     ["kernel_size", "positive"]),
    ("kernel-float", lambda b: soft_split(image(1, 3, 8, 8), 3.0, 1, 0, backend=b), TypeError,
     ["kernel_size", "int or a pair of ints", "3.0"]),
    ("kernel-bool", lambda b: soft_split(image(1, 3, 8, 8), True, 1, 0, backend=b), TypeError,
     ["kernel_size", "int or a pair of ints"]),
    ("kernel-triple", lambda b: soft_split(image(1, 3, 8, 8), (3, 3, 3), 1, 0, backend=b), TypeError,
     ["kernel_size", "pair"]),
    ("kernel-none", lambda b: soft_split(image(1, 3, 8, 8), None, 1, 0, backend=b), TypeError, ["kernel_size", "None"]),
    ("kernel-tensor", lambda b: soft_split(image(1, 3, 8, 8), torch.tensor(3), 1, 0, backend=b), TypeError,
     ["kernel_size", "int or a pair of ints"]),
    ("stride-zero", lambda b: soft_split(image(1, 3, 8, 8), 3, 0, 0, backend=b), ValueError, ["stride", "positive"]),
    ("stride-negative", lambda b: soft_split(image(1, 3, 8, 8), 3, (1, -2), 0, backend=b), ValueError,
     ["stride", "positive"]),
    ("stride-float", lambda b: soft_split(image(1, 3, 8, 8), 3, 1.5, 0, backend=b), TypeError, ["stride", "int"]),
    ("padding-negative", lambda b: soft_split(image(1, 3, 8, 8), 3, 1, -1, backend=b), ValueError,
     ["padding", "non-negative"]),
    ("padding-same", lambda b: soft_split(image(1, 3, 8, 8), 3, 1, "same", backend=b), TypeError,
     ["padding", "int or a pair of ints", "'same'"]),
    ("kernel-larger-than-image", lambda b: soft_split(image(1, 3, 4, 9), 7, 1, 1, backend=b), ValueError,
     ["kernel_size (7, 7)", "larger than the padded input height", "4 + 2*1"]),
    ("kernel-larger-than-width", lambda b: soft_split(image(1, 3, 9, 2), (3, 5), 1, (0, 1), backend=b), ValueError,
     ["kernel_size (3, 5)", "width"]),
]


def soft_split_backends():
    return [pytest.param(b, id=b) for b in SOFT_SPLIT_BACKENDS.available("cpu")]


@pytest.mark.parametrize("backend", soft_split_backends())
@pytest.mark.parametrize("call,error,fragments", rows(SOFT_SPLIT_TABLE))
def test_soft_split_bad_input(call, error, fragments, backend):
    assert_raises_clearly(lambda: call(backend), error, fragments)


@pytest.mark.parametrize("backend,error,fragments", [
    ("fast", ValueError, ["backend must be one of", "'eager'", "'fast'"]),
    ("CPP", ValueError, ["backend must be one of", "'CPP'"]),
    (1, ValueError, ["backend must be one of"]),
    ("cuda", RuntimeError, ["backend='cuda' is not available", "cuda tensors", "cpu tensor"]),
])
def test_soft_split_bad_backend(backend, error, fragments):
    assert_raises_clearly(lambda: soft_split(image(1, 3, 8, 8), 3, 1, 0, backend=backend), error,
                          ["soft_split"] + fragments)


@pytest.mark.parametrize("op,backend", [("soft_split_layer_norm", "cuda"), ("soft_split_layer_norm_linear", "cuda"),
                                        ("soft_split_layer_norm_linear", "triton")])
def test_composed_backends_name_the_op_called(op, backend, monkeypatch):
    """The ops that compose another op's kernel (no fused one of their own there) raise in their own name."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = image(1, 3, 8, 8)
    args = (torch.randn(27), torch.randn(27)) + ((torch.randn(5, 27), None) if op.endswith("linear") else ())
    fn = getattr(t2t_kernels.ops, op)
    assert_raises_clearly(lambda: fn(x, 3, 1, 0, *args, backend=backend), RuntimeError,
                          [f"{op}: backend={backend!r} is not available"])


def test_numpy_integers_as_geometry():
    """numpy integers for kernel_size, stride and padding, as F.unfold takes them."""
    x = image(2, 3, 9, 8)
    want = soft_split(x, 3, (2, 1), 1, backend="eager")
    got = soft_split(x, np.int64(3), (np.int32(2), np.int64(1)), np.int16(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 3, 0, 8), (1, 3, 8, 0)], ids=["H0", "W0"])
def test_soft_split_rejects_empty_images(shape):
    for backend in SOFT_SPLIT_BACKENDS.available("cpu"):
        assert_raises_clearly(lambda: soft_split(image(*shape), 3, 2, 2, backend=backend), ValueError,
                              ["soft_split", "x", "height"])


@pytest.mark.parametrize("backend", soft_split_backends())
def test_soft_split_empty_batch_and_special_values(backend):
    """B = 0 gives an empty (0, L, F) output and gradient; NaN and inf are copied through bit for bit."""
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    y = soft_split(x, 3, 2, 1, backend=backend)
    assert y.shape == (0, 16, 27)
    y.sum().backward()
    assert x.grad.shape == x.shape
    x = torch.randn(1, 2, 5, 5)
    x[0, 0, 1, 2], x[0, 1, 3, 3], x[0, 1, 4, 0] = float("nan"), float("inf"), -float("inf")
    y = soft_split(x, 3, 1, 1, backend=backend)
    expected = torch.nn.functional.unfold(x, 3, padding=1, stride=1).transpose(1, 2)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(0.0), expected.nan_to_num(0.0))


# --- performer_attention -----------------------------------------------------------------------------------------


def qkvw(lead=(2,), T=7, E=16, m=8, dtype=torch.float32):
    q, k, v = ((0.5 * torch.randn(*lead, T, E)).to(dtype) for _ in range(3))
    w = torch.nn.init.orthogonal_(torch.empty(m, E)) * math.sqrt(m)
    return q, k, v, w


def with_changes(b, **changes):
    q, k, v, w = qkvw()
    args = dict(q=q, k=k, v=v, w=w, eps=1e-8)
    args.update({name: change(args[name]) if callable(change) else change for name, change in changes.items()})
    return performer_attention(args["q"], args["k"], args["v"], args["w"], eps=args["eps"], backend=b)


PERFORMER_TABLE = [
    ("q-not-a-tensor", lambda b: with_changes(b, q=lambda q: q.tolist()), TypeError, ["q", "Tensor", "list"]),
    ("w-numpy", lambda b: with_changes(b, w=lambda w: w.numpy()), TypeError, ["w", "Tensor", "ndarray"]),
    ("q-int", lambda b: with_changes(b, q=lambda q: q.long(), k=lambda k: k.long(), v=lambda v: v.long()), TypeError,
     ["q", "floating point", "torch.int64"]),
    ("w-int", lambda b: with_changes(b, w=lambda w: w.long()), TypeError, ["w", "floating point"]),
    ("q-1d", lambda b: with_changes(b, q=lambda q: q[0, 0], k=lambda k: k[0, 0], v=lambda v: v[0, 0]), ValueError,
     ["q", "(..., T, E)", "(16,)"]),
    ("k-shorter", lambda b: with_changes(b, k=lambda k: k[:, :5]), ValueError,
     ["q, k and v", "same shape", "k (2, 5, 16)"]),
    ("v-wider", lambda b: with_changes(b, v=lambda v: torch.cat([v, v], -1)), ValueError,
     ["q, k and v", "same shape", "v (2, 7, 32)"]),
    ("k-batch", lambda b: with_changes(b, k=lambda k: k[:1]), ValueError, ["same shape"]),
    ("mixed-dtype", lambda b: with_changes(b, k=lambda k: k.double()), TypeError,
     ["q, k, v", "share a dtype", "torch.float64"]),
    ("w-1d", lambda b: with_changes(b, w=lambda w: w[0]), ValueError, ["w", "(m, E)", "E = 16"]),
    ("w-width", lambda b: with_changes(b, w=lambda w: w[:, :8]), ValueError, ["w", "(m, E)", "E = 16", "(8, 8)"]),
    ("w-transposed", lambda b: with_changes(b, w=lambda w: w.t()), ValueError, ["w", "(m, E)", "(16, 8)"]),
    ("w-no-features", lambda b: with_changes(b, w=lambda w: w[:0]), ValueError, ["w", "(m, E)", "(0, 16)"]),
    ("w-3d", lambda b: with_changes(b, w=lambda w: w[None]), ValueError, ["w", "(m, E)"]),
    ("mixed-devices", lambda b: with_changes(b, w=lambda w: w.to("meta")), ValueError,
     ["q, k, v, w", "one device", "meta"]),
    ("eps-zero", lambda b: with_changes(b, eps=0.0), ValueError, ["eps", "positive", "0.0"]),
    ("eps-negative", lambda b: with_changes(b, eps=-1e-8), ValueError, ["eps", "positive"]),
    ("eps-nan", lambda b: with_changes(b, eps=float("nan")), ValueError, ["eps", "positive", "nan"]),
    ("eps-inf", lambda b: with_changes(b, eps=float("inf")), ValueError, ["eps", "finite", "inf"]),
    ("eps-str", lambda b: with_changes(b, eps="1e-8"), ValueError, ["eps", "positive", "'1e-8'"]),
    ("eps-bool", lambda b: with_changes(b, eps=True), ValueError, ["eps", "positive", "True"]),
    ("eps-tensor", lambda b: with_changes(b, eps=torch.tensor(1e-8)), ValueError, ["eps", "positive", "number", "tensor("]),
]


def performer_backends():
    return [pytest.param(b, id=b) for b in PERFORMER_BACKENDS.available("cpu")]


@pytest.mark.parametrize("backend", performer_backends())
@pytest.mark.parametrize("call,error,fragments", rows(PERFORMER_TABLE))
def test_performer_bad_input(call, error, fragments, backend):
    assert_raises_clearly(lambda: call(backend), error, ["performer_attention"] + fragments)


@pytest.mark.parametrize("backend", performer_backends())
def test_performer_w_requiring_grad(backend):
    """The kernels have no gradient for the fixed random features w: asked for one, an explicit kernel backend says so
    and "auto" warns and runs the eager formula, which differentiates w (also what every backend runs under
    torch.func, e.g. torch.func.grad over all parameters)."""
    q, k, v, w = qkvw()
    w.requires_grad_()
    if backend != "eager":
        assert_raises_clearly(lambda: performer_attention(q, k, v, w, backend=backend), RuntimeError,
                              ["performer_attention", "w", f"backend {backend!r}", "no gradient",
                               "requires_grad_(False)"])
        if PERFORMER_BACKENDS.resolve("auto", q) == backend:
            with pytest.warns(UserWarning, match="w requires a gradient"):
                performer_attention(q, k, v, w).square().sum().backward()
    grad_w = torch.func.grad(lambda w: performer_attention(q, k, v, w, backend=backend).square().sum())(w.detach())
    w64 = w.detach().double().requires_grad_()
    performer_attention(q.double(), k.double(), v.double(), w64, backend="eager").square().sum().backward()
    assert w64.grad.abs().max() > 0
    torch.testing.assert_close(grad_w, w64.grad.float(), rtol=1e-4, atol=1e-5 * w64.grad.abs().max().item())
    if backend == "eager":
        performer_attention(q, k, v, w, backend="eager").square().sum().backward()
    if w.grad is not None:  # eager's, or auto's on the kernel's device
        torch.testing.assert_close(w.grad, grad_w)


@pytest.mark.parametrize("backend,dtype,error,fragments", [
    ("fast", torch.float32, ValueError, ["backend must be one of", "'fast'"]),
    ("cuda", torch.float32, RuntimeError, ["backend='cuda' is not available", "cuda tensors"]),
    ("cpp", torch.float16, RuntimeError, ["backend='cpp' is not available", "torch.float16", "supported: "]),
])
def test_performer_bad_backend(backend, dtype, error, fragments):
    if backend == "cpp" and "cpp" not in PERFORMER_BACKENDS.available("cpu"):
        pytest.skip("the cpp backend is not built")
    q, k, v, w = qkvw(dtype=dtype)
    assert_raises_clearly(lambda: performer_attention(q, k, v, w, backend=backend), error,
                          ["performer_attention"] + fragments)


@pytest.mark.parametrize("backend", performer_backends())
@pytest.mark.parametrize("lead,T,E", [((0,), 7, 16), ((2, 0), 7, 16), ((2,), 0, 16), ((2,), 7, 0), ((), 0, 16)],
                         ids=["B0", "H0", "T0", "E0", "noleadT0"])
def test_performer_empty_inputs(backend, lead, T, E):
    """Empty q, k, v (a 0 among the leading dims, T or E) give an empty y and empty gradients on every backend."""
    q, k, v, _ = qkvw(lead, T, E)
    w = torch.randn(4, E)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    y = performer_attention(*leaves, w, backend=backend)
    assert y.shape == q.shape and y.dtype == q.dtype
    y.sum().backward()
    assert all(t.grad is not None and t.grad.shape == q.shape for t in leaves)


# --- T2TViT constructor, factories and forward ----------------------------------------------------------------

SMALL = dict(embed_dim=64, depth=1, num_heads=2, token_dim=8)


def build(**kwargs):
    return lambda: T2TViT(**{"img_size": 32, **SMALL, **kwargs})


CONSTRUCTOR_TABLE = [
    ("img-size-not-16x", build(img_size=100), ValueError, ["img_size", "multiples of 16", "100"]),
    ("img-size-pair-not-16x", build(img_size=(32, 40)), ValueError, ["img_size", "multiples of 16", "(32, 40)"]),
    ("img-size-zero", build(img_size=0), ValueError, ["img_size", "positive multiples of 16"]),
    ("img-size-negative", build(img_size=-16), ValueError, ["img_size", "positive"]),
    ("img-size-one", build(img_size=(224,)), TypeError, ["img_size", "int or a pair of ints (H, W)", "(224,)"]),
    ("img-size-triple", build(img_size=(224, 224, 3)), TypeError, ["img_size", "pair of ints"]),
    ("img-size-str", build(img_size="224"), TypeError, ["img_size", "int or a pair", "'224'"]),
    ("img-size-float", build(img_size=224.0), TypeError, ["img_size", "int or a pair"]),
    ("img-size-bool", build(img_size=True), TypeError, ["img_size", "int or a pair"]),
    ("img-size-none", build(img_size=None), TypeError, ["img_size", "None"]),
    ("tokens-type-unknown", build(tokens_type="conv"), ValueError,
     ["tokens_type", "'performer', 'transformer'", "'conv'"]),
    ("tokens-type-case", build(tokens_type="Performer"), ValueError, ["tokens_type", "'Performer'"]),
    ("tokens-type-none", build(tokens_type=None), ValueError, ["tokens_type", "None"]),
    ("backend-unknown", build(backend="fast"), ValueError, ["backend", "'eager', 'cpp', 'cuda', 'triton'", "'fast'"]),
    ("backend-case", build(backend="CPP"), ValueError, ["backend", "'CPP'"]),
    ("backend-int", build(backend=1), ValueError, ["backend", "one of"]),
    ("in-chans-zero", build(in_chans=0), ValueError, ["in_chans", "positive int", "0"]),
    ("in-chans-float", build(in_chans=1.5), ValueError, ["in_chans", "positive int"]),
    ("num-classes-negative", build(num_classes=-1), ValueError, ["num_classes", "non-negative int", "-1"]),
    ("num-classes-float", build(num_classes=10.0), ValueError, ["num_classes", "int"]),
    ("embed-dim-zero", build(embed_dim=0), ValueError, ["embed_dim", "positive int"]),
    ("embed-dim-indivisible", build(embed_dim=63), ValueError, ["embed_dim", "divisible by num_heads", "63"]),
    ("num-heads-zero", build(num_heads=0), ValueError, ["num_heads", "positive int"]),
    ("depth-negative", build(depth=-1), ValueError, ["depth", "non-negative int", "-1"]),
    ("token-dim-zero", build(token_dim=0), ValueError, ["token_dim", ">= 2", "performer"]),
    ("token-dim-one-performer", build(token_dim=1), ValueError, ["token_dim", ">= 2", "random features"]),
    ("token-dim-zero-transformer", build(token_dim=0, tokens_type="transformer"), ValueError,
     ["token_dim", "positive int"]),
    ("mlp-ratio-zero", build(mlp_ratio=0), ValueError, ["mlp_ratio", "positive number"]),
    ("drop-rate", build(drop_rate=1.5), ValueError, ["drop_rate", "[0, 1]", "1.5"]),
    ("attn-drop-rate", build(attn_drop_rate=-0.1), ValueError, ["attn_drop_rate", "[0, 1]"]),
    ("drop-path-rate", build(drop_path_rate=-0.1), ValueError, ["drop_path_rate", "[0, 1]", "-0.1"]),
    ("unknown-variant", lambda: create_model("t2t_vit_99"), ValueError, ["unknown model 't2t_vit_99'", "t2t_vit_14"]),
    ("pretrained-true", lambda: create_model("t2t_vit_7", pretrained=True, img_size=32), ValueError,
     ["pretrained=True", "path of a local checkpoint"]),
    ("factory-bad-img-size", lambda: t2t_kernels.t2t_vit_7(img_size=33), ValueError, ["img_size", "multiples of 16"]),
    ("set-backend", lambda: T2TViT(img_size=32, **SMALL).set_backend("fast"), ValueError, ["backend", "'fast'"]),
    ("reset-classifier", lambda: T2TViT(img_size=32, **SMALL).reset_classifier(-2), ValueError,
     ["num_classes", "non-negative"]),
    ("reset-classifier-bool", lambda: T2TViT(img_size=32, **SMALL).reset_classifier(True), ValueError,
     ["num_classes", "non-negative int", "True"]),
    ("reset-classifier-pool", lambda: T2TViT(img_size=32, **SMALL).reset_classifier(3, global_pool="avg"),
     ValueError, ["global_pool", "class token", "'avg'"]),
]


@pytest.mark.parametrize("call,error,fragments", rows(CONSTRUCTOR_TABLE))
def test_model_constructor_bad_arguments(call, error, fragments):
    assert_raises_clearly(call, error, fragments)


@pytest.fixture(scope="module")
def small_model():
    return T2TViT(img_size=32, **SMALL).eval()


FORWARD_TABLE = [
    ("channels", torch.randn(1, 4, 32, 32), ValueError, ["in_chans=3", "(1, 4, 32, 32)"]),
    ("image-size", torch.randn(1, 3, 64, 64), ValueError, ["img_size=(32, 32)", "(64, 64)"]),
    ("image-not-square", torch.randn(1, 3, 32, 48), ValueError, ["img_size=(32, 32)", "(32, 48)"]),
    ("ndim-3", torch.randn(3, 32, 32), ValueError, ["(B, C, H, W)", "(3, 32, 32)"]),
    ("ndim-5", torch.randn(1, 1, 3, 32, 32), ValueError, ["(B, C, H, W)", "(1, 1, 3, 32, 32)"]),
    ("not-a-tensor", [[1.0, 2.0]], ValueError, ["(B, C, H, W)", "list"]),
    ("uint8", torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, ["floating-point images", "torch.uint8"]),
    ("float64-vs-float32", torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError,
     ["torch.float32 parameters", "torch.float64 images"]),
    ("float16-vs-float32", torch.randn(1, 3, 32, 32, dtype=torch.float16), TypeError,
     ["torch.float32 parameters", "torch.float16 images", "autocast"]),
]


@pytest.mark.parametrize("x,error,fragments", [pytest.param(x, e, f, id=n) for n, x, e, f in FORWARD_TABLE])
def test_model_forward_bad_input(small_model, x, error, fragments):
    with torch.no_grad():
        assert_raises_clearly(lambda: small_model(x), error, fragments)


def test_model_forward_edge_inputs_are_fine(small_model):
    """Not errors: an empty batch gives empty logits; autocast accepts fp32 images; NaN images give NaN logits
    (not an exception, not a crash)."""
    with torch.no_grad():
        assert small_model(torch.randn(0, 3, 32, 32)).shape == (0, 1000)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert small_model(torch.randn(1, 3, 32, 32)).isfinite().all()
        assert small_model(torch.full((1, 3, 32, 32), float("nan"))).isnan().all()


# --- the command line ------------------------------------------------------------------------------------------

QUICK = ["--model", "t2t_vit_7", "--img-size", "32", "--steps", "0", "--no-progress", "--device", "cpu"]


def run_cli(args, capsys):
    """main() in this process: (exit status, stderr). argparse errors exit via SystemExit; anything else escaping
    main() would be a traceback for the user, so it fails the test."""
    try:
        status = cli_main(args)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


CLI_TABLE = [
    ("model-unknown", ["info", "--model", "t2t_vit_99"], ["--model", "invalid choice", "'t2t_vit_99'", "t2t_vit_14"]),
    ("img-size-not-16x", ["info", *QUICK, "--img-size", "100"], ["img_size", "multiples of 16", "100"]),
    ("img-size-text", ["info", *QUICK, "--img-size", "abc"], ["--img-size", "'abc'"]),
    ("img-size-triple", ["info", *QUICK, "--img-size", "224,224,3"], ["img_size", "pair of ints", "(224, 224, 3)"]),
    ("img-size-zero", ["info", *QUICK, "--img-size", "0"], ["img_size", "positive multiples of 16"]),
    ("backend-unknown", ["info", *QUICK, "--backend", "fast"], ["--backend", "invalid choice", "'fast'"]),
    ("device-unknown", ["info", *QUICK, "--device", "foo"], ["device", "foo"]),
    ("batch-text", ["info", *QUICK, "--batch", "many"], ["--batch", "invalid int value", "'many'"]),
    ("unavailable-backend", ["info", *QUICK, "--steps", "1", "--batch", "1", "--backend", "cuda"],
     ["backend='cuda' is not available", "cuda tensors"]),
]


@pytest.mark.parametrize("args,fragments", [pytest.param(a, f, id=n) for n, a, f in CLI_TABLE])
def test_cli_bad_arguments(args, fragments, capsys):
    status, err = run_cli(args, capsys)
    assert status == 2, (status, err)
    missing = [f for f in fragments if f not in err]
    assert not missing, f"stderr {err!r} lacks {missing}"
    assert "Traceback" not in err


@pytest.mark.parametrize("args,fragments", [
    (["--batch", "0", "--steps", "1"], ["--batch", "positive"]),
    (["--batch", "-1", "--steps", "1"], ["--batch", "positive"]),
    (["--steps", "-1"], ["--steps", "non-negative"]),
], ids=["batch-0", "batch-negative", "steps-negative"])
def test_cli_rejects_bad_counts(args, fragments, capsys):
    status, err = run_cli(["info", *QUICK, *args], capsys)
    assert status == 2 and all(f in err for f in fragments), (status, err)


@pytest.mark.parametrize("args,fragment", [
    (["info", "--model", "t2t_vit_99"], "invalid choice: 't2t_vit_99'"),
    (["info", "--model", "t2t_vit_7", "--img-size", "100", "--steps", "0"], "img_size sides must be positive multiples of 16"),
], ids=["argparse-error", "validation-error"])
def test_cli_bad_arguments_in_a_real_process(args, fragment):
    """The same through `python -m t2t_kernels`: a non-zero exit, a clear message, no traceback. (Each process costs a
    torch import, so the table above runs in-process.)"""
    result = subprocess.run([sys.executable, "-m", "t2t_kernels", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.count("\n") < 20  # the model's table at most, no dump


# --- dtypes no backend takes ------------------------------------------------------------------------------------------

FLOAT8_CALLS = [
    ("soft_split", lambda x, b: soft_split(x, 3, 2, 1, backend=b)),
    ("soft_split_layer_norm", lambda x, b: soft_split_layer_norm(x, 3, 2, 1, backend=b)),
    ("soft_split_layer_norm_linear", lambda x, b: soft_split_layer_norm_linear(
        x, 3, 2, 1, None, None, torch.ones(4, 18).to(x.dtype), backend=b)),
    ("performer_attention", lambda x, b: performer_attention(x[0], x[0], x[0], x[0, 0, :4], 1e-8, backend=b)),
    ("post_attention", lambda x, b: post_attention(x[0, 0], x[0, 0], x[0, 0], None, None, None, x[0, 0], None,
                                                   x[0, 0], None, 1e-5, backend=b)),
    ("softmax_attention", lambda x, b: softmax_attention(x[0, :, :, :6], 2, backend=b)),
]


@pytest.mark.parametrize("backend", [None, "eager"], ids=["auto", "eager"])
@pytest.mark.parametrize("name,call", FLOAT8_CALLS, ids=[name for name, _ in FLOAT8_CALLS])
def test_float8_is_a_clear_error(name, call, backend):
    """float8 is floating point, but neither the kernels nor torch's unfold/matmul (the eager formulas) take it: the
    op says so up front rather than failing inside torch."""
    x = torch.randn(1, 2, 8, 8).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=rf"^{name}: .*float8_e4m3fn is not supported by backend 'eager'"):
        call(x, backend)
