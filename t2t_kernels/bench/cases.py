"""The benchmark cases, defined once: the CLI (`python -m t2t_kernels bench`) and the pytest-benchmark suites in
benchmarks/ build their workloads from here, so both time exactly the same thing.

A case is one thing to time (an op at one T2T stage and pass, or a model part and mode); its providers are the
implementations compared: for an op the official eager formulation ("eager"), each compiled backend of the op that
this device and dtype offer ("cpp", "cuda", "triton"), and torch.compile of the eager formulation ("compile"); for a
model the eager model (backend="eager"), ours (backend="auto", "fused"), torch.compile of each, and in train steps
the same with gradient checkpointing. ``Case.build(provider)`` returns a Workload: a zero-argument callable doing one
call (forward, forward+backward, or a full optimizer step) without any device sync; the runner adds the sync.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import BACKENDS as BACKEND_NAMES
from ..ops import (dropout_add, performer_attention, post_attention, soft_split, soft_split_layer_norm,
                   soft_split_layer_norm_linear, softmax_attention)
from ..ops._backends import OpBackends
from ..ops._onednn import onednn_linear_applies
from ..ops.dropout_add import BACKENDS as DROPOUT_ADD_BACKENDS
from ..ops.dropout_add import draw_seed
from ..ops.performer_attention import BACKENDS as PERFORMER_BACKENDS
from ..ops.post_attention import BACKENDS as POST_ATTENTION_BACKENDS
from ..ops.post_attention.reference import post_attention as post_attention_reference
from ..ops.softmax_attention import BACKENDS as SOFTMAX_ATTENTION_BACKENDS
from ..ops.softmax_attention.reference import softmax_attention as softmax_attention_reference
from ..ops.soft_split import BACKENDS as SOFT_SPLIT_BACKENDS
from ..ops.soft_split.reference import output_grid
from ..ops.soft_split.reference import soft_split as soft_split_reference
from ..ops.soft_split_layer_norm import BACKENDS as SOFT_SPLIT_LAYER_NORM_BACKENDS
from ..ops.soft_split_layer_norm import LINEAR_BACKENDS as SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS
from ..ops.soft_split_layer_norm.reference import soft_split_layer_norm as soft_split_layer_norm_reference

FORWARD, FORWARD_BACKWARD, TRAIN_STEP = "forward", "forward+backward", "train step"

# the official T2T module: soft split (kernel, stride, padding), input channels, downsampling of its input
SOFT_SPLIT_STAGES = {
    "stage0": dict(kernel=7, stride=4, padding=2, channels=None, down=1),  # channels None: the image's
    "stage1": dict(kernel=3, stride=2, padding=1, channels=64, down=4),
    "stage2": dict(kernel=3, stride=2, padding=1, channels=64, down=8),
}
PERFORMER_STAGES = {"stage1": 4, "stage2": 8}  # tokens of a (H/d, W/d) grid
PERFORMER_E, PERFORMER_M, PERFORMER_EPS = 64, 32, 1e-8
TIMM_REFERENCE = "vit_small_patch16_224"  # a plain ViT of T2T-ViT-14's size: the throughput to match on GPU


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures. ``dtype`` is the op input dtype and, for the models, the autocast dtype
    (float32: no autocast; the weights stay fp32 either way)."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    batch: int = 8
    img_size: tuple[int, int] = (224, 224)
    models: tuple[str, ...] = ("t2t_vit_14",)
    compile: bool = True
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode (e.g. "reduce-overhead": CUDA graphs for host-bound steps)
    checkpointing: bool = True
    timm: bool = False  # add timm's vit_small_patch16_224 (when timm imports)
    providers: tuple[str, ...] | None = None  # run only these providers (None: all)
    # the train steps' AdamW: "fused" (one kernel over all parameters, as examples/train.py steps) or "foreach"
    # (torch's default: a launch per chunk of tensors; the runs recorded before 2026-11-28 took it)
    optimizer: str = "fused"

    @classmethod
    def defaults(cls, device: str | torch.device | None = None, **overrides) -> "Settings":
        """CPU: T2T-ViT-14, fp32, B=8, 224 (issue 5's CPU target; minutes on 2 cores). GPU: T2T-ViT-7/14/24 and
        timm's ViT-S, bf16 autocast, B=128, 224."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = device.type == "cuda"
        base = dict(device=device, dtype=torch.bfloat16 if on_gpu else torch.float32, batch=128 if on_gpu else 8,
                    models=("t2t_vit_7", "t2t_vit_14", "t2t_vit_24") if on_gpu else ("t2t_vit_14",), timm=on_gpu)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(base.get("img_size"), int):
            base["img_size"] = (base["img_size"], base["img_size"])
        return cls(**base)

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype), "batch": self.batch,
                "img_size": list(self.img_size), "models": list(self.models), "compile": self.compile,
                "compile_backend": self.compile_backend, "compile_mode": self.compile_mode,
                "checkpointing": self.checkpointing, "timm": self.timm, "optimizer": self.optimizer,
                **({"providers": list(self.providers)} if self.providers else {})}


@dataclass
class Provider:
    name: str
    reason: str | None = None  # set: the provider is skipped, and this says why
    note: str = ""


def skip_reason(settings: Settings, provider: Provider) -> str | None:
    """Why the run skips this provider (None: it runs): its own reason, or not among --providers."""
    if provider.reason or settings.providers is None or provider.name in settings.providers:
        return provider.reason
    return "not selected (--providers)"


@dataclass
class Workload:
    """One call of a provider on a case. ``probe`` (optional) runs only the forward of a call that has a backward and
    returns what keeps its graph alive, so the runner can measure the activation memory held for backward.
    ``state_bytes``: parameters + gradients + optimizer state of a train step (allocated before the step)."""

    step: Callable[[], object]
    probe: Callable[[], object] | None = None
    state_bytes: Callable[[], int] | None = None

    def __call__(self):
        return self.step()


def compiled(fn, settings: Settings):
    # the benchmarks compile one function at many shapes (stages, passes, dtypes): allow the graphs
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    # dynamic=False: every stage shape gets its own static graph (automatic dynamic shapes would otherwise switch
    # the second shape to a symbolic-shape graph and time that instead)
    return torch.compile(fn, backend=settings.compile_backend, mode=settings.compile_mode, dynamic=False)


def compile_note(settings: Settings, what: str = "") -> str:
    mode = f", mode={settings.compile_mode!r}" if settings.compile_mode else ""
    return f"torch.compile({settings.compile_backend}{mode}){what}"


def unmeasured_memory_reason(settings: Settings, provider: str) -> str | None:
    """Why a provider's memory is not measured (None: it is): CUDA graphs (reduce-overhead, max-autotune) allocate
    in their own pool while recording, so a replay allocates next to nothing (an H100 run read 83 MB peak, 0.5 MB of
    activations for T2T-ViT-14's train step at B=128)."""
    if settings.device.type == "cuda" and provider.startswith("compile") and \
            settings.compile_mode in ("reduce-overhead", "max-autotune"):
        return f"not measured: compile mode {settings.compile_mode!r} replays CUDA graphs from a pool it allocated " \
               "while recording"
    return None


def _compile_reason(settings: Settings) -> str | None:
    return None if settings.compile else "torch.compile providers are off (--no-compile)"


def op_backend_reason(backends: OpBackends, name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend `name` of an op is not benchmarked here (None: it is)."""
    reason = backends.unavailable_reason(name, device, dtype)
    if reason is None and name == "triton" and device.type == "cpu":
        return "triton on cpu is the TRITON_INTERPRET=1 interpreter, a correctness tool that is not worth timing"
    return reason


# ---- op cases --------------------------------------------------------------------------------------------------
class Case:
    kind = "op"
    baseline = "eager"  # speedups are against this provider ...
    compiled_baseline = "compile"  # ... and against this one

    def __init__(self, settings: Settings, name: str, group: str):
        self.settings, self.name, self.group = settings, name, group

    items_per_call: int | None = None  # images per call: model cases report images/s

    def providers(self) -> list[Provider]:
        raise NotImplementedError

    def build(self, provider: str) -> Workload:
        raise NotImplementedError

    def byte_floor(self) -> int | None:
        """Bytes no implementation can avoid moving (read inputs once, write outputs once), or None."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class OpCase(Case):
    """One fused op at one T2T stage and pass; providers: official eager, each available backend, compile."""

    backends: OpBackends
    passes = (FORWARD, FORWARD_BACKWARD)  # the passes op_cases makes of this op

    def __init__(self, settings, op, stage, pass_):
        self.op, self.stage, self.pass_ = op, stage, pass_
        super().__init__(settings, f"{op}/{stage}/{pass_}", f"{op} {stage} {self.shape_text()} {pass_}")

    def providers(self):
        s = self.settings
        out = [Provider("eager", note="official formulation")]
        for name in BACKEND_NAMES:
            if name != "eager":
                out.append(Provider(name, op_backend_reason(self.backends, name, s.device, s.dtype)))
        out.append(Provider("compile", _compile_reason(s), note=compile_note(s, " of eager")))
        return out

    def build(self, provider):
        fn = self.official
        if provider == "compile":
            fn = compiled(self.official, self.settings)
        elif provider != "eager":
            fn = self.backend_fn(provider)
        return self.workload(fn)

    @property
    def backward(self) -> bool:
        return self.pass_ == FORWARD_BACKWARD

    def workload(self, fn) -> Workload:
        raise NotImplementedError

    def pass_workload(self, call, leaves=(), grad=None) -> Workload:
        """The case's pass of call(): under no_grad for the forward; for forward+backward call().backward(grad)
        with the leaves' gradients cleared first, and call as the probe of the activations kept for backward."""
        if not self.backward:
            def step():
                with torch.no_grad():
                    return call()
            return Workload(step)

        def step():
            for leaf in leaves:
                leaf.grad = None
            call().backward(grad)

        return Workload(step, probe=call)


class SoftSplitCase(OpCase):
    """soft_split at a T2T stage: stage0 reads the image, stages 1-2 the tokens (B, N, 64) seen as an image through
    the free transpose view (the model's input, not contiguous). Eager is the official F.unfold + transpose, made
    contiguous as the LayerNorm after it does."""

    backends = SOFT_SPLIT_BACKENDS
    op_name = "soft_split"

    def __init__(self, settings, stage, pass_):
        cfg = SOFT_SPLIT_STAGES[stage]
        self.k, self.s, self.p = cfg["kernel"], cfg["stride"], cfg["padding"]
        H, W = settings.img_size
        self.channels = cfg["channels"] or 3
        self.hw = (H // cfg["down"], W // cfg["down"])
        self.out_hw = output_grid(self.hw, (self.k, self.k), (self.s, self.s), (self.p, self.p))
        super().__init__(settings, self.op_name, stage, pass_)

    def shape_text(self):
        return f"(C={self.channels}, {self.hw[0]}x{self.hw[1]}, k{self.k} s{self.s} p{self.p})"

    official = staticmethod(soft_split_reference)  # F.unfold + transpose, made contiguous

    def backend_fn(self, backend):
        return lambda x, k, s, p: soft_split(x, k, s, p, backend=backend)

    def byte_floor(self):
        B, item = self.settings.batch, self.settings.dtype.itemsize
        x = B * self.channels * self.hw[0] * self.hw[1] * item
        out = B * self.out_hw[0] * self.out_hw[1] * self.channels * self.k * self.k * item
        return (x + out) * (2 if self.backward else 1)  # backward: read grad_out, write grad_x

    def workload(self, fn):
        s, (h, w) = self.settings, self.hw
        B, C = s.batch, self.channels
        if self.stage == "stage0":
            leaf = torch.randn(B, C, h, w, device=s.device, dtype=s.dtype)
            as_image = lambda t: t  # noqa: E731
        else:
            leaf = torch.randn(B, h * w, C, device=s.device, dtype=s.dtype)
            as_image = lambda t: t.transpose(1, 2).reshape(B, C, h, w)  # noqa: E731  (a view, as in the model)
        args = (self.k, self.s, self.p)
        grad_out = None
        if self.backward:
            leaf.requires_grad_(True)
            grad_out = torch.randn(B, self.out_hw[0] * self.out_hw[1], C * self.k * self.k, device=s.device,
                                   dtype=s.dtype)
        return self.pass_workload(lambda: fn(as_image(leaf), *args), (leaf,), grad_out)


class SoftSplitLayerNormCase(SoftSplitCase):
    """The soft splits of stages 0 and 1 with the LayerNorm that follows each (norm1 of the next T2T layer). Eager is
    the official F.unfold + transpose then F.layer_norm; the backends run the fused soft_split_layer_norm op. Its byte
    floor is the soft split's (read x, write the normalised tokens)."""

    backends = SOFT_SPLIT_LAYER_NORM_BACKENDS
    op_name = "soft_split+layer_norm"

    def __init__(self, settings, stage, pass_):
        super().__init__(settings, stage, pass_)
        features = self.channels * self.k * self.k
        g = torch.Generator().manual_seed(0)  # a trained-looking affine, not the identity
        self.norm_weight = (1 + 0.1 * torch.randn(features, generator=g)).to(settings.device, settings.dtype)
        self.norm_bias = (0.1 * torch.randn(features, generator=g)).to(settings.device, settings.dtype)
        if self.backward:
            self.norm_weight.requires_grad_(True)
            self.norm_bias.requires_grad_(True)

    def official(self, x, k, s, p):
        return soft_split_layer_norm_reference(x, k, s, p, self.norm_weight, self.norm_bias, 1e-5)

    def backend_fn(self, backend):
        return lambda x, k, s, p: soft_split_layer_norm(x, k, s, p, self.norm_weight, self.norm_bias, 1e-5,
                                                        backend=backend)


class SoftSplitLayerNormLinearCase(SoftSplitLayerNormCase):
    """Stages 0 and 1 from the soft split's input to the next T2T layer's kqv product (192 wide), forward: eager is
    the official F.unfold + transpose, F.layer_norm and F.linear; the backends run soft_split_layer_norm_linear (cpp:
    the fused kernel, whose normalised tokens never reach memory). Byte floor: read x, write the product."""

    backends = SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS
    op_name = "soft_split+layer_norm+linear"
    passes = (FORWARD,)  # the layers run the op for inference only (its backward recomputes the eager formula)

    def __init__(self, settings, stage, pass_):
        super().__init__(settings, stage, pass_)
        features, width = self.channels * self.k * self.k, 3 * PERFORMER_E
        g = torch.Generator().manual_seed(1)
        self.weight = (torch.randn(width, features, generator=g) / features**0.5).to(settings.device, settings.dtype)
        self.bias = (0.1 * torch.randn(width, generator=g)).to(settings.device, settings.dtype)

    def official(self, x, k, s, p):
        return F.linear(super().official(x, k, s, p), self.weight, self.bias)

    def backend_fn(self, backend):
        return lambda x, k, s, p: soft_split_layer_norm_linear(x, k, s, p, self.norm_weight, self.norm_bias,
                                                               self.weight, self.bias, 1e-5, backend=backend)

    def byte_floor(self):
        B, item = self.settings.batch, self.settings.dtype.itemsize
        x = B * self.channels * self.hw[0] * self.hw[1] * item
        return x + B * self.out_hw[0] * self.out_hw[1] * self.weight.shape[0] * item


def stage_tokens(settings: Settings, stage: str) -> int:
    """Tokens per image of a T2T token layer's stage: the (H/d, W/d) grid."""
    H, W = settings.img_size
    d = PERFORMER_STAGES[stage]
    return (H // d) * (W // d)


class PerformerCase(OpCase):
    """performer_attention at a T2T stage: q, k, v are thirds of one kqv output (B, T, 192), as the model makes
    them; eager is the official Token_performer formula (reference.performer_attention_official)."""

    backends = PERFORMER_BACKENDS

    def __init__(self, settings, stage, pass_):
        self.T = stage_tokens(settings, stage)
        super().__init__(settings, "performer_attention", stage, pass_)

    def shape_text(self):
        return f"(T={self.T}, E={PERFORMER_E}, m={PERFORMER_M})"

    @staticmethod
    def official(q, k, v, w, eps):
        from ..ops.performer_attention.reference import performer_attention_official

        return performer_attention_official(q, k, v, w, eps)

    def backend_fn(self, backend):
        return lambda q, k, v, w, eps: performer_attention(q, k, v, w, eps=eps, backend=backend)

    def byte_floor(self):
        tensor = self.settings.batch * self.T * PERFORMER_E * self.settings.dtype.itemsize
        # forward reads q, k, v and writes y; backward reads q, k, v, g and writes gq, gk, gv
        return tensor * (4 + 7 if self.backward else 4)

    def workload(self, fn):
        s, E = self.settings, PERFORMER_E
        kqv = (0.5 * torch.randn(s.batch, self.T, 3 * E, device=s.device)).to(s.dtype)
        w = torch.nn.init.orthogonal_(torch.empty(PERFORMER_M, E)).mul_(math.sqrt(PERFORMER_M)).to(s.device)

        def call():
            k, q, v = kqv.split(E, dim=-1)  # the official split order
            return fn(q, k, v, w, PERFORMER_EPS)

        grad_y = None
        if self.backward:
            kqv.requires_grad_(True)
            grad_y = torch.randn(s.batch, self.T, E, device=s.device, dtype=s.dtype)
        return self.pass_workload(call, (kqv,), grad_y)


# post_attention's stages: the T2T layers' (64 wide, hidden 64) and a T2T-ViT-14 block's (384 wide, hidden 1152, on
# the (H/16, W/16) grid and the class token), whose weights take the kernel's wide path
POST_ATTENTION_STAGES = ("stage1", "stage2", "backbone")
BACKBONE_E, BACKBONE_HIDDEN = 384, 1152


class PostAttentionCase(OpCase):
    """post_attention after a layer's attention (forward: the model uses it for inference only). T2T stages: y
    (B, T, 64) and the skip v, a column slice of the kqv output (B, T, 192) as in Token_performer, through proj, norm2
    and the 64-64-64 GELU MLP. backbone: y and the skip (B, T, 384) through the 384-1152-384 MLP. Eager is the layers'
    own chain (F.linear, F.layer_norm, F.gelu)."""

    backends = POST_ATTENTION_BACKENDS
    passes = (FORWARD,)

    def __init__(self, settings, stage, pass_):
        if stage == "backbone":
            H, W = settings.img_size
            self.T, self.E, self.hidden = (H // 16) * (W // 16) + 1, BACKBONE_E, BACKBONE_HIDDEN
        else:
            self.T, self.E, self.hidden = stage_tokens(settings, stage), PERFORMER_E, PERFORMER_E
        super().__init__(settings, "post_attention", stage, pass_)

    def shape_text(self):
        return f"(T={self.T}, E={self.E}, hidden={self.hidden})"

    @staticmethod
    def official(y, skip, *params, eps):
        return post_attention_reference(y, skip, *params, eps)

    def backend_fn(self, backend):
        return lambda y, skip, *params, eps: post_attention(y, skip, *params, eps=eps, backend=backend)

    def byte_floor(self):
        weights = (self.E * self.E + 2 * self.E * self.hidden) * self.settings.dtype.itemsize
        return 3 * self.settings.batch * self.T * self.E * self.settings.dtype.itemsize + weights  # y, skip, out

    def workload(self, fn):
        s, E, hidden = self.settings, self.E, self.hidden
        g = torch.Generator().manual_seed(0)
        y = torch.randn(s.batch, self.T, E, generator=g).to(s.device, s.dtype)
        kqv = torch.randn(s.batch, self.T, 3 * E, generator=g).to(s.device, s.dtype)
        # the skip: v in a T2T layer, the block's own input (contiguous) in the backbone
        skip = kqv[..., 2 * E:] if self.stage != "backbone" else kqv[..., :E].contiguous()
        # proj, fc1, fc2 at nn.Linear's init
        linears = [torch.nn.Linear(E, E), torch.nn.Linear(E, hidden), torch.nn.Linear(hidden, E)]
        norm = (1 + 0.1 * torch.randn(E, generator=g), 0.1 * torch.randn(E, generator=g))
        proj, fc1, fc2 = ((m.weight.detach().to(s.device, s.dtype), m.bias.detach().to(s.device, s.dtype))
                          for m in linears)
        params = (*proj, *(t.to(s.device, s.dtype) for t in norm), *fc1, *fc2)
        return self.pass_workload(lambda: fn(y, skip, *params, eps=1e-5))


class SoftmaxAttentionCase(OpCase):
    """softmax_attention in a T2T-ViT-14 block: qkv (B, T, 3*384) from the qkv projection, 6 heads of 64 on the
    (H/16, W/16) grid and the class token; forward (inference) and forward + backward (training: the gradient of qkv).
    Eager is what the model's eager backend runs, F.scaled_dot_product_attention on the heads' views, with autograd's
    stack and copy of their gradients into qkv's (the official formula written out, q k^T, softmax, @ v, is ~3x
    slower on a CPU: not the baseline here)."""

    backends = SOFTMAX_ATTENTION_BACKENDS
    heads = 6

    def __init__(self, settings, stage, pass_):
        H, W = settings.img_size
        self.T = (H // 16) * (W // 16) + 1
        super().__init__(settings, "softmax_attention", stage, pass_)

    def shape_text(self):
        return f"(T={self.T}, heads={self.heads}x{BACKBONE_E // self.heads})"

    @classmethod
    def official(cls, qkv):
        return softmax_attention_reference(qkv, cls.heads, (BACKBONE_E // cls.heads) ** -0.5)

    def backend_fn(self, backend):
        return lambda qkv: softmax_attention(qkv, self.heads, backend=backend)

    def byte_floor(self):
        # qkv, out; backward: the gradient of out read, qkv read again, its gradient written
        widths = 4 + (1 + 3 + 3 if self.backward else 0)
        return widths * self.settings.batch * self.T * BACKBONE_E * self.settings.dtype.itemsize

    def workload(self, fn):
        s = self.settings
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(s.batch, self.T, 3 * BACKBONE_E, generator=g).to(s.device, s.dtype)
        grad = None
        if self.backward:
            qkv.requires_grad_(True)
            grad = torch.randn(s.batch, self.T, BACKBONE_E, generator=g).to(s.device, s.dtype)
        return self.pass_workload(lambda: fn(qkv), (qkv,), grad)


class DropoutAddCase(OpCase):
    """dropout_add in a T2T layer's training step: a Performer layer's residual dropout (the official hard-coded
    p = 0.1) of x (B, T, 64) onto the skip. Eager is the official skip + F.dropout(x) (torch's Bernoulli draw); the
    backends draw a seed from torch's generator per call, as the layers do."""

    backends = DROPOUT_ADD_BACKENDS
    p = 0.1

    def __init__(self, settings, stage, pass_):
        self.T = stage_tokens(settings, stage)
        super().__init__(settings, "dropout_add", stage, pass_)

    def shape_text(self):
        return f"(T={self.T}, E={PERFORMER_E}, p={self.p})"

    @classmethod
    def official(cls, x, skip):
        return skip + F.dropout(x, cls.p, training=True)

    def backend_fn(self, backend):
        return lambda x, skip: dropout_add(x, skip, self.p, draw_seed(), backend=backend)

    def byte_floor(self):
        tensor = self.settings.batch * self.T * PERFORMER_E * self.settings.dtype.itemsize
        return tensor * (3 + 2 if self.backward else 3)  # x, skip, out; backward: read the gradient, write x's

    def workload(self, fn):
        s = self.settings
        g = torch.Generator().manual_seed(0)
        x, skip = (torch.randn(s.batch, self.T, PERFORMER_E, generator=g).to(s.device, s.dtype) for _ in range(2))
        grad = None
        if self.backward:
            x.requires_grad_(True)
            skip.requires_grad_(True)
            grad = torch.randn(s.batch, self.T, PERFORMER_E, device=s.device, dtype=s.dtype)
        return self.pass_workload(lambda: fn(x, skip), (x, skip), grad)


def op_cases(settings: Settings, ops=("soft_split", "performer_attention"), passes=(FORWARD, FORWARD_BACKWARD)):
    kinds = {SoftSplitCase.op_name: (SoftSplitCase, SOFT_SPLIT_STAGES),
             SoftSplitLayerNormCase.op_name: (SoftSplitLayerNormCase, ("stage0", "stage1")),  # a LayerNorm follows
             SoftSplitLayerNormLinearCase.op_name: (SoftSplitLayerNormLinearCase, ("stage0", "stage1")),
             "performer_attention": (PerformerCase, PERFORMER_STAGES),
             "post_attention": (PostAttentionCase, POST_ATTENTION_STAGES),
             "softmax_attention": (SoftmaxAttentionCase, ("backbone",)),
             "dropout_add": (DropoutAddCase, tuple(PERFORMER_STAGES))}
    cases = []
    for op in ops:
        if op not in kinds:
            raise ValueError(f"ops: unknown op {op!r}; choose from {sorted(kinds)}")
        cls, stages = kinds[op]
        cases += [cls(settings, stage, pass_) for stage in stages for pass_ in passes
                  if pass_ in cls.passes]
    return cases


# the train steps' AdamW implementations (Settings.optimizer)
OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}}


# ---- model cases -----------------------------------------------------------------------------------------------
def autocast(settings: Settings):
    enabled = settings.dtype != torch.float32
    return torch.autocast(settings.device.type, dtype=settings.dtype, enabled=enabled)


def _train_step(module, images, loss_fn, settings: Settings) -> Workload:
    """AdamW step: zero grads (set to None), forward + loss under autocast, backward, step (fp16: GradScaler)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **OPTIMIZERS[settings.optimizer])
    scaler = torch.amp.GradScaler(settings.device.type) if settings.dtype == torch.float16 else None

    def forward_loss():
        with autocast(settings):
            return loss_fn(module(images))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss

    def state_bytes():
        # params + grads + AdamW's two moments (+ step): exists before each step once the first one ran
        tensors = list(module.parameters()) + [p.grad for p in params if p.grad is not None]
        tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    return Workload(step, probe=forward_loss, state_bytes=state_bytes)


def _forward(module, images, settings: Settings) -> Workload:
    def step():
        with torch.no_grad(), autocast(settings):
            return module(images)

    return Workload(step)


def _official_single_attn(self, x):
    # Token_performer.single_attn of the official code: its prm_exp / einsum formula, where autocast applies to the
    # einsums as it does there (reference.performer_attention_official is that formula, op for op)
    from ..ops.performer_attention.reference import performer_attention_official

    k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
    y = performer_attention_official(q, k, v, self.w, self.epsilon)
    return v + self.dp(self.proj(y))


def use_official_performer(model) -> None:
    """Makes a backend="eager" model compute like the official code: its Token_performer layers run the official
    attention formula instead of the package's fp32 reference (the same numbers in fp32; under autocast the official
    einsums run in the autocast dtype, which is what the official code's speed and its fp16 overflow come from).
    The soft splits of backend="eager" are already the official F.unfold + transpose."""
    from ..layers.t2t import Token_performer

    for module in model.modules():
        if isinstance(module, Token_performer):
            module.single_attn = types.MethodType(_official_single_attn, module)


class ModelCase(Case):
    """A T2T-ViT variant, whole or only its T2T module (``part="t2t_module"``), forward (eval, no grad) or train step
    (AdamW). Providers: eager (the official formulation: backend="eager" with the official Performer formula),
    fused (backend="auto"), torch.compile of each; train steps also eager+ckpt and fused+ckpt
    (set_grad_checkpointing(True)) for the activation memory."""

    kind = "model"
    compiled_baseline = "compile-eager"

    def __init__(self, settings, model, part, mode):
        self.model, self.part, self.mode = model, part, mode
        label = model if part == "model" else f"{model}.tokens_to_token"
        H, W = settings.img_size
        super().__init__(settings, f"{label}/{mode}", f"{label} {mode} (B={settings.batch}, {H}x{W})")
        self.items_per_call = settings.batch

    def providers(self):
        s = self.settings
        out = [Provider("eager", note='backend="eager" with the official Performer formula (the official code, '
                                          'softmax attention through SDPA)'),
               Provider("fused", note=f'backend="auto": {self.auto_text()}')]
        for base in ("eager", "fused"):
            out.append(Provider(f"compile-{base}", _compile_reason(s), note=compile_note(s)))
        if self.mode == TRAIN_STEP:
            for base in ("eager", "fused"):
                reason = None if s.checkpointing else "gradient checkpointing providers are off (--no-checkpointing)"
                out.append(Provider(f"{base}+ckpt", reason, note="set_grad_checkpointing(True)"))
        return out

    def auto_text(self) -> str:
        """Which backend "auto" picks for each op on this device and dtype, and what else the fused model does."""
        probe = torch.empty(0, device=self.settings.device, dtype=self.settings.dtype)
        trained = (SOFT_SPLIT_BACKENDS, SOFT_SPLIT_LAYER_NORM_BACKENDS, PERFORMER_BACKENDS)
        ops = ", ".join(f"{b.name} {b.resolve('auto', probe)}" for b in trained)
        inference = ", ".join(f"{b.name} {b.resolve('auto', probe)}"
                              for b in (POST_ATTENTION_BACKENDS, SOFTMAX_ATTENTION_BACKENDS))
        text = f"{ops}, {inference} (inference)"
        device = probe.device.type
        inductor = [b.name for b in trained
                    if b.auto_candidates(device, False) and not b.auto_candidates(device, True)]
        if onednn_linear_applies(probe):
            text += "; the products before the inference ops (and the wide post_attention's) through oneDNN's linear"
        if inductor:
            text += f"; under torch.compile {', '.join(inductor)} as the eager formula (inductor's code)"
        return text + "; the whole model runs its last block for the class token alone"

    def make_model(self):
        # the same weights for every provider; building (the trunc-normal init) costs more than a copy
        return copy.deepcopy(_initial_model(self.model, tuple(self.settings.img_size)))

    def build(self, provider):
        offered = [p.name for p in self.providers()]
        if provider not in offered:  # the name parsing below would take any name for one of these
            raise ValueError(f"{self.name}: unknown provider {provider!r}; choose from {offered}")
        s = self.settings
        model = self.make_model().to(s.device)
        base = provider.removeprefix("compile-").removesuffix("+ckpt")
        model.set_backend("eager" if base == "eager" else "auto")
        if base == "eager":
            use_official_performer(model)
        if provider.endswith("+ckpt"):
            model.set_grad_checkpointing(True)
        module = model if self.part == "model" else model.tokens_to_token
        if provider.startswith("compile-"):
            module = compiled(module, s)
        return self.workload(model, module)

    def workload(self, model, module):
        s = self.settings
        torch.manual_seed(1)
        images = torch.randn(s.batch, 3, *s.img_size, device=s.device)
        if self.mode == FORWARD:
            model.eval()
            return _forward(module, images, s)
        model.train()
        if self.part == "model":
            labels = torch.randint(0, model.num_classes, (s.batch,), device=s.device)
            loss_fn = lambda out: F.cross_entropy(out.float(), labels)  # noqa: E731
        else:
            loss_fn = lambda out: out.float().square().mean()  # noqa: E731
        return _train_step(module, images, loss_fn, s)


class TimmCase(ModelCase):
    """timm's vit_small_patch16_224 (22M parameters, like T2T-ViT-14): the plain-ViT throughput to compare with."""

    def __init__(self, settings, mode):
        super().__init__(settings, TIMM_REFERENCE, "model", mode)
        self.name, self.group = f"timm.{self.name}", f"timm.{self.group}"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            import timm  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return f"timm is not importable ({type(err).__name__}: {err})"
        return None

    def providers(self):
        reason = self.unavailable_reason()
        s = self.settings
        out = [Provider("eager", reason), Provider("compile-eager", reason or _compile_reason(s),
                                                   note=compile_note(s))]
        if self.mode == TRAIN_STEP:
            out.append(Provider("eager+ckpt", reason or (None if s.checkpointing else "checkpointing is off"),
                                note="set_grad_checkpointing(True)"))
        return out

    def make_model(self):
        import timm

        torch.manual_seed(0)
        model = timm.create_model(TIMM_REFERENCE, pretrained=False, img_size=self.settings.img_size)
        model.set_backend = lambda backend: None
        return model


@functools.lru_cache(maxsize=1)
def _initial_model(name: str, img_size: tuple[int, int]):
    from .. import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(name, img_size=img_size, backend="eager")


def model_cases(settings: Settings, parts=("t2t_module", "model"), modes=(FORWARD, TRAIN_STEP)):
    cases = [ModelCase(settings, m, part, mode) for m in settings.models for part in parts for mode in modes]
    if settings.timm and "model" in parts:
        cases += [TimmCase(settings, mode) for mode in modes]
    return cases


def all_cases(settings: Settings, ops: bool = True, models: bool = True) -> list[Case]:
    return (op_cases(settings) if ops else []) + (model_cases(settings) if models else [])


def env_settings(**overrides) -> Settings:
    """Settings of the pytest suites: defaults per device, overridable by T2T_BENCH_DEVICE, T2T_BENCH_BATCH,
    T2T_BENCH_IMG, T2T_BENCH_DTYPE, T2T_BENCH_MODELS (comma list), T2T_BENCH_COMPILE_BACKEND, each spelt as the
    CLI's option (T2T_BENCH_DTYPE=bf16, T2T_BENCH_IMG=224,320) and parsed by the CLI's own parsers."""
    from ..__main__ import _count, _device, _img_size
    from .cli import DTYPES, _models

    def dtype(text):
        if text not in DTYPES:
            raise ValueError(f"choose from {sorted(DTYPES)}")
        return DTYPES[text]

    def parse(name, parser):
        text = os.environ.get(name)
        if not text:
            return None
        try:
            return parser(text)
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"{name}={text!r}: {err}") from err

    kw = dict(device=parse("T2T_BENCH_DEVICE", _device), batch=parse("T2T_BENCH_BATCH", _count(1, "positive")),
              img_size=parse("T2T_BENCH_IMG", _img_size), dtype=parse("T2T_BENCH_DTYPE", dtype),
              models=parse("T2T_BENCH_MODELS", _models), compile_backend=os.environ.get("T2T_BENCH_COMPILE_BACKEND"))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.defaults(kw.pop("device"), **kw)


__all__ = ["Settings", "Provider", "Workload", "Case", "OpCase", "SoftSplitCase", "PerformerCase", "ModelCase",
           "TimmCase", "op_cases", "model_cases", "all_cases", "env_settings", "FORWARD", "FORWARD_BACKWARD",
           "TRAIN_STEP", "dtype_name"]
