"""t2t_kernels: T2T-ViT with fused kernels for its soft split and Performer attention.

    from t2t_kernels import T2TViT, create_model, t2t_vit_14
    model = t2t_vit_14(num_classes=1000)            # the official architecture, fused T2T module
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the extension and registers the ops)
from .models import (T2T_ViT, T2TViT, create_model, list_models, load_pretrained, t2t_vit_7, t2t_vit_10,  # noqa: E402
                     t2t_vit_12, t2t_vit_14, t2t_vit_14_resnext, t2t_vit_14_wide, t2t_vit_19, t2t_vit_24,
                     t2t_vit_t_14, t2t_vit_t_19, t2t_vit_t_24)
from .models.t2t_vit import register_with_timm as _register_with_timm  # noqa: E402

_register_with_timm()
EXTENSION_LOADED_TEXT = "loaded" if ops.EXTENSION_LOADED else ops.EXTENSION_ERROR

__all__ = ["T2TViT", "T2T_ViT", "create_model", "list_models", "load_pretrained", "ops", "t2t_vit_7", "t2t_vit_10",
           "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24",
           "t2t_vit_14_resnext", "t2t_vit_14_wide"]
