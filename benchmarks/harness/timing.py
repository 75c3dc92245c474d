"""Clock reads that wait for the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["sync", "timed"]


def sync(device: torch.device) -> None:
    """``torch.cuda.synchronize`` on a CUDA device, nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; wall seconds with a device synchronize before each clock read."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0
