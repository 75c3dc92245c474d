"""Peak tensor memory of each CLASP stage and of the whole forward, per batch size, on any device.

    python -m benchmarks.memory --device cpu --backbone dinov2_vits14_reg --batch-sizes 1 8 32

What is measured is the high-water mark of the bytes held by tensors during a block, above what was
held at its entry:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``torch.cuda.memory_allocated`` at entry (the figure of the H100 target "peak GPU memory <= 8 GB").
* CPU: the same quantity from the allocator events that ``torch.profiler`` records with
  ``profile_memory=True`` (each tensor allocation and free, signed, in time order): the maximum of
  their running sum. Unlike the process RSS (``benchmarks/run.py``), it does not count the malloc
  cache, the Python heap or the loaded libraries, so it is the CPU twin of ``max_memory_allocated``.

A CPU run therefore *predicts* the GPU peak of the stages whose kernels allocate the same tensors on
both devices (spectral core, k-means, silhouette, CRF: pure tensor code with explicit chunking). The
backbone differs: CUDA picks other attention kernels (memory-efficient / flash SDPA) and cuBLAS adds
workspaces, and the CUDA caching allocator rounds each block up to 512 bytes. Run it on the GPU
(``benchmarks/gpu_check.sh`` does) for the measured figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .harness import (
    TensorPeak,
    describe,
    load_images,
    machine_description,
    pinned_cluster_policy,
    probe_stages,
    tensor_peak,
    thread_limits,
    write_outputs,
)


@dataclass
class MemoryRow:
    batch_size: int
    backbone_mib: float
    cluster_features_mib: float
    crf_mib: float
    forward_crf_mib: float
    forward_nocrf_mib: float
    inputs_mib: float


def _stage_peaks(model: Any, imgs: list[torch.Tensor], device: torch.device) -> tuple[int, int, int]:
    """Peak bytes of the backbone, the spectral+clustering stage and the refiner, each measured
    around its stage of ``benchmarks.run.run_stages`` (0 for a stage that does not run)."""
    peaks = probe_stages(model, imgs, device, lambda: TensorPeak(device))
    return tuple(peaks[s].peak_bytes if s in peaks else 0 for s in ("backbone", "cluster_features", "crf"))


def measure(model: Any, imgs: list[torch.Tensor], device: torch.device) -> MemoryRow:
    """Peak tensor memory (MiB) of each stage and of ``model(imgs)`` with and without the CRF."""
    mib = 1 / 2**20
    backbone, cluster, crf = _stage_peaks(model, imgs, device)
    refiner = model.refiner
    fwd_crf = tensor_peak(lambda: model(imgs), device)[1] if refiner is not None else 0
    model.refiner = None
    try:
        fwd_nocrf = tensor_peak(lambda: model(imgs), device)[1]
    finally:
        model.refiner = refiner
    inputs = sum(im.numel() * im.element_size() for im in imgs)
    return MemoryRow(len(imgs), backbone * mib, cluster * mib, crf * mib, fwd_crf * mib, fwd_nocrf * mib,
                     inputs * mib)


def crf_label_sweep(imgs: list[torch.Tensor], label_counts: list[int], device: torch.device) -> dict[int, float]:
    """Peak tensor MiB per image of the default CRF refiner on ``imgs`` for each number of labels
    ``C`` (striped synthetic label maps: the CRF's memory depends on ``C`` and the pixel count, not
    on where the labels lie). With random backbone weights K differs from a real model's; this row
    says what another K costs."""
    from clasp_torch.crf_resolution import CRFRefiner
    from clasp_torch.pipeline import pad_images, to_uint8

    refiner = CRFRefiner()
    padded, imask = pad_images([to_uint8(im.to(device)) for im in imgs])
    B, _, H, W = padded.shape
    out: dict[int, float] = {}
    for C in label_counts:
        lab = (torch.arange(H * W, device=device).view(1, H, W) // 997 % C).expand(B, H, W).contiguous()
        k = torch.full((B,), C, device=device)
        out[C] = tensor_peak(lambda lab=lab, k=k: refiner(padded, lab, k, imask), device)[1] / 2**20 / B
    return out


def markdown(rows: list[MemoryRow], meta: dict[str, Any]) -> str:
    kind = ("GPU `max_memory_allocated` above the entry level" if meta["device"].startswith("cuda")
            else "CPU tensor allocations recorded by `torch.profiler` (peak running sum above the entry level)")
    lines = [f"Peak tensor memory (MiB), {kind}; backbone `{meta['backbone']}` "
             f"({'pretrained' if meta['pretrained'] else 'random weights'}), "
             f"{meta['size'][0]}x{meta['size'][1]} inputs, amp={meta['amp']}, "
             f"{'GPU cost policies' if meta.get('gpu_policy') else 'the device’s own cost policies'}; "
             f"{describe(meta['machine'])}.", "",
             "| batch | backbone | spectral+clustering | CRF | forward with CRF | forward without CRF "
             "| per image (with CRF) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.batch_size} | {r.backbone_mib:.0f} | {r.cluster_features_mib:.0f} | {r.crf_mib:.0f} | "
                     f"{r.forward_crf_mib:.0f} | {r.forward_nocrf_mib:.0f} | {r.forward_crf_mib / r.batch_size:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="dinov2_vits14_reg")
    ap.add_argument("--pretrained", choices=("auto", "yes", "no"), default="auto",
                    help="auto: real weights for efficientnet_lite0, random ones for DINOv2 (same memory)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--image-dir", default=None)
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-policy", action="store_true",
                    help="use the GPU's cost policies on any device (clasp_torch.cluster.cluster_policy of a "
                         "GPU, CRF lattices built in chunks of 2**22 points): a CPU run then measures what a GPU "
                         "run allocates")
    ap.add_argument("--crf-labels", type=int, nargs="*", default=[],
                    help="also measure the CRF alone (MiB per image) for these label counts, on 2 images")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown-file", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from clasp_torch.pipeline import CLASP

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    with thread_limits(args.threads):
        pretrained = args.pretrained == "yes" or (args.pretrained == "auto" and not args.backbone.startswith("dinov2"))
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        torch.manual_seed(0)
        crf_params = {"lattice_chunk_points": 2**22} if args.gpu_policy else None
        model = CLASP(args.backbone, pretrained=pretrained, amp_dtype=amp, n_init=args.n_init,
                      crf_params=crf_params).to(device).eval()
        imgs_all, source = load_images(max(args.batch_sizes), tuple(args.size), args.image_dir)
        meta = {"device": str(device), "backbone": args.backbone, "pretrained": pretrained, "size": list(args.size),
                "amp": args.amp, "n_init": args.n_init, "gpu_policy": args.gpu_policy, "source": source,
                "machine": machine_description(device),
                "argv": sys.argv[1:] if argv is None else argv}
        print(describe(meta["machine"]), flush=True)
        model(imgs_all[:1])  # warm-up: lazy initialisations stay out of the first row
        rows: list[MemoryRow] = []
        from clasp_torch.cluster import cluster_policy

        policy = cluster_policy(torch.device("cuda")) if args.gpu_policy else None  # no CUDA needed to ask
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            imgs = [im.to(device) for im in imgs_all[:bs]]
            with pinned_cluster_policy(policy):
                rows.append(measure(model, imgs, device))
            print(f"batch {bs}: {asdict(rows[-1])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        md = markdown(rows, meta)
        sweep = crf_label_sweep(imgs_all[:2], args.crf_labels, device) if args.crf_labels else {}
        if sweep:
            md += ("\n\nCRF alone, MiB per image, by number of labels C (2 images): "
                   + ", ".join(f"C={c}: {v:.0f}" for c, v in sweep.items()))
        print(md)
        result = {"meta": meta, "rows": [asdict(r) for r in rows], "crf_mib_per_image_by_labels": sweep}
        write_outputs((args.json, json.dumps(result, indent=1)), (args.markdown_file, md))
        return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
