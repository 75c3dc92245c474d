"""Kernel launches and host syncs of each CLASP stage per batch: how launch-bound a GPU run will be.

    python -m benchmarks.launches --backbone dinov2_vits14_reg --batch-sizes 1 8 32

Eager PyTorch on a GPU pays a host-side cost for every operator (Python + dispatcher + launch, a few
microseconds) and stalls the host at every operation whose result the host must read (``.item()``,
``int(t)``, ``if t.any()``, ``.tolist()``, ``nonzero``, boolean indexing, ``unique``,
``repeat_interleave`` without ``output_size``, ``bincount``). Small-tensor stages (the eigengap elbow,
k-means, the silhouette) can therefore be bound by the *number* of operators, not by FLOPs. These
counts do not depend on the device, so a CPU run tells what a GPU run will face:

* ``kernels``: ATen operators that launch work (views, ``empty*`` and scalar reads excluded),
  counted with a ``TorchDispatchMode`` while the stage runs (the stage decomposition of
  ``benchmarks/run.py``: backbone, affinity+eigen, elbow, kmeans, silhouette, select, crf);
* ``syncs``: operations that make a CUDA host wait for the device (the list above);
Defaults count what a GPU run does: the CRF builds its lattices in chunks of ``2**22`` points and
k-means compacts its working arrays only when half the restarts have converged and scores all K
as one group, the silhouette uses blocks of ``2**27`` elements (the CUDA defaults of
``clasp_torch.cluster.cluster_policy``; ``--lattice-chunk-points 0 --compact-below 1 --k-groups 3
--silhouette-block 33554432`` counts the CPU's).

* ``host_us_per_op``: this machine's measured eager cost of one small operator (median over a
  loop of ``add`` on 1000-element tensors), and ``launch_floor_ms = kernels × host_us_per_op``:
  a lower bound on the stage's time on any GPU driven by a host like this one, however fast the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .harness import (
    STAGES,
    describe,
    load_images,
    machine_description,
    pinned_cluster_policy,
    probe_stages,
    thread_limits,
    write_outputs,
)

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "_local_scalar_dense", "detach", "alias",
              "set_", "resize_"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "bincount"}


def _op_name(func: Any) -> str:
    return func._schema.name.split("::")[-1]


def is_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when ``func(*args, **kwargs)`` needs a device result on the host (on CUDA)."""
    name = _op_name(func)
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return len(args) < 3 or args[2] is None  # (repeats, dim?, output_size?) / (self, repeats, dim, output_size)
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ATen operators and host syncs (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.sync_by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = _op_name(func)
        if not func.is_view and name not in _NO_KERNEL:
            self.kernels += 1
            self.by_op[name] += 1
        if is_sync(func, args, kwargs):
            self.syncs += 1
            self.sync_by_op[name] += 1
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """``Tensor.tolist`` / ``.cpu()`` / ``.numpy()``: device-to-host copies not visible as ATen ops on a CPU."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy):
            self.counter.syncs += 1
            self.counter.sync_by_op[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounter]:
    """``with count_ops() as c: ...`` then ``c.kernels``, ``c.syncs``, ``c.by_op``, ``c.sync_by_op``."""
    c = OpCounter()
    with _HostReads(c), c:
        yield c


def host_us_per_op(device: torch.device | str = "cpu", n: int = 2000) -> float:
    """Median microseconds of one eager ``torch.add`` on 1000-element tensors of ``device``, in a
    loop of ``n`` (on CUDA: launches queued back to back, one synchronize per loop), i.e. the
    rate at which this host issues small operators."""
    device = torch.device(device)
    a, b = torch.ones(1000, device=device), torch.ones(1000, device=device)
    ts = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(ts)


def stage_counts(model: Any, imgs: list[torch.Tensor], device: torch.device) -> dict[str, dict[str, Any]]:
    """Kernel and sync counts of each stage of ``benchmarks.run.run_stages`` on one batch."""
    counters = probe_stages(model, imgs, device, count_ops)
    return {s: {"kernels": c.kernels, "syncs": c.syncs, "top_ops": dict(c.by_op.most_common(6)),
                "sync_ops": dict(c.sync_by_op.most_common())} for s, c in counters.items()}


def markdown(rows: dict[int, dict[str, dict[str, Any]]], us_per_op: float, meta: dict[str, Any]) -> str:
    stages = [s for s in (*STAGES, "cluster_features") if any(s in r for r in rows.values())]
    lines = [f"Kernels launched / host syncs per batch, backbone `{meta['backbone']}`, "
             f"{meta['size'][0]}x{meta['size'][1]}; "
             f"host cost of one small op here: {us_per_op:.1f} µs; {describe(meta['machine'])}.", "",
             "| batch | " + " | ".join(stages) + " | launch floor of cluster_features (ms per image) |",
             "|---:|" + "---:|" * (len(stages) + 1)]
    for bs, r in rows.items():
        cells = [f"{r[s]['kernels']} / {r[s]['syncs']}" if s in r else "-" for s in stages]
        floor = r["cluster_features"]["kernels"] * us_per_op / 1000 / bs if "cluster_features" in r else float("nan")
        lines.append(f"| {bs} | " + " | ".join(cells) + f" | {floor:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="dinov2_vits14_reg")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--image-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lattice-chunk-points", type=int, default=2**22,
                    help="CRF lattice build chunk (default: the CUDA default, so the counts are a GPU run's)")
    ap.add_argument("--compact-below", type=float, default=0.5,
                    help="k-means compaction policy (default: the CUDA default 0.5; the CPU's is 1.0)")
    ap.add_argument("--k-groups", type=int, default=1,
                    help="k-means K groups scored separately (default: the CUDA default 1; the CPU's is 3)")
    ap.add_argument("--silhouette-block", type=int, default=2**27,
                    help="silhouette block elements (default: the CUDA default 2**27; the CPU's is 2**25)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown-file", default=None)
    args = ap.parse_args(argv)
    from clasp_torch.pipeline import CLASP

    device = torch.device(args.device)
    with thread_limits(args.threads):
        pretrained = not args.backbone.startswith("dinov2")
        torch.manual_seed(0)
        model = CLASP(args.backbone, pretrained=pretrained,
                      crf_params={"lattice_chunk_points": args.lattice_chunk_points}).to(device).eval()
        imgs_all, source = load_images(max(args.batch_sizes), tuple(args.size), args.image_dir)
        imgs_all = [im.to(device) for im in imgs_all]
        meta = {"device": str(device), "backbone": args.backbone, "size": list(args.size), "source": source,
                "lattice_chunk_points": args.lattice_chunk_points, "compact_below": args.compact_below,
                "k_groups": args.k_groups, "silhouette_block": args.silhouette_block,
                "machine": machine_description(device), "argv": sys.argv[1:] if argv is None else argv}
        us = host_us_per_op(device)
        rows: dict[int, dict[str, dict[str, Any]]] = {}
        from clasp_torch import cluster

        # the clustering stage asks cluster_policy(device); pin the one asked for
        policy = cluster.ClusterPolicy(compact_below=args.compact_below, max_groups=args.k_groups,
                                       max_block_elements=args.silhouette_block)
        for bs in args.batch_sizes:
            with pinned_cluster_policy(policy):
                rows[bs] = stage_counts(model, imgs_all[:bs], device)
            counts = ", ".join(f"{s} {v['kernels']}/{v['syncs']}" for s, v in rows[bs].items())
            print(f"batch {bs}: " + counts, flush=True)
        md = markdown(rows, us, meta)
        print(md)
        result = {"meta": meta, "host_us_per_op": us, "rows": {str(k): v for k, v in rows.items()}}
        write_outputs((args.json, json.dumps(result, indent=1)), (args.markdown_file, md))
        return result


if __name__ == "__main__":
    main()
