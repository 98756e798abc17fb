"""Eager soft split + LayerNorm: the documented truth for the fused kernels, and the fallback."""
import functools

import torch
import torch.nn.functional as F

from ..soft_split import reference as soft_split_reference


def soft_split_layer_norm(x: torch.Tensor, kernel_size, stride, padding, weight, bias, eps: float) -> torch.Tensor:
    """layer_norm(soft_split(x)) over the C*kh*kw features of each token: what norm1 of the next T2T layer computes."""
    return layer_norm(soft_split_reference.soft_split(x, kernel_size, stride, padding), weight, bias, eps)


def soft_split_layer_norm_linear(x: torch.Tensor, kernel_size, stride, padding, norm_weight, norm_bias, weight, bias,
                                 eps: float) -> torch.Tensor:
    """linear(layer_norm(soft_split(x))): a T2T layer from the image to its kqv projection."""
    return F.linear(soft_split_layer_norm(x, kernel_size, stride, padding, norm_weight, norm_bias, eps), weight, bias)


def soft_split_layer_norm_linear_op(x, norm_weight, norm_bias, weight, bias, kernel_size, stride, padding, eps):
    """soft_split_layer_norm_linear in the compiled op's argument order (its autograd recomputes this)."""
    return soft_split_layer_norm_linear(x, kernel_size, stride, padding, norm_weight, norm_bias, weight, bias, eps)


def layer_norm(tokens: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dimension, in the tokens' dtype. Parameters of another dtype (fp32 beside bf16 tokens)
    are taken on every device: computed in the promoted dtype, as CPU's layer_norm does; CUDA's refuses mixed dtypes."""
    dtypes = {t.dtype for t in (tokens, weight, bias) if t is not None}
    if len(dtypes) == 1:
        return F.layer_norm(tokens, tokens.shape[-1:], weight, bias, eps)
    dtype = functools.reduce(torch.promote_types, dtypes)
    weight, bias = (t.to(dtype) if t is not None else None for t in (weight, bias))
    return F.layer_norm(tokens.to(dtype), tokens.shape[-1:], weight, bias, eps).to(tokens.dtype)
