"""Benchmark clasp_torch.crf.dense_crf against pydensecrf on the same inputs.

Prints, for a 640x480 image with 10 labels and 20 mean-field iterations:
  * wall time per image of pydensecrf and of the torch implementation (interleaved runs, min and median),
    the ratio torch / pydensecrf (target <= 1.0) for each requested torch thread count;
  * pixel-label agreement between the two on that input and on real images from
    ../shared/data/{cocostuff,ade20k}-val-dev/images (when present);
  * peak memory of a batch of 16 images of 640x480 with 10 labels (CPU: RSS high-water mark above
    the pre-call RSS, sampled by a background thread; CUDA: torch.cuda.max_memory_allocated) and the
    per-image time in the batch.

Usage:
    python benchmarks/bench_crf.py [--device cpu|cuda] [--threads 1,2] [--reps 3] [--batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(
    0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
)

from benchmarks.harness import SHARED_DATA, PeakRSS
from clasp_torch.crf import dense_crf, unary_from_labels

SHARED = SHARED_DATA
IMAGE_DIRS = [
    os.path.join(SHARED, "cocostuff-val-dev", "images"),
    os.path.join(SHARED, "ade20k-val-dev", "images"),
]


def blocky_labels(img: np.ndarray, n_labels: int, block: int = 16) -> np.ndarray:
    H, W = img.shape[:2]
    small = img[::block, ::block].astype(np.int64)
    code = (small[..., 0] // 86) * 9 + (small[..., 1] // 86) * 3 + (small[..., 2] // 86)
    return np.repeat(np.repeat(code % n_labels, block, 0), block, 1)[:H, :W].copy()


def load_image(
    path: str | None, size: tuple[int, int] | None = (640, 480)
) -> np.ndarray:
    from PIL import Image

    if path is None:
        files = sorted(
            f for d in IMAGE_DIRS for f in glob.glob(os.path.join(d, "*.jpg"))
        )
        path = files[0] if files else None
    if path is None:  # synthetic fallback: smooth colour blobs + noise
        g = np.random.default_rng(0)
        W, H = size or (640, 480)
        yy, xx = np.mgrid[:H, :W]
        img = np.stack(
            [
                128 + 100 * np.sin(xx / (40 + 20 * c) + c) * np.cos(yy / 50)
                for c in range(3)
            ],
            -1,
        )
        return np.clip(img + g.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    im = Image.open(path).convert("RGB")
    if size is not None:
        im = im.resize(size, Image.BILINEAR)
    return np.array(im)


def run_pydensecrf(img: np.ndarray, lab: np.ndarray, K: int, n_iter: int) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels as pd_unary

    H, W = lab.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(pd_unary(lab, K, 0.8, zero_unsure=False))
    d.addPairwiseGaussian(sxy=4, compat=4)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(img), compat=10)
    return np.array(d.inference(n_iter)).reshape(K, H, W)


def run_torch(
    timg: torch.Tensor,
    tlab: torch.Tensor,
    K: int,
    n_iter: int,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    Q = dense_crf(timg, unary_from_labels(tlab, K, 0.8), n_iter=n_iter, mask=mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Q


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch CPU thread counts to time (default: '1,<torch default>')",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--labels", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--image",
        default=None,
        help="image path (default: first COCO dev image, resized to 640x480)",
    )
    ap.add_argument(
        "--n-agree",
        type=int,
        default=3,
        help="real images per dataset for the agreement check",
    )
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def _time_single_image(img: np.ndarray, lab: np.ndarray, nt: int, args: argparse.Namespace, device: torch.device,
                       have_pd: bool) -> dict:
    """Interleaved timed runs of both sides on one image with ``nt`` torch threads."""
    K, n_iter = args.labels, args.iters
    timg = torch.from_numpy(img).permute(2, 0, 1)[None].to(device)
    tlab = torch.from_numpy(lab)[None].to(device)
    torch.set_num_threads(nt)
    run_torch(timg, tlab, K, n_iter, device)  # warm-up of both sides
    if have_pd:
        run_pydensecrf(img, lab, K, n_iter)
    tp, tt = [], []
    for _ in range(args.reps):
        if have_pd:
            t0 = time.perf_counter()
            Qr = run_pydensecrf(img, lab, K, n_iter)
            tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Qt = run_torch(timg, tlab, K, n_iter, device)
        tt.append(time.perf_counter() - t0)
    entry = {
        "torch_s": tt,
        "torch_min_s": min(tt),
        "torch_median_s": statistics.median(tt),
    }
    line = f"[threads={nt}] torch: min {min(tt):.3f}s median {statistics.median(tt):.3f}s"
    if have_pd:
        agree = float((Qt[0].argmax(0).cpu().numpy() == Qr.argmax(0)).mean())
        entry.update(
            pydensecrf_s=tp,
            pydensecrf_min_s=min(tp),
            pydensecrf_median_s=statistics.median(tp),
            ratio_min=min(tt) / min(tp),
            ratio_median=statistics.median(tt) / statistics.median(tp),
            agreement=agree,
            max_abs_dq=float(np.abs(Qt[0].cpu().numpy() - Qr).max()),
        )
        line += (
            f" | pydensecrf: min {min(tp):.3f}s median {statistics.median(tp):.3f}s"
            f" | ratio torch/pydensecrf: {entry['ratio_min']:.3f} (min) {entry['ratio_median']:.3f} (median)"
            f" | label agreement {agree:.5f}, max|dQ| {entry['max_abs_dq']:.1e}"
        )
    print(line)
    return entry


def _agreement_on_real_images(args: argparse.Namespace, device: torch.device, results: dict) -> None:
    """Pixel-label agreement with pydensecrf on ``--n-agree`` real images per dataset."""
    n_iter = args.iters
    files = [
        f
        for d in IMAGE_DIRS
        for f in sorted(glob.glob(os.path.join(d, "*.jpg")))[: args.n_agree]
    ]
    agreements = {}
    for i, f in enumerate(files):
        im = load_image(f, size=None)
        k = 6 + 2 * (i % 3)
        lb = blocky_labels(im, k)
        Qr = run_pydensecrf(im, lb, k, n_iter)
        Qt = run_torch(
            torch.from_numpy(im).permute(2, 0, 1)[None].to(device),
            torch.from_numpy(lb)[None].to(device),
            k,
            n_iter,
            device,
        )
        a = float((Qt[0].argmax(0).cpu().numpy() == Qr.argmax(0)).mean())
        agreements[os.path.basename(f)] = a
        print(
            f"agreement {os.path.basename(f)} ({im.shape[1]}x{im.shape[0]}, K={k}): {a:.5f}"
        )
    if agreements:
        results["agreement_real"] = agreements
        results["agreement_real_mean"] = float(np.mean(list(agreements.values())))
        print(
            f"mean pixel-label agreement with pydensecrf on {len(agreements)} real images: "
            f"{results['agreement_real_mean']:.5f}"
        )
    else:
        print(f"no real images under {SHARED}: agreement on real images skipped")


def _batch_time_and_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """Time and peak memory of one batch of ``--batch`` 640x480 images."""
    K, n_iter = args.labels, args.iters
    files = sorted(
        f for d in IMAGE_DIRS for f in glob.glob(os.path.join(d, "*.jpg"))
    )
    imgs = [
        load_image(files[i % len(files)] if files else None)
        for i in range(args.batch)
    ]
    bimg = (
        torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(device)
    )
    blab = torch.from_numpy(np.stack([blocky_labels(im, K) for im in imgs])).to(
        device
    )
    if device.type == "cuda":
        run_torch(bimg[:2], blab[:2], K, 2, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        Q = run_torch(bimg, blab, K, n_iter, device)
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        mem_kind = "torch.cuda.max_memory_allocated"
    else:
        gc.collect()
        with PeakRSS() as pr:
            t0 = time.perf_counter()
            Q = run_torch(bimg, blab, K, n_iter, device)
            dt = time.perf_counter() - t0
        peak = pr.delta_mib
        mem_kind = "RSS high-water delta"
    del Q
    print(
        f"batch of {args.batch} x 640x480, {K} labels: {dt:.2f}s total, {dt / args.batch:.3f}s/image, "
        f"peak memory {peak:.0f} MiB ({mem_kind}, threads={torch.get_num_threads()})"
    )
    return {
        "batch": args.batch,
        "time_s": dt,
        "per_image_s": dt / args.batch,
        "peak_mib": peak,
        "memory_measure": mem_kind,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    K, n_iter = args.labels, args.iters
    default_threads = torch.get_num_threads()
    threads = (
        [int(t) for t in args.threads.split(",")]
        if args.threads
        else sorted({1, default_threads})
    )
    results: dict = {
        "device": str(device),
        "labels": K,
        "iters": n_iter,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    try:
        results["loadavg_start"] = os.getloadavg()
    except OSError:
        pass

    img = load_image(args.image)
    lab = blocky_labels(img, K)
    H, W = lab.shape
    print(f"input {W}x{H}, {K} labels, {n_iter} iterations, device={device}")

    # ---- single-image timing, interleaved ----------------------------------------------------------------
    have_pd = True
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        have_pd = False
        print("pydensecrf not installed: skipping the reference timing / agreement")
    timing = {}
    for nt in threads if device.type == "cpu" else [default_threads]:
        timing[nt] = _time_single_image(img, lab, nt, args, device, have_pd)
    best_threads = min(timing, key=lambda t: timing[t]["torch_median_s"])
    torch.set_num_threads(best_threads if device.type == "cpu" else default_threads)
    results["single_image"] = timing
    results["best_threads"] = best_threads

    # ---- agreement on real images, batch of 16: time and peak memory ---------------------------------------
    if have_pd:
        _agreement_on_real_images(args, device, results)
    if not args.skip_batch:
        results["batch"] = _batch_time_and_memory(args, device)
    try:
        results["loadavg_end"] = os.getloadavg()
        print(
            f"load average start {results['loadavg_start']} end {results['loadavg_end']} "
            f"(other processes on this machine inflate multi-threaded torch timings)"
        )
    except (OSError, KeyError):
        pass
    torch.set_num_threads(default_threads)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
