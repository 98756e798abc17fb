"""Eager soft split + LayerNorm: the documented truth for the fused kernels, and the fallback."""
import torch
import torch.nn.functional as F

from ..soft_split import reference as soft_split_reference


def soft_split_layer_norm(x: torch.Tensor, kernel_size, stride, padding, weight, bias, eps: float) -> torch.Tensor:
    """layer_norm(soft_split(x)) over the C*kh*kw features of each token: what norm1 of the next T2T layer computes."""
    tokens = soft_split_reference.soft_split(x, kernel_size, stride, padding)
    return F.layer_norm(tokens, tokens.shape[-1:], weight, bias, eps)
