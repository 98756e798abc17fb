"""Eager multi-head softmax attention of a packed qkv: the documented truth for the fused kernel, and the fallback."""
import torch
import torch.nn.functional as F


def _heads(qkv, num_heads: int):
    """qkv (B, N, 3*num_heads*head_dim) -> q, k, v (B, num_heads, N, head_dim), views (the official Attention's)."""
    B, N, width = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _merged(out):
    B, heads, N, head_dim = out.shape
    return out.transpose(1, 2).reshape(B, N, heads * head_dim)


def softmax_attention(qkv, num_heads: int, scale: float) -> torch.Tensor:
    """Each head's softmax(q k^T * scale) v through F.scaled_dot_product_attention (what the layers run), heads merged:
    (B, N, num_heads*head_dim)."""
    q, k, v = _heads(qkv, num_heads)
    return _merged(F.scaled_dot_product_attention(q, k, v, scale=scale))


def softmax_attention_formula(qkv, num_heads: int, scale: float) -> torch.Tensor:
    """The same written out as the official code does (q @ k^T * scale, softmax, @ v): slower than SDPA, but with
    the forward-mode derivative and the second derivative that SDPA's CPU kernel lacks."""
    q, k, v = _heads(qkv, num_heads)
    return _merged(((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v)
