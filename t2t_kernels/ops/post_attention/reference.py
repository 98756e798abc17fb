"""Eager post-attention tail of a transformer layer: the documented truth for the fused kernel, and the fallback."""
import torch
import torch.nn.functional as F


def post_attention(y, skip, proj_weight, proj_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, eps: float) -> torch.Tensor:
    """x = skip + proj(y); x + fc2(gelu(fc1(layer_norm(x)))), exactly as the layers compute it without dropout."""
    x = skip + F.linear(y, proj_weight, proj_bias)
    hidden = F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), fc1_weight, fc1_bias))
    return x + F.linear(hidden, fc2_weight, fc2_bias)
