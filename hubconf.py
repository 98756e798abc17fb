"""torch.hub entry points: the 11 official variants, each taking the factories' arguments, e.g.

    model = torch.hub.load("<owner>/<repo>", "t2t_vit_14", pretrained="81.5_T2T_ViT_14.pth.tar", num_classes=1000)

`pretrained` is a local checkpoint path (official .pth.tar, plain state dict or .safetensors). Loaded this way the
package runs without its compiled extension (the C++ ops fall back to their eager formulas; Triton still runs on a
GPU): `pip install -e .` in the repository builds it.
"""
dependencies = ["torch"]

from t2t_kernels import (t2t_vit_7, t2t_vit_10, t2t_vit_12, t2t_vit_14, t2t_vit_14_resnext,  # noqa: E402,F401
                         t2t_vit_14_wide, t2t_vit_19, t2t_vit_24, t2t_vit_t_14, t2t_vit_t_19, t2t_vit_t_24)
