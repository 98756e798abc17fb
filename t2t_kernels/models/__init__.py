from .checkpoint import load_pretrained, resize_pos_embed
from .t2t_vit import (VARIANTS, T2T_ViT, T2TViT, create_model, list_models, register_with_timm, t2t_vit_7,
                      t2t_vit_10, t2t_vit_12, t2t_vit_14, t2t_vit_14_resnext, t2t_vit_14_wide, t2t_vit_19,
                      t2t_vit_24, t2t_vit_t_14, t2t_vit_t_19, t2t_vit_t_24)
