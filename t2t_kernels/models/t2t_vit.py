"""T2T-ViT (Yuan et al., ICCV 2021) as the official code builds it (yitu-opensource/T2T-ViT, models/t2t_vit.py):
same state-dict keys, shapes, init and eval-mode forward, so its checkpoints load with strict=True.

Beyond the official code: any image size whose sides are multiples of 16 (square or not), the T2T module on
fused kernels (``backend``), timm-style helpers, and a checkpoint loader that never runs code from the file.
"""
from __future__ import annotations

import contextlib
import numbers

import torch
from torch import nn

from .._env import env_flag
from ..layers import Attention, Block, T2T_module
from ..layers.common import fill_parameter, maybe_checkpoint, runs_as_defined, submodules_run_as_defined
from ..layers.recompute import is_last_dim_layer_norm
from ..ops._backends import check_backend_arg
from ..ops._registry import autocast_enabled, is_int

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _trunc_normal_(tensor, std=0.02):
    # timm's trunc_normal_ as the official code uses it: cut at +-2 (absolute), not +-2 std
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


def get_sinusoid_encoding(n_position: int, d_hid: int) -> torch.Tensor:
    """The fixed sinusoid table (1, n_position, d_hid): angle = pos / 10000**(2*(j//2)/d), sin on even j, cos on odd.
    Computed in float64 like the official numpy code, then stored as float32."""
    pos = torch.arange(n_position, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d_hid, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / d_hid)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def to_img_size(img_size) -> tuple[int, int]:
    """int or (H, W) -> (H, W), both positive multiples of 16 (the T2T module downsamples by 4, 2, 2)."""
    size = (img_size, img_size) if is_int(img_size) else tuple(img_size) if isinstance(
        img_size, (tuple, list)) else None
    if size is None or len(size) != 2 or not all(map(is_int, size)):
        raise TypeError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")
    size = tuple(map(int, size))
    if any(s < 16 or s % 16 for s in size):
        raise ValueError(f"img_size sides must be positive multiples of 16, got img_size={img_size!r}")
    return size


def _is_real(value) -> bool:
    """An int or a float, numpy's included; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, why: str = "") -> None:
    if not is_int(value) or value < minimum:
        expected = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}{why}, got {value!r}")


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "tokens_to_token.soft_split0", "classifier": "head", **kwargs}


class T2TViT(nn.Module):
    """T2T-ViT: the Tokens-to-Token module, a class token and fixed sinusoid positions, then ViT blocks.

    The official constructor plus ``backend`` ("auto", "eager", "cpp", "cuda", "triton": which implementation of
    the soft split and the Performer attention the T2T module uses; the non-eager ones also run the layers'
    post-attention chain as the fused op in CPU inference, keep fewer activations in training and run the last
    block for the class token alone (forward_features); "eager" is the official formulation). ``img_size`` may be an int or (H, W).
    ``qk_scale`` stays explicit: None means head_dim ** -0.5, the scale the released checkpoints were trained with.
    """

    def __init__(self, img_size=224, tokens_type="performer", in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, token_dim=64,
                 backend: str | None = "auto"):
        super().__init__()
        check_backend_arg(backend)
        _check_int("num_classes", num_classes, 0)
        _check_int("in_chans", in_chans, 1)
        _check_int("embed_dim", embed_dim, 1)
        _check_int("depth", depth, 0)
        _check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
        # the Performer draws m = token_dim // 2 random features: it needs at least one
        _check_int("token_dim", token_dim, 2 if tokens_type == "performer" else 1,
                   " for tokens_type='performer' (it uses token_dim // 2 random features)" if tokens_type == "performer"
                   else "")
        if not _is_real(mlp_ratio) or not 0 < mlp_ratio < float("inf"):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not _is_real(rate) or not 0 <= rate <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
        # plain Python numbers from here on (numpy's pass the checks)
        num_classes, in_chans, embed_dim, depth, num_heads, token_dim = map(
            int, (num_classes, in_chans, embed_dim, depth, num_heads, token_dim))
        mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate = map(
            float, (mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate))
        self.img_size = to_img_size(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.backend = backend
        self.grad_checkpointing = False
        self.tokens_to_token = T2T_module(img_size=self.img_size, tokens_type=tokens_type, in_chans=in_chans,
                                          embed_dim=embed_dim, token_dim=token_dim, backend=backend)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(get_sinusoid_encoding(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # cpu: meta-device init
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                  backend=backend)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.default_cfg = _cfg(input_size=(in_chans, *self.img_size), num_classes=num_classes)
        # what timm's feature extraction (features_only=True: FeatureGetterNet) reads: the blocks' token maps
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=16) for i in range(depth)]
        _trunc_normal_(self.cls_token)
        self.apply(self._init_weights)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter as the constructor does, with the same random draws in the same order: after
        torch.manual_seed(s) the weights equal those of a model constructed after torch.manual_seed(s) on the same
        device. For a model built on the meta device (deferred initialisation, FSDP2) and materialised with
        to_empty(): construction's draws are each submodule's reset_parameters() in construction order (children
        first), then the class token's and the Linears' truncated normals."""
        def reset_after_children(module):
            for child in module.children():
                reset_after_children(child)
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

        reset_after_children(self)
        fill_parameter(self.pos_embed, get_sinusoid_encoding(*self.pos_embed.shape[1:]))
        _trunc_normal_(self.cls_token)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # applied after construction, so it also re-initialises the Performer's Linears (as the official code does)
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):  # (elementwise_affine=False or bias=False: no such parameter)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if m.weight is not None:
                nn.init.ones_(m.weight)

    # ---- timm-style helpers -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}

    @property
    def pretrained_cfg(self) -> dict:
        """timm's name for default_cfg (its resolve_model_data_config reads this one)."""
        return self.default_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict):
        self.default_cfg = cfg

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise lr decay: timm.optim.create_optimizer_v2(model, layer_decay=...)): the
        T2T module with the class token and positions as the stem, then each block, the final norm with the last."""
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        _check_int("num_classes", num_classes, 0)
        if global_pool not in (None, "", "token"):  # the official head reads the class token only
            raise ValueError(f"global_pool must be None, '' or 'token' (the class token), got {global_pool!r}")
        num_classes = int(num_classes)
        self.num_classes = num_classes
        ref = self.cls_token  # (the norm may be pruned away)
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.default_cfg = {**self.default_cfg, "num_classes": num_classes}

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute the T2T layers and the blocks in backward instead of keeping their activations."""
        self.grad_checkpointing = self.tokens_to_token.grad_checkpointing = bool(enable)

    def set_fused_attn(self, enable: bool = True):
        """Softmax attention (the blocks', and the t-variants' T2T layers') through F.scaled_dot_product_attention
        (the default), or written out as the official code does: slower, but double backward (gradient penalties)
        goes through it, where SDPA's fused kernels have no second derivative."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = bool(enable)

    def set_backend(self, backend: str | None):
        """Switch the implementation of the fused ops in every layer that has one."""
        check_backend_arg(backend)
        self.backend = backend
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    # ---- forward ------------------------------------------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"T2TViT expects images (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"T2TViT was built for in_chans={self.in_chans}, got images with shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"T2TViT expects floating-point images, got dtype {x.dtype} (convert with x.float() / 255)")
        dtype = self.cls_token.dtype
        if x.dtype != dtype and not autocast_enabled(x.device.type):
            raise TypeError(f"T2TViT has {dtype} parameters but got {x.dtype} images: convert the images (x.to({dtype})) "
                            "or the model, or run under torch.autocast")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"T2TViT was built for img_size={self.img_size} but got images of size {tuple(x.shape[-2:])}; "
                "build the model with that img_size (load_pretrained resizes pos_embed)"
            )

    def _embed(self, x):
        """The T2T module's tokens with the class token and positions: what the first block takes."""
        self._check_input(x)
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _run_blocks(self, x, blocks):
        for blk in blocks:
            x = maybe_checkpoint(self.grad_checkpointing, blk, x)
        return x

    def forward_tokens(self, x):
        """All tokens after the final norm: (B, 1 + N, E)."""
        return self.norm(self._run_blocks(self._embed(x), self.blocks))

    def forward_intermediates(self, x, indices: int | list[int] | tuple[int, ...] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The blocks' outputs for dense tasks, with timm's signature (what its features_only models call).

        indices: the last n blocks for an int n, those blocks (negative counts from the end) for a sequence, all for
        None. output_fmt "NCHW": the patch tokens as a (B, E, H/16, W/16) map; "NLC": (B, H/16 * W/16, E).
        return_prefix_tokens: each intermediate is (patch tokens, class token (B, 1, E)). norm: the final norm applied
        to each. stop_early: with intermediates_only, run no block after the last one asked for.
        Returns the intermediates, or (all tokens after the final norm (B, 1 + N, E), intermediates)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._block_indices(indices)
        last = max(take, default=-1) if stop_early and intermediates_only else len(self.blocks) - 1
        grid = self.tokens_to_token.grid_size
        x = self._embed(x)
        intermediates = []
        for i, block in enumerate(self.blocks[:last + 1]):
            x = maybe_checkpoint(self.grad_checkpointing, block, x)
            if i in take:
                y = self.norm(x) if norm else x
                patches = y[:, 1:]
                if output_fmt == "NCHW":
                    patches = patches.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, y[:, :1]) if return_prefix_tokens else patches)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of indices (as forward_intermediates reads them), and the final norm and
        the head if asked; returns the block indices."""
        take = self._block_indices(indices)
        self.blocks = self.blocks[:max(take, default=-1) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def _block_indices(self, indices) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 <= indices <= depth:
                raise ValueError(f"indices: the last n blocks needs 0 <= n <= {depth} (the depth), got {indices}")
            return list(range(depth - indices, depth))
        if not isinstance(indices, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise TypeError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"indices {bad} out of range for {depth} blocks")
        return sorted({i % depth for i in indices})

    def forward_features(self, x):
        """The normed class token (B, E), as the official forward_features. Off the eager backend the last block
        computes that token alone (Block.class_token; the same values, about 5% less work for T2T-ViT-14), unless
        hooks watch it or the final norm (they would see one token instead of all) or its modules are not the
        official ones running their forward as defined."""
        if not self._last_block_class_token_only():
            return self.forward_tokens(x)[:, 0]
        x = self._run_blocks(self._embed(x), self.blocks[:-1])
        return self.norm(maybe_checkpoint(self.grad_checkpointing, self.blocks[-1].class_token, x))[:, 0]

    def _last_block_class_token_only(self) -> bool:
        last = self.blocks[-1] if len(self.blocks) else None
        # class_token re-implements the official Block, Attention and qkv Linear (it slices the qkv weight), and
        # needs per-token norms after the attention: exactly those classes, each running its forward as defined
        if (type(last) is not Block or last.backend == "eager" or type(last.attn) is not Attention
                or type(last.attn.qkv) is not nn.Linear):
            return False
        if not all(is_last_dim_layer_norm(norm) for norm in (last.norm2, self.norm)):
            return False
        return runs_as_defined(last) and runs_as_defined(self.norm) and submodules_run_as_defined(last)

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


T2T_ViT = T2TViT  # the official class name

# name -> (tokens_type, embed_dim, depth, num_heads, mlp_ratio)
VARIANTS = {
    "t2t_vit_7": ("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": ("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": ("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": ("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": ("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": ("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": ("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": ("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": ("transformer", 512, 24, 8, 3.0),
    "t2t_vit_14_resnext": ("performer", 384, 14, 32, 3.0),
    "t2t_vit_14_wide": ("performer", 768, 4, 12, 3.0),
}


def list_models() -> list[str]:
    return list(VARIANTS)


def create_model(name: str, pretrained=False, **kwargs) -> T2TViT:
    """Build a variant by name; ``pretrained`` is False or the path of a local checkpoint (official .pth.tar,
    a plain state dict, or .safetensors). Other keyword arguments go to T2TViT.

    Unlike the official factories, loading weights does NOT set qk_scale = embed_dim ** -0.5: that branch never ran
    (its download URLs are empty), and the released checkpoints were trained and evaluated with the default
    head_dim ** -0.5 (official issue #62). Pass qk_scale explicitly to get the official factory's value.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(VARIANTS)}")
    tokens_type, embed_dim, depth, num_heads, mlp_ratio = VARIANTS[name]
    config = dict(tokens_type=tokens_type, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  mlp_ratio=mlp_ratio)
    model = T2TViT(**{**config, **kwargs})
    if pretrained is True:
        raise ValueError("pretrained=True: there is nothing to download; pass the path of a local checkpoint")
    if pretrained:
        from .checkpoint import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _factory(name: str):
    def factory(pretrained=False, **kwargs) -> T2TViT:
        return create_model(name, pretrained=pretrained, **kwargs)

    tokens_type, embed_dim, depth, num_heads, mlp_ratio = VARIANTS[name]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{name}: {tokens_type} T2T module, embed_dim {embed_dim}, depth {depth}, {num_heads} heads, "
                       f"mlp_ratio {mlp_ratio}. pretrained: False or a local checkpoint path (see create_model).")
    return factory


t2t_vit_7 = _factory("t2t_vit_7")
t2t_vit_10 = _factory("t2t_vit_10")
t2t_vit_12 = _factory("t2t_vit_12")
t2t_vit_14 = _factory("t2t_vit_14")
t2t_vit_19 = _factory("t2t_vit_19")
t2t_vit_24 = _factory("t2t_vit_24")
t2t_vit_t_14 = _factory("t2t_vit_t_14")
t2t_vit_t_19 = _factory("t2t_vit_t_19")
t2t_vit_t_24 = _factory("t2t_vit_t_24")
t2t_vit_14_resnext = _factory("t2t_vit_14_resnext")
t2t_vit_14_wide = _factory("t2t_vit_14_wide")

# explicit, since timm's register_model appends its entries' names to the module's __all__ (or makes one of them)
__all__ = ["T2TViT", "T2T_ViT", "VARIANTS", "create_model", "list_models", "register_with_timm",
           "get_sinusoid_encoding", "to_img_size", *VARIANTS]


def _timm_entrypoint(name: str):
    """timm.create_model's entry for a variant. timm passes every entry its pretrained-config arguments (dropped
    here: there are no hub weights, so pretrained=True raises unless pretrained_cfg_overlay names a local "file", and
    a checkpoint path loads) and may pass device and dtype; features_only=True wraps the model in timm's FeatureGetterNet, which reads forward_intermediates (out_indices
    as there: the last n blocks for an int n, 3 by default as for timm's ViTs)."""
    def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, device=None,
              dtype=None, features_only=False, out_indices=3, output_fmt="NCHW", **kwargs) -> nn.Module:
        if pretrained is True and (pretrained_cfg_overlay or {}).get("file"):  # timm's way to name a local file
            pretrained = pretrained_cfg_overlay["file"]
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = create_model(name, pretrained=pretrained, **kwargs)
        if dtype is not None:
            model.to(dtype)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
        if not features_only:
            return model
        try:
            from timm.models._features import FeatureGetterNet
        except ImportError as err:
            import timm

            raise ImportError(f"features_only=True wraps the model in timm's FeatureGetterNet, which timm "
                              f"{timm.__version__} lacks (timm 1.0 has it)") from err
        return FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = globals()[name].__doc__
    return entry


def register_with_timm() -> bool:
    """Adds the variants to timm's model registry when timm is installed (timm is not a dependency):
    timm.create_model("t2t_vit_14", ...) then builds this package's model."""
    import importlib.util

    if importlib.util.find_spec("timm") is None or env_flag("T2T_KERNELS_NO_TIMM", False):
        return False
    try:
        from timm.models import is_model, register_model  # (both exported there since timm 0.3)

        for name in VARIANTS:
            if not is_model(name):
                register_model(_timm_entrypoint(name))
    except Exception:  # a timm whose registry API differs must not break this package
        return False
    return True
