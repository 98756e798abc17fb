"""The whole model on a GPU, against the truth: the fused backend ("auto": the CUDA soft split, Triton's split + norm
and Performer, the lean LayerNorm/GELU pairs, the class-token-only last block) and the official formulation
(backend="eager", official Performer formula), both on the GPU, in fp32 and under bf16 autocast, each checked against
a float64 CPU run of the eager backend (the package's reference formulas, the official math in float64): logits in
eval, logits and every parameter gradient in training.
Under autocast the fused model may not be further from the truth than the official one (whose Performer runs its
einsums in bf16). The first H100 run had no model-level GPU test: the benchmark times the fused model, this checks
it."""
import copy

import pytest
import torch
import torch.nn.functional as F

import t2t_kernels
from models.perturb import perturbed
from t2t_kernels.bench.cases import use_official_performer

pytestmark = pytest.mark.cuda

VARIANTS = ["t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14"]
# relative L2 errors against float64: fp32 kernels (no TF32: torch's default for fp32 matmuls), bf16 autocast
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2


def _model(name, img_size=224):
    torch.manual_seed(0)
    model = t2t_kernels.create_model(name, img_size=img_size, num_classes=100, backend="eager")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return perturbed(model, 0.02)


def _run(model, backend, x, labels, train, autocast, official=True, compiled=False):
    """(logits, {name: grad}) in float64 on the CPU (no grads in eval), from a copy of model on backend; eager with
    the official Performer formula unless official=False (float64: that formula computes in fp32). compiled: through
    torch.compile(fullgraph=True), a second call of the same shape without a recompile, the second call's results."""
    model = copy.deepcopy(model)
    model.set_backend(backend)
    if backend == "eager" and official:
        use_official_performer(model)
    model.train(train)
    def modes():
        return torch.set_grad_enabled(train), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast)

    run = model
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True)
        grad_mode, cast = modes()
        with grad_mode, cast:
            first = run(x)
        if train:
            F.cross_entropy(first.float(), labels).backward()
            model.zero_grad(set_to_none=True)
    grad_mode, cast = modes()
    with grad_mode, cast, torch._dynamo.config.patch(error_on_recompile=True):
        logits = run(x)
    grads = {}
    if train:
        F.cross_entropy(logits.float(), labels).backward()
        grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.double().cpu(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_against_float64(name, train, device, compiled=False, img_size=224):
    """Errors {(backend, autocast): relative L2 error of the logits (and, training, of all gradients)}, checked."""
    model = _model(name, img_size)
    x, labels = torch.randn(4, 3, img_size, img_size), torch.randint(0, 100, (4,))
    truth, truth_grads = _run(model.double(), "eager", x.double(), labels, train, autocast=False, official=False)
    model = model.float().to(device)
    x, labels = x.to(device), labels.to(device)
    errors = {}
    for autocast in (False, True):
        for backend in ("eager", "auto"):
            logits, grads = _run(model, backend, x, labels, train, autocast, compiled=compiled)
            assert torch.isfinite(logits).all()
            error = _rel(logits, truth)
            if train:
                assert grads.keys() == truth_grads.keys(), backend
                flat, flat_truth = (torch.cat([g[n].flatten() for n in sorted(truth_grads)])
                                    for g in (grads, truth_grads))
                error = max(error, _rel(flat, flat_truth))
            errors[(backend, autocast)] = error
    for backend in ("eager", "auto"):
        assert errors[(backend, False)] <= FP32_TOLERANCE, errors
        assert errors[(backend, True)] <= BF16_TOLERANCE, errors
    # under autocast: the fused model no further from the truth than the official one (with some slack)
    assert errors[("auto", True)] <= 1.5 * errors[("eager", True)] + 1e-3, errors
    return errors


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_and_official_models_on_the_gpu_match_float64(name, train):
    check_against_float64(name, train, "cuda")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiled_models_on_the_gpu_match_float64(train):
    """torch.compile(fullgraph=True) of the fused and the official model on the GPU (the Triton ops through their
    fake kernels, under compile the soft split + LayerNorm as inductor's code), in fp32 and under bf16 autocast: no
    graph break, no recompile on the second call, logits and gradients within the same tolerances of float64."""
    check_against_float64("t2t_vit_7", train, "cuda", compiled=True, img_size=96)
