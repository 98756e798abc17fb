"""Backbone pieces of the official T2T-ViT (models/transformer_block.py): Mlp, Attention, Block, DropPath."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import DROPOUT_ADD_BACKENDS, dropout_add, post_attention, softmax_attention
from ..ops._backends import check_backend_arg
from ..ops._onednn import linear
from ..ops.dropout_add import draw_seed
from ..ops.softmax_attention import backward_kernel_applies
from ..ops._registry import grad_enabled_for_path, needs_eager_autodiff
from .recompute import gelu_linear, is_last_dim_layer_norm, norm_linear, recomputes, run_checkpointed


def maybe_checkpoint(enabled: bool, layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x), recomputed in backward instead of keeping its activations when enabled (and grads are needed).
    Non-reentrant checkpointing also covers an x that needs no gradient (the image into the first T2T layer)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(partial(run_checkpointed, layer), x, use_reentrant=False)
    return layer(x)


@torch.no_grad()
def fill_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """param.copy_(value) for a whole value, also where param is a DTensor (sharded by FSDP2): every rank computed
    the whole value, each keeps its shard."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


def runs_as_defined(module: nn.Module) -> bool:
    """Whether calling module runs its class's forward as written: no hooks on it (nor global module hooks), no
    forward set on the instance (accelerate's offload hooks), not compiled on its own (Module.compile)."""
    return not _global_module_hooks() and _own_forward_as_defined(module)


def submodules_run_as_defined(layer: nn.Module) -> bool:
    """Whether every module inside layer (not layer itself) runs as defined. The fused and lean paths of a layer
    read its submodules' parameters without calling them, so they apply only then: otherwise the submodules' hooks
    would not fire, and spectral_norm's or the old weight_norm's pre-hooks would not recompute their weights."""
    return not _global_module_hooks() and all(map(_own_forward_as_defined, _submodules(layer)))


def _submodules(layer: nn.Module):
    """The modules inside layer, each once (what layer.modules() yields after layer itself, without its name
    bookkeeping: this runs in every block's forward, and a GPU train step waits on the host)."""
    seen, stack = {id(layer)}, [layer]
    while stack:
        for child in stack.pop()._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
                yield child


def _own_forward_as_defined(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or getattr(module, "_compiled_call_impl", None) is not None)


def _global_module_hooks() -> bool:  # nn.modules.module.register_module_forward_hook and the like
    hooks = nn.modules.module
    return any(getattr(hooks, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                       "_global_backward_hooks", "_global_backward_pre_hooks"))


def fuses_post_attention(backend, x: torch.Tensor, proj: nn.Module, norm: nn.Module, mlp_fc1: nn.Module,
                         act: nn.Module, mlp_fc2: nn.Module, training: bool, dropouts: tuple[nn.Module, ...]) -> bool:
    """Whether a layer runs skip + proj(y) and its residual MLP on norm as the fused post_attention op: on the
    backends whose ops are CPU kernels (auto, cpp), in the official shape (nn.Linear, LayerNorm, exact GELU), with
    every dropout and drop-path inactive, one dtype throughout (no autocast), and no gradient wanted (the op's
    backward recomputes the chain in eager, so training keeps the unfused layers). Anything else runs unfused.

    dropouts: the dropout and drop-path modules in that part of the layer: exactly nn.Dropout, DropPath or
    nn.Identity (a subclass, e.g. dropout kept on in eval for Monte-Carlo sampling, runs unfused), with p = 0 or
    off when not training."""
    if backend not in (None, "auto", "cpp") or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if grad_enabled_for_path() and x.requires_grad:  # the cheap half of the last check, first (training)
        return False
    linears = (proj, mlp_fc1, mlp_fc2)
    if not (all(type(m) is nn.Linear for m in linears) and is_last_dim_layer_norm(norm)
            and type(act) is nn.GELU and act.approximate == "none"):
        return False
    if not all(type(d) in (nn.Dropout, DropPath, nn.Identity) for d in dropouts):
        return False
    if training and any(getattr(d, "p", getattr(d, "drop_prob", 0.0)) > 0 for d in dropouts):
        return False
    # the exact classes hold just these (read directly: module.parameters() costs host time in every layer call)
    params = [p for m in (*linears, norm) for p in (m.weight, m.bias) if p is not None]
    if any(p.dtype != x.dtype for p in params):
        return False
    return not (grad_enabled_for_path() and (x.requires_grad or any(p.requires_grad for p in params)))


def inference_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) in a fused inference path (whose callers checked that the layer's submodules run as defined): an
    exact nn.Linear through ops._onednn.linear (oneDNN's GEMM for float32 on the CPU where it is on), anything else
    called."""
    return linear(x, module.weight, module.bias) if type(module) is nn.Linear else module(x)


def fused_post_attention(y: torch.Tensor, skip: torch.Tensor, proj: nn.Linear, norm: nn.LayerNorm,
                         mlp_fc1: nn.Linear, mlp_fc2: nn.Linear) -> torch.Tensor:
    """skip + proj(y), then x + mlp_fc2(gelu(mlp_fc1(norm(x)))), as one op (callers check fuses_post_attention)."""
    return post_attention(y, skip, proj.weight, proj.bias, norm.weight, norm.bias, mlp_fc1.weight, mlp_fc1.bias,
                          mlp_fc2.weight, mlp_fc2.bias, norm.eps)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch of a sample with probability drop_prob."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep == 0.0:  # every sample dropped: x / 0 would turn the zeros into NaN
        return x * mask
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def residual_dropout(skip: torch.Tensor, x: torch.Tensor, dropout: nn.Module, backend: str | None) -> torch.Tensor:
    """skip + dropout(x). An active nn.Dropout (training, 0 < p < 1) on CPU tensors of the CPU backends runs as the
    dropout_add op: one pass for F.dropout's Bernoulli draw, division and product and the sum, no mask kept for
    backward. Its seed comes from torch's generator, so torch.manual_seed and checkpointing's RNG replay hold; its
    masks are not F.dropout's draws (the same distribution). Under torch.compile the graph draws the seed (from
    inductor's generator, as it would nn.Dropout's mask) and calls the op: inductor's own CPU dropout is slower than
    the eager one. The module runs instead under torch.jit.trace and torch.func transforms or forward-mode AD (vmap's
    randomness options apply to torch's random ops)."""
    if (type(dropout) is nn.Dropout and dropout.training and 0.0 < dropout.p < 1.0 and backend in (None, "auto", "cpp")
            and x.device.type == "cpu" and x.shape == skip.shape and x.dtype == skip.dtype
            and not torch.jit.is_tracing()
            and not needs_eager_autodiff(x, skip) and DROPOUT_ADD_BACKENDS.resolve("auto", x) == "cpp"):
        return dropout_add(x, skip, dropout.p, draw_seed(), backend="cpp")
    return skip + dropout(x)


def mlp_after_fc1(mlp: Mlp | nn.Sequential, h: torch.Tensor, training: bool, skip: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """The rest of an Mlp (fc1, act, drop, fc2, drop) or of the T2T layers' Sequential (fc1, GELU, fc2, Dropout) after
    fc1, in training: GELU -> fc2 keeps fc1's output for backward, not the GELU's, where they are adjacent (exact GELU,
    no active dropout between them). With skip: skip + that, its last dropout and the sum as residual_dropout."""
    if isinstance(mlp, Mlp):
        act, fc2, drops = mlp.act, mlp.fc2, (mlp.drop, mlp.drop)
    else:
        _, act, fc2, drop = mlp
        drops = (nn.Identity(), drop)
    if type(act) is nn.GELU and act.approximate == "none" and type(fc2) is nn.Linear and not (
            training and isinstance(drops[0], nn.Dropout) and drops[0].p > 0):
        out = gelu_linear(fc2, h)
    else:
        out = fc2(drops[0](act(h)))
    return drops[1](out) if skip is None else residual_dropout(skip, out, drops[1], backend)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def split_heads(t: torch.Tensor, num_heads: int, head_dim: int):
    """(B, N, parts*heads*head_dim) -> parts tensors (B, heads, N, head_dim), views of t."""
    B, N, width = t.shape
    return t.reshape(B, N, width // (num_heads * head_dim), num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_drop: float,
                    fused: bool = True):
    """softmax(q k^T * scale) v, heads merged back: (B, Nq, heads*head_dim). fused: through
    F.scaled_dot_product_attention; otherwise written out as the official code does, which double backward
    (gradient penalties) can go through, where SDPA's fused CPU and GPU kernels have no second derivative."""
    B, heads, Nq, head_dim = q.shape
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop, scale=scale)
    else:
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        out = (F.dropout(attn, attn_drop) if attn_drop > 0 else attn) @ v
    return out.transpose(1, 2).reshape(B, Nq, heads * head_dim)


def runs_attention_op(qkv: torch.Tensor, backend: str | None, fused_attn: bool, attn_drop: float) -> bool:
    """Whether a layer's softmax attention over its packed qkv runs as the softmax_attention op: a CPU backend, the
    layer's fused attention (SDPA's place, not the official formula), no attention dropout, CPU tensors, and either
    no gradient wanted or the op's backward kernel taking it (float32/float64, up to BACKWARD_MAX_TOKENS tokens)."""
    return (backend in (None, "auto", "cpp") and fused_attn and attn_drop == 0 and qkv.device.type == "cpu"
            and (not (grad_enabled_for_path() and qkv.requires_grad) or backward_kernel_applies(qkv)))


def multihead_attention(qkv: torch.Tensor, num_heads: int, head_dim: int, scale: float, attn_drop: float,
                        fused: bool = True):
    """Multi-head attention of a packed qkv (B, N, 3*heads*head_dim) (attention_heads).

    Returns (out (B, N, heads*head_dim), v (B, heads, N, head_dim))."""
    q, k, v = split_heads(qkv, num_heads, head_dim)
    return attention_heads(q, k, v, scale, attn_drop, fused), v


class Attention(nn.Module):
    """The backbone's multi-head self-attention; scale = qk_scale or head_dim ** -0.5."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True  # F.scaled_dot_product_attention; False: the official formula (T2TViT.set_fused_attn)

    def attend(self, x, backend: str | None = "eager"):
        """The heads' output (B, N, dim) before the projection. backend: the blocks' (attend_projected)."""
        return self.attend_projected(self.qkv(x) if backend == "eager" else inference_linear(self.qkv, x), backend)

    def attend_projected(self, qkv, backend: str | None = "eager"):
        """attend() after the qkv projection: SDPA (or the official formula) on qkv's views, or with a CPU backend the
        softmax_attention op on qkv itself (what SDPA computes, without dropout): in inference, and in training where
        the op's backward kernel applies (float32/float64, up to BACKWARD_MAX_TOKENS tokens)."""
        drop = self.attn_drop if self.training else 0.0
        if runs_attention_op(qkv, backend, self.fused_attn, drop):
            return softmax_attention(qkv, self.num_heads, self.scale, backend=backend)
        return multihead_attention(qkv, self.num_heads, self.head_dim, self.scale, drop, self.fused_attn)[0]

    def attend_class_token(self, x, backend: str | None = "eager"):
        """attend(x)[:, :1]: the class token's query alone, against every token's key and value (the products
        through ops._onednn.linear on the fused backends)."""
        dim = self.num_heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        product = F.linear if backend == "eager" else linear
        q = product(x[:, :1], weight[:dim], None if bias is None else bias[:dim])
        kv = product(x, weight[dim:], None if bias is None else bias[dim:])
        drop = self.attn_drop if self.training else 0.0
        return attention_heads(*split_heads(q, self.num_heads, self.head_dim),
                               *split_heads(kv, self.num_heads, self.head_dim), self.scale, drop, self.fused_attn)

    def forward(self, x, backend: str | None = "eager"):
        return self.proj_drop(self.proj(self.attend(x, backend)))


class Block(nn.Module):
    """A backbone layer. backend: "eager" keeps the official chain; the others run the attention as the
    softmax_attention op where it applies (on the CPU: inference, and float32/float64 training through its backward
    kernel; Attention.attend_projected), everything after it as the post_attention op in CPU inference
    (fuses_post_attention) and, in training, keep the inputs of norm1, norm2 and the GELU for backward instead of
    their outputs (recompute.py)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, backend: str | None = "auto"):
        super().__init__()
        check_backend_arg(backend)
        self.backend = backend
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        attn, mlp = self.attn, self.mlp
        fuse = submodules_run_as_defined(self)  # the fused and lean paths read the modules' weights directly
        if fuse and self._fuses_post_attention(x):
            return self._post_attention(attn.attend(self.norm1(x), self.backend), x)
        if fuse and recomputes(self.backend, (self.norm1, attn.qkv), (self.norm2, mlp.fc1)):
            out = attn.attend_projected(norm_linear(self.norm1, attn.qkv, x), self.backend)
            if type(self.drop_path) is nn.Identity:  # each residual with its dropout as one op (residual_dropout)
                x = residual_dropout(x, attn.proj(out), attn.proj_drop, self.backend)
                return mlp_after_fc1(mlp, norm_linear(self.norm2, mlp.fc1, x), self.training, skip=x,
                                     backend=self.backend)
            x = x + self.drop_path(attn.proj_drop(attn.proj(out)))
            return x + self.drop_path(mlp_after_fc1(mlp, norm_linear(self.norm2, mlp.fc1, x), self.training))
        # the attention as the op where it applies (attend_projected), e.g. CPU inference under autocast, where
        # post_attention does not
        x = x + self.drop_path(attn(self.norm1(x), backend=self.backend) if fuse else attn(self.norm1(x)))
        return x + self.drop_path(mlp(self.norm2(x)))

    def class_token(self, x):
        """forward(x)[:, :1], the only row of the last block that the model's head reads: the other tokens enter
        as keys and values alone, so their queries, projections and MLP rows are skipped. What remains, mostly the
        keys and values, is about a fifth of the block's work at 197 tokens (3.5 vs 19 ms at B=8 on a 2-core CPU).
        Callers check that the block's modules run as defined (T2TViT._last_block_class_token_only does)."""
        attn = self.attn
        out, x = attn.attend_class_token(self.norm1(x), self.backend), x[:, :1]
        if self._fuses_post_attention(x):
            return self._post_attention(out, x)
        x = x + self.drop_path(attn.proj_drop(attn.proj(out)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _fuses_post_attention(self, x):
        attn, mlp = self.attn, self.mlp
        return fuses_post_attention(self.backend, x, attn.proj, self.norm2, mlp.fc1, mlp.act, mlp.fc2, self.training,
                                    (attn.proj_drop, mlp.drop, self.drop_path))

    def _post_attention(self, out, skip):
        return fused_post_attention(out, skip, self.attn.proj, self.norm2, self.mlp.fc1, self.mlp.fc2)
