"""Peak memory of a block: process RSS (sampled), tensor bytes (CUDA allocator or the CPU
profiler's allocation events), or whichever of the two a device reports."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PeakRSS", "TensorPeak", "PeakMemory", "tensor_peak"]


class PeakRSS:
    """Samples the process RSS in a background thread; ``delta_mib`` is the high-water mark
    above the RSS at entry (``peak_mib`` the absolute high-water mark)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


class TensorPeak:
    """Context manager: peak bytes held by tensors inside the block, above the entry level.

    ``peak_bytes`` after exit. CUDA: ``max_memory_allocated`` − ``memory_allocated`` at entry.
    CPU: maximum running sum of the allocation events recorded by ``torch.profiler``.

    Example:
        >>> with TensorPeak(torch.device("cpu")) as tp:
        ...     a = torch.empty(1000, 1000)          # 4 MB
        ...     b = torch.empty(2000, 2000); del b   # 16 MB, freed
        ...     c = torch.empty(500, 1000)           # 2 MB
        >>> tp.peak_bytes >= 20_000_000, tp.peak_bytes < 20_100_000
        (True, True)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.base_bytes = 0  # CUDA: memory_allocated at entry
        self._prof: Any = None

    def __enter__(self) -> TensorPeak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
            return
        self._prof.__exit__(*exc)
        events = [
            (e.start_ns(), e.nbytes())
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        events.sort(key=lambda t: t[0])
        run = peak = 0
        for _, nb in events:
            run += nb
            peak = max(peak, run)
        self.peak_bytes = peak
        self._prof = None


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` (absolute, MiB) or CPU RSS delta."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")  # CUDA: max_memory_allocated; CPU: absolute peak RSS of the process
        self.delta_mib = float("nan")  # CUDA: above memory_allocated at entry; CPU: above RSS at entry
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS (process)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self._tp = TensorPeak(self.device).__enter__()
        else:
            gc.collect()
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._tp.__exit__(*exc)
            self.delta_mib = self._tp.peak_bytes / 2**20
            self.mib = (self._tp.base_bytes + self._tp.peak_bytes) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.mib = self._rss.peak_mib
            self.delta_mib = self._rss.delta_mib



def tensor_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``(fn(), peak tensor bytes of the call)`` (a :class:`TensorPeak` around it)."""
    with TensorPeak(device) as tp:
        out = fn()
    return out, tp.peak_bytes
