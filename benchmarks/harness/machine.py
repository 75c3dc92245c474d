"""The machine a benchmark runs on, and the thread / cost-policy settings it runs with."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["machine_description", "describe", "thread_limits", "pinned_cluster_policy"]


def machine_description(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, core count, load, torch version and GPU name (when on CUDA)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        desc["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        desc["loadavg"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(torch.device(device))
        desc["cuda"] = torch.version.cuda
    return desc


def describe(desc: dict[str, Any]) -> str:
    """One line of a :func:`machine_description`."""
    s = f"CPU {desc['cpu']} ({desc['cpu_count']} logical cores, torch threads {desc['torch_threads']})"
    if desc.get("gpu"):
        s += f", GPU {desc['gpu']} (CUDA {desc.get('cuda')})"
    s += f", torch {desc['torch']}, Python {desc['python']}"
    if desc.get("loadavg"):
        s += f", load average {desc['loadavg'][0]:.1f}"
    return s


@contextlib.contextmanager
def thread_limits(n: int | None) -> Iterator[None]:
    """Limit torch (and, via threadpoolctl, numpy/scipy/sklearn BLAS/OpenMP) to ``n`` CPU threads
    inside the block; ``None`` leaves the library defaults. Restores the previous settings."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    ctx = threadpool_limits(n) if threadpool_limits is not None else contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def pinned_cluster_policy(policy: Any | None) -> Iterator[None]:
    """Inside the block, ``clasp_torch.cluster.policy.cluster_policy`` (what the stages call; the
    package's re-export ``clasp_torch.cluster.cluster_policy`` too) returns ``policy`` whatever the
    device (``None``: the device's own), so that a CPU run can count or measure what a GPU run
    does with the GPU's choices (they never change a result)."""
    if policy is None:
        yield
        return
    from unittest import mock

    from clasp_torch import cluster
    from clasp_torch.cluster import policy as policy_module

    def pinned(_device: torch.device) -> Any:
        return policy

    with (mock.patch.object(policy_module, "cluster_policy", pinned),
          mock.patch.object(cluster, "cluster_policy", pinned)):
        yield
