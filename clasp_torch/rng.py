"""Counter-based random numbers: a hash of integer keys, so that a draw depends only on the seed
and its own keys (an image's k-means restarts give the same draws alone or inside any batch, on
any device)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hash_uniform", "hash32"]

_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """Integer avalanche hash on the low 32 bits of an int64 tensor (multipliers < 2**31)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seed: int, *keys: Tensor) -> Tensor:
    """Counter-based uniform numbers in [0, 1) from integer keys (broadcast together).

    Deterministic on every device and independent of how problems are batched.

    Example:
        >>> u = hash_uniform(0, torch.arange(4))
        >>> bool(((u >= 0) & (u < 1)).all()), u.dtype
        (True, torch.float64)
    """
    h = torch.as_tensor(seed & _MASK32, dtype=torch.int64, device="cpu")
    h = hash32(h + 0x9E3779B9)
    out = None
    for k in keys:
        base = h if out is None else out
        out = hash32(base.to(k.device) ^ hash32(k.long() + 0x632BE5AB))
    assert out is not None
    return out.double() / 4294967296.0
