"""The eager formula of dropout_add, bitwise the cpp kernel's: Philox4x32-10 in torch's int64 arithmetic (each
32x32-bit product split into 16-bit halves, so nothing overflows), then residual + x * mask."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # its Weyl key increments
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for a constant a < 2^32 and int64 b holding values < 2^32."""
    low_product = b * (a & 0xFFFF)  # < 2^48
    mid = b * (a >> 16) + (low_product >> 16)  # a * b = mid 2^16 + (low_product mod 2^16); mid < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32_10(counter: Tensor, key: tuple[int | Tensor, int | Tensor]) -> Tensor:
    """Philox4x32-10 (Salmon et al., SC 2011): counter (..., 4) int64 words (each < 2^32, low word first) and the
    key's two words (ints or 0-dim int64 tensors) -> (..., 4) int64 words."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def keep_mask(shape, p: float, seed: int | Tensor, device=None) -> Tensor:
    """The kernel's mask: element e (row-major) kept when word e % 4 of Philox(e // 4) is >= floor(p 2^32). seed:
    an int or a 0-dim int64 tensor (the key's words stay tensors then: no .item(), so torch.compile traces it)."""
    numel = math.prod(shape)
    calls = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(calls)
    counter = torch.stack((calls & _MASK32, calls >> 32, zeros, zeros), dim=-1)
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32)).reshape(-1)[:numel]
    return (words >= int(p * 2.0**32)).reshape(shape)


def dropout_add(x: Tensor, residual: Tensor | None, p: float, seed: int | Tensor) -> Tensor:
    """residual + x * mask / (1 - p) (x * mask / (1 - p) without residual) with the scale in x's dtype, as
    F.dropout keeps it; p = 0 is the identity on x and p = 1 drops everything (x * 0)."""
    if p <= 0.0:
        dropped = x
    elif p >= 1.0:
        dropped = x * 0
    else:
        scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=x.device)
        dropped = x * torch.where(keep_mask(x.shape, p, seed, x.device), scale, torch.zeros_like(scale))
    return dropped if residual is None else residual + dropped
