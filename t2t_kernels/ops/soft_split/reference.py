"""Eager soft split: the documented truth for every soft-split kernel, and the fallback."""
import torch
import torch.nn.functional as F


def output_grid(input_hw, kernel_size, stride, padding):
    """(h_out, w_out) of the sliding windows, as F.unfold counts them."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(input_hw, kernel_size, stride, padding))


def soft_split(x: torch.Tensor, kernel_size, stride, padding) -> torch.Tensor:
    """(B, C, H, W) with any strides -> contiguous (B, L, C*kh*kw); feature index c*kh*kw + i*kw + j."""
    return F.unfold(x, kernel_size, padding=padding, stride=stride).transpose(1, 2).contiguous()
