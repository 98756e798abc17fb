"""The Tokens-to-Token module of the official code (models/token_performer.py, token_transformer.py,
t2t_vit.py), with its soft splits and Performer attention on the fused ops."""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..ops import (SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS, performer_attention, soft_split, soft_split_layer_norm,
                   soft_split_layer_norm_linear, softmax_attention)
from ..ops._backends import check_backend_arg
from ..ops._registry import grad_enabled_for_path
from .common import (DropPath, Mlp, fill_parameter, fused_post_attention, fuses_post_attention, inference_linear,
                     maybe_checkpoint, mlp_after_fc1, multihead_attention, residual_dropout, runs_as_defined,
                     runs_attention_op, submodules_run_as_defined)
from .recompute import is_last_dim_layer_norm, linear_of_recomputed, norm_linear, recomputes


def recomputed_norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor, split: SoftSplit | None):
    """linear(norm(x)), or linear(norm(split(x))) when split is given, keeping x (the tokens, or the image of the
    split) for backward instead of the normalised tokens."""
    return norm_linear(norm, linear, x) if split is None else linear_of_recomputed(
        split.norm_fn(norm), linear, x, norm.weight, norm.bias)


def fusable(layer: nn.Module, split: SoftSplit | None) -> bool:
    """Whether a T2T layer may take its fused or lean paths: they fold norm1 into the soft split and read the
    layer's parameters without calling its modules, so every one of them (and the split) must run as defined."""
    return submodules_run_as_defined(layer) and (split is None or runs_as_defined(split))


def split_norm(x: torch.Tensor, split: SoftSplit | None, norm: nn.Module, fuse: bool) -> torch.Tensor:
    """norm(x), or norm(split(x)) when split is given: one fused op where fuse allows it."""
    if split is None:
        return norm(x)
    return split(x, norm=norm) if fuse else norm(split(x))


def split_norm_linear(x: torch.Tensor, split: SoftSplit | None, norm: nn.Module, linear: nn.Module) -> torch.Tensor:
    """linear(norm(x)), or linear(norm(split(x))) when split is given, in a layer's inference path: from the image
    as one soft_split_layer_norm_linear op where its CPU kernel applies (the official LayerNorm and Linear, every tensor
    in x's dtype, no gradient wanted), else the fused split + norm, then the product."""
    official = is_last_dim_layer_norm(norm) and type(linear) is nn.Linear
    if split is not None and official:
        params = [p for p in (norm.weight, norm.bias, linear.weight, linear.bias) if p is not None]
        grad_wanted = grad_enabled_for_path() and (x.requires_grad or any(p.requires_grad for p in params))
        ops = SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS
        runs_kernel = (split.backend == "cpp" and ops.unavailable_reason("cpp", x.device, x.dtype) is None
                       or split.backend in (None, "auto") and ops.resolve(split.backend, x) == "cpp")
        if runs_kernel and not grad_wanted and all(p.dtype == x.dtype for p in params):
            return soft_split_layer_norm_linear(x, split.kernel_size, split.stride, split.padding, norm.weight,
                                                norm.bias, linear.weight, linear.bias, norm.eps, backend="cpp")
    return inference_linear(linear, split_norm(x, split, norm, fuse=True))


class SoftSplit(nn.Module):
    """nn.Unfold + transpose as one op: (B, C, H, W) with any strides -> (B, L, C*k*k). Has no weights (no keys).

    forward(x, norm=layer_norm) returns norm(split(x)) through the fused soft_split_layer_norm op: the T2T module
    hands it the next layer's norm1, whose parameters (and state-dict keys) stay in that layer.
    """

    def __init__(self, kernel_size, stride, padding, backend: str | None = "auto"):
        super().__init__()
        check_backend_arg(backend)
        self.kernel_size, self.stride, self.padding, self.backend = kernel_size, stride, padding, backend

    def forward(self, x, norm: nn.Module | None = None):
        if norm is None:
            return soft_split(x, self.kernel_size, self.stride, self.padding, backend=self.backend)
        # only the official LayerNorm fuses: a subclass may compute something else
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            return norm(soft_split(x, self.kernel_size, self.stride, self.padding, backend=self.backend))
        return self.norm_fn(norm)(x, norm.weight, norm.bias)

    def norm_fn(self, norm: nn.LayerNorm) -> SplitLayerNorm:
        """(x, weight, bias) -> layer_norm(split(x)) with norm's eps: the fused op, for linear_of_recomputed."""
        return SplitLayerNorm(self, norm.eps)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, backend={self.backend!r}"


class SplitLayerNorm:
    """(x, weight, bias) -> the fused soft_split_layer_norm of a SoftSplit with a LayerNorm's eps; `normalized(x)` gives
    the tokens before the affine step. A class, not a closure given an attribute: dynamo in torch 2.6 cannot trace
    setting an attribute on a function."""

    def __init__(self, split: SoftSplit, eps: float):
        self.split, self.eps = split, eps

    def __call__(self, x, weight, bias):
        split = self.split
        return soft_split_layer_norm(x, split.kernel_size, split.stride, split.padding, weight, bias, self.eps,
                                     backend=split.backend)

    def normalized(self, x):
        return self(x, None, None)


class Token_performer(nn.Module):  # noqa: N801  (official class name)
    """Performer layer of the T2T module: x = v + dp(proj(attn(norm1(x)))); x = x + mlp(norm2(x)).

    Keys as official: kqv, proj, norm1, norm2, mlp.0, mlp.2, w. The Dropouts are the official hard-coded 0.1.
    """

    def __init__(self, dim, in_dim, head_cnt=1, kernel_ratio=0.5, dp1=0.1, dp2=0.1, backend: str | None = "auto"):
        super().__init__()
        check_backend_arg(backend)
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8  # keeps the division finite
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb), nn.Dropout(dp2)
        )
        self.m = int(self.emb * kernel_ratio)
        # fixed orthogonal random features, in the state dict (official checkpoints carry them) but never trained
        self.w = nn.Parameter(self._random_features(), requires_grad=False)
        self.backend = backend

    def _random_features(self, device=None):
        return nn.init.orthogonal_(torch.randn(self.m, self.emb, device=device)) * math.sqrt(self.m)

    def reset_parameters(self):
        """Draw w again as the constructor does (its submodules reset their own parameters): for a layer built on the
        meta device and materialised with to_empty()."""
        fill_parameter(self.w, self._random_features(self.w.device))

    def attend(self, x):
        """(v, the attention's output): what the projection and its skip take."""
        return self.attend_projected(self.kqv(x))

    def attend_projected(self, kqv):
        """attend() after the kqv projection."""
        k, q, v = torch.split(kqv, self.emb, dim=-1)  # the official split order: k, q, v
        return v, performer_attention(q, k, v, self.w, eps=self.epsilon, backend=self.backend)

    def single_attn(self, x):
        v, y = self.attend(x)
        return v + self.dp(self.proj(y))  # skip from v: the input width differs from emb

    def forward(self, x, split: SoftSplit | None = None):
        """split: x is the image of that soft split, which runs here with norm1 fused into it (the T2T module)."""
        fc1, act, fc2, drop = self.mlp
        fuse = fusable(self, split)
        if fuse and recomputes(self.backend, (self.norm1, self.kqv), (self.norm2, fc1)):
            v, y = self.attend_projected(recomputed_norm_linear(self.norm1, self.kqv, x, split))
            x = residual_dropout(v, self.proj(y), self.dp, self.backend)
            return mlp_after_fc1(self.mlp, norm_linear(self.norm2, fc1, x), self.training, skip=x,
                                 backend=self.backend)
        # x: the tokens, or the image of split (their dtype and device): inference from it to the layer's output
        if fuse and fuses_post_attention(self.backend, x, self.proj, self.norm2, fc1, act, fc2, self.training,
                                         (self.dp, drop)):
            kqv = split_norm_linear(x, split, self.norm1, self.kqv)
            # inference: the input is freed before the attention allocates. The lower peak also keeps glibc from
            # returning the heap to the OS after each call (page faults: README, Benchmarks)
            del x
            v, y = self.attend_projected(kqv)
            return fused_post_attention(y, v, self.proj, self.norm2, fc1, fc2)
        x = split_norm(x, split, self.norm1, fuse)
        if fuse:  # the modules in their order, each residual dropout one op where it applies (checkpointing, no_grad)
            v, y = self.attend(x)
            x = residual_dropout(v, self.proj(y), self.dp, self.backend)
            return residual_dropout(x, fc2(act(fc1(self.norm2(x)))), drop, self.backend)
        x = self.single_attn(x)
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """Token_transformer's attention (key prefix `attn.`): softmax attention from width dim to in_dim, skip from v.

    The scale is dim ** -0.5 with dim the INPUT width (147 or 576), not in_dim: the official quirk, kept because
    the released t-variant weights were trained with it.
    """

    def __init__(self, dim, in_dim, num_heads=1, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"TokenAttention: in_dim {in_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.in_dim = num_heads, in_dim
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True  # as Attention.fused_attn

    def attend(self, x):
        """(v as tokens, the attention's output): what the projection and its skip take."""
        return self.attend_projected(self.qkv(x))

    def attend_projected(self, qkv, backend: str | None = "eager"):
        """attend() after the qkv projection; with a CPU backend the attention as the softmax_attention op where it
        applies (runs_attention_op: inference, at these lengths; 3136 tokens at B=8 on a 2-core CPU: 166 ms against
        SDPA's 194)."""
        drop = self.attn_drop if self.training else 0.0
        if runs_attention_op(qkv, backend, self.fused_attn, drop):
            # v's tokens, heads merged: the last third of qkv (official: v.squeeze(1), one head)
            return qkv[..., 2 * self.in_dim:], softmax_attention(qkv, self.num_heads, self.scale, backend=backend)
        out, v = multihead_attention(qkv, self.num_heads, self.in_dim // self.num_heads, self.scale, drop,
                                     self.fused_attn)
        return v.transpose(1, 2).reshape(out.shape), out  # official: v.squeeze(1) (one head)

    def forward(self, x):
        v, out = self.attend(x)
        return v + self.proj_drop(self.proj(out))


class Token_transformer(nn.Module):  # noqa: N801  (official class name)
    def __init__(self, dim, in_dim, num_heads=1, mlp_ratio=1.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 backend: str | None = "auto"):
        super().__init__()
        check_backend_arg(backend)
        self.backend = backend
        self.norm1 = norm_layer(dim)
        self.attn = TokenAttention(dim, in_dim=in_dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                   attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=int(in_dim * mlp_ratio), out_features=in_dim,
                       act_layer=act_layer, drop=drop)

    def forward(self, x, split: SoftSplit | None = None):
        """split: x is the image of that soft split, which runs here with norm1 fused into it (the T2T module)."""
        attn, mlp = self.attn, self.mlp
        fuse = fusable(self, split)
        if fuse and recomputes(self.backend, (self.norm1, attn.qkv), (self.norm2, mlp.fc1)):
            v, out = attn.attend_projected(recomputed_norm_linear(self.norm1, attn.qkv, x, split), self.backend)
            x = residual_dropout(v, attn.proj(out), attn.proj_drop, self.backend)
            return x + self.drop_path(mlp_after_fc1(mlp, norm_linear(self.norm2, mlp.fc1, x), self.training))
        if fuse and fuses_post_attention(self.backend, x, attn.proj, self.norm2, mlp.fc1, mlp.act, mlp.fc2,
                                         self.training, (attn.proj_drop, mlp.drop, self.drop_path)):
            qkv = split_norm_linear(x, split, self.norm1, attn.qkv)  # as in Token_performer.forward
            del x
            v, out = attn.attend_projected(qkv, self.backend)
            return fused_post_attention(out, v, attn.proj, self.norm2, mlp.fc1, mlp.fc2)
        x = split_norm(x, split, self.norm1, fuse)
        x = attn(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


TOKENS_TYPES = ("performer", "transformer")


def tokens_as_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, N, C) as the image (B, C, h, w): the official transpose + reshape, a free view for contiguous
    tokens; soft_split reads the strides, so no copy is made."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


class T2T_module(nn.Module):  # noqa: N801  (official class name)
    """Tokens-to-Token: soft split (7, 4, 2), attention, soft split (3, 2, 1), attention, soft split (3, 2, 1),
    project. Tracks the token grid (h, w) itself, so any image whose sides are multiples of 16 works."""

    def __init__(self, img_size=(224, 224), tokens_type="performer", in_chans=3, embed_dim=768, token_dim=64,
                 backend: str | None = "auto"):
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(f"tokens_type must be one of {TOKENS_TYPES}, got {tokens_type!r}")
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.soft_split0 = SoftSplit(7, 4, 2, backend=backend)
        self.soft_split1 = SoftSplit(3, 2, 1, backend=backend)
        self.soft_split2 = SoftSplit(3, 2, 1, backend=backend)
        if tokens_type == "transformer":
            self.attention1 = Token_transformer(dim=in_chans * 7 * 7, in_dim=token_dim, num_heads=1, mlp_ratio=1.0,
                                                backend=backend)
            self.attention2 = Token_transformer(dim=token_dim * 3 * 3, in_dim=token_dim, num_heads=1, mlp_ratio=1.0,
                                                backend=backend)
        else:
            self.attention1 = Token_performer(dim=in_chans * 7 * 7, in_dim=token_dim, kernel_ratio=0.5,
                                              backend=backend)
            self.attention2 = Token_performer(dim=token_dim * 3 * 3, in_dim=token_dim, kernel_ratio=0.5,
                                              backend=backend)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.grid_size = (self.img_size[0] // 16, self.img_size[1] // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.grad_checkpointing = False

    def forward(self, x):
        H, W = x.shape[-2:]
        # attention(split(image)) with the split and the layer's norm1 as one fused op, run inside the layer: the
        # tokens are then its own to free early (a module's arguments live until it returns)
        stage1 = partial(self.attention1, split=self.soft_split0)
        stage2 = partial(self.attention2, split=self.soft_split1)
        x = maybe_checkpoint(self.grad_checkpointing, stage1, x)
        x = maybe_checkpoint(self.grad_checkpointing, stage2, tokens_as_image(x, (H // 4, W // 4)))
        x = self.soft_split2(tokens_as_image(x, (H // 8, W // 8)))
        if self.soft_split2.backend != "eager" and runs_as_defined(self.project):
            return inference_linear(self.project, x)
        return self.project(x)
