"""Scaling of the spectral+clustering stage with the number of patches, and of the CRF with image size.

Spectral+clustering (synthetic features with cluster structure, ``D = 384`` like DINOv2 ViT-S):
for each ``n`` in ``--n`` (default 500 1000 2000 4000 8000), one image of ``n`` patches goes
through ``spectral_decomposition`` (Gram path: ``F̂ᵀF̂`` + ``eigh`` of ``D x D`` in float64; and the
full path ``method="full"``: ``eigh`` of the ``n x n`` affinity, skipped above ``--full-max``
patches) → ``eigengap_elbow`` + ``k_band`` → ``kmeans`` on the (image, K) problems of
``select_k`` → the silhouettes of the same problems (``kmeans_of``/``silhouette_of``: ``select_k``'s
own calls). The K band is fixed (``--k-opt 8``: K = 4..12, 9 problems of 10 restarts) so that the
clustering work is comparable across ``n`` (the elbow is still run and timed). Times are medians
over ``--repeats`` after a warm-up at the same size; memory is measured on the warm-up call
(CPU: process RSS high-water mark above the RSS at entry, sampled every 2 ms; CUDA:
``max_memory_allocated`` above the allocation at entry).

CRF: the torch dense CRF (``crf_refine_labels``, 20 mean-field iterations, pydensecrf's default
kernels) on a real photo resized to each size in ``--megapixels`` (default 0.1 .. 4 MP, 4:3) with 8
labels; pydensecrf on the same inputs up to ``--crf-ref-max`` megapixels (CPU reference). Both sides
run once untimed at each size (warm-up), then ``--repeats`` interleaved timed runs; medians.

Outputs (``--out-dir``, default ``benchmarks/out``): ``scaling_spectral.csv``,
``scaling_crf.csv``, ``scaling_spectral.png``, ``scaling_crf.png``, and log-log slope estimates
printed (least squares of ``log t`` on ``log n``). Expected: Gram-path eigen ≈ 1 (linear in ``n``
at fixed ``D``), full eigh ≈ 3 (``O(n³)``, seen only at large ``n``), k-means ≈ 1, silhouette → 2
(inherently ``O(n²)`` compute; its memory stays bounded by the row chunking), CRF ≈ 1 in pixels.

    python -m benchmarks.scaling [--device cpu|cuda] [--n 500 1000 2000 4000 8000]
        [--megapixels 0.1 0.25 0.5 1 2 4] [--full-max 2000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    OUT_DIR,
    PeakMemory,
    describe,
    kmeans_of,
    load_images,
    machine_description,
    problems_of,
    silhouette_of,
    thread_limits,
    timed,
)


def synthetic_features(n: int, D: int = 384, n_clusters: int = 8, seed: int = 0) -> torch.Tensor:
    """``(1, n, D)`` float32 features: a shared component + one of ``n_clusters`` directions + noise,
    laid out in spatially contiguous blocks (like segments of an image)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g) * 2.0
    centres = torch.randn(n_clusters, D, generator=g) * 1.5
    lab = (torch.arange(n) * n_clusters) // n  # contiguous blocks
    x = common + centres[lab] + torch.randn(n, D, generator=g)
    return x.unsqueeze(0)


def time_spectral(n: int, method: str, device: torch.device, repeats: int, D: int = 384,
                  k_opt_fixed: int | None = 8) -> dict[str, Any]:
    """Median seconds of eigen / elbow / kmeans / silhouette for one image of ``n`` patches.

    With ``k_opt_fixed`` the K band is ``k_band(k_opt_fixed)`` for every ``n`` (the elbow is still
    computed and timed, and reported as ``k_opt_elbow``), so that the clustering work per ``n``
    is comparable across sizes; ``None`` uses the elbow's band.
    """
    from clasp_torch.spectral import eigengap_elbow, k_band, spectral_decomposition

    f = synthetic_features(n, D).to(device)
    m = torch.ones(1, n, dtype=torch.bool, device=device)

    def once() -> tuple[dict[str, float], dict[str, Any]]:
        t: dict[str, float] = {}
        spec, t["eigen"] = timed(lambda: spectral_decomposition(f, m, method=method), device)

        def elbow():
            k_opt = eigengap_elbow(spec.eigenvalues, spec.n)
            return (k_opt, *k_band(k_opt, spec.n, 0.5))

        (k_opt, lo, hi), t["elbow"] = timed(elbow, device)
        if k_opt_fixed is not None:
            lo, hi = k_band(torch.full_like(k_opt, k_opt_fixed), spec.n, 0.5)
        prob = problems_of(spec.eigenvectors, m, lo, hi)
        info = {"k_opt_elbow": int(k_opt[0]), "k_lo": int(lo[0]), "k_hi": int(hi[0]),
                "problems": 0 if prob is None else int(prob["k"].numel())}
        if prob is None:
            t["kmeans"] = t["silhouette"] = 0.0
        else:
            res, t["kmeans"] = timed(lambda: kmeans_of(prob), device)
            _, t["silhouette"] = timed(lambda: silhouette_of(prob, res.labels), device)
        t["total"] = sum(t.values())
        return t, info

    with PeakMemory(device) as pm:  # first call at this size: memory (and warm-up)
        _, info = once()
    runs = [once()[0] for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"n": n, "method": method, **out, "peak_mib": pm.delta_mib, **info}


def time_crf(mp: float, device: torch.device, repeats: int, with_ref: bool, n_labels: int = 8) -> dict[str, Any]:
    """Seconds of the torch dense CRF (and pydensecrf) on one ``mp``-megapixel 4:3 image."""
    from clasp_torch.crf import crf_refine_labels

    W = int(round(math.sqrt(mp * 1e6 * 4 / 3)))
    H = int(round(W * 3 / 4))
    img = load_images(1, (W, H))[0][0]
    # blocky labels from a coarse colour quantisation (like upsampled patch labels)
    small = img[:, ::16, ::16].long()
    code = ((small[0] // 86) * 9 + (small[1] // 86) * 3 + small[2] // 86) % n_labels
    lab = code.repeat_interleave(16, 0).repeat_interleave(16, 1)[:H, :W].contiguous()
    ti, tl = img[None].to(device), lab[None].to(device)
    im_np, lab_np = img.permute(1, 2, 0).numpy(), lab.numpy()
    if with_ref:
        from benchmarks.reference import pydensecrf_refine

        pydensecrf_refine(im_np, lab_np, n_labels)  # warm-up at this size, like the torch side's below
    with PeakMemory(device) as pm:  # torch warm-up at this size (and its memory)
        crf_refine_labels(ti, tl, n_labels)
    ts, tr = [], []
    for _ in range(repeats):  # interleaved: both sides see the same machine load
        _, dt = timed(lambda: crf_refine_labels(ti, tl, n_labels), device)
        ts.append(dt)
        if with_ref:
            t0 = time.perf_counter()
            pydensecrf_refine(im_np, lab_np, n_labels)
            tr.append(time.perf_counter() - t0)
    return {"megapixels": W * H / 1e6, "W": W, "H": H, "torch_s": statistics.median(ts), "peak_mib": pm.delta_mib,
            "pydensecrf_s": statistics.median(tr) if tr else float("nan")}


def loglog_slope(x: list[float], y: list[float]) -> float:
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b > 0 and math.isfinite(b)]
    if len(pts) < 2:
        return float("nan")
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def plot(rows_s: list[dict[str, Any]], rows_c: list[dict[str, Any]], out_dir: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if rows_s:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, style in (("gram", "-o"), ("full", "--s")):
            rs = [r for r in rows_s if r["method"] == method]
            if not rs:
                continue
            n = [r["n"] for r in rs]
            for key in ("eigen", "kmeans", "silhouette", "total"):
                if method == "full" and key in ("kmeans", "silhouette"):
                    continue
                a1.loglog(n, [max(r[key], 1e-6) for r in rs], style, label=f"{method}: {key}")
            a2.semilogx(n, [r["peak_mib"] for r in rs], style, label=f"{method}: peak memory")
        a1.set_xlabel("patches n")
        a1.set_ylabel("seconds")
        a1.set_title("spectral+clustering time")
        a1.legend(fontsize=7)
        a2.set_xlabel("patches n")
        a2.set_ylabel("MiB")
        a2.set_title("peak memory")
        a2.legend(fontsize=7)
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "scaling_spectral.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if rows_c:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        mp = [r["megapixels"] for r in rows_c]
        a1.loglog(mp, [r["torch_s"] for r in rows_c], "-o", label="clasp_torch dense_crf")
        if any(math.isfinite(r["pydensecrf_s"]) for r in rows_c):
            a1.loglog(mp, [r["pydensecrf_s"] for r in rows_c], "--s", label="pydensecrf")
        a1.set_xlabel("megapixels")
        a1.set_ylabel("seconds (20 iterations)")
        a1.set_title("dense CRF time")
        a1.legend(fontsize=7)
        a2.plot(mp, [r["peak_mib"] for r in rows_c], "-o")
        a2.set_xlabel("megapixels")
        a2.set_ylabel("MiB")
        a2.set_title("dense CRF peak memory (torch)")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "scaling_crf.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="patch counts (default 500 1000 2000 4000 8000)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k-opt", type=int, default=8,
                    help="fixed K_opt whose band (K_opt/2 .. 3K_opt/2) is clustered at every n (0: the elbow's band)")
    ap.add_argument("--megapixels", type=float, nargs="+", default=None, help="CRF sizes (default 0.1 0.25 0.5 1 2 4)")
    ap.add_argument("--full-max", type=int, default=None,
                    help="largest n for the full-eigh path (default 2000 on CPU, 8000 on CUDA)")
    ap.add_argument("--crf-ref-max", type=float, default=1.0, help="largest megapixels for pydensecrf (CPU reference)")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--no-spectral", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    args = ap.parse_args(argv)
    with thread_limits(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.quick:
        args.n = args.n or [100, 200]
        args.megapixels = args.megapixels or [0.005, 0.01]
        args.repeats = 1
    ns = args.n or [500, 1000, 2000, 4000, 8000]
    mps = args.megapixels or [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    full_max = args.full_max if args.full_max is not None else (8000 if device.type == "cuda" else 2000)
    os.makedirs(args.out_dir, exist_ok=True)
    machine = machine_description(device)
    title = describe(machine)
    print(title, flush=True)

    rows_s: list[dict[str, Any]] = []
    notes: list[str] = []
    if not args.no_spectral:
        for method in ("gram", "full"):
            for n in ns:
                if method == "full" and n > full_max:
                    notes.append(f"full eigh skipped for n={n} > --full-max {full_max} (O(n^3) on {device.type})")
                    print(notes[-1], flush=True)
                    continue
                r = time_spectral(n, method, device, args.repeats, args.dim, args.k_opt if args.k_opt > 0 else None)
                rows_s.append(r)
                print(f"[{method}] n={n}: eigen {1000 * r['eigen']:.1f} ms, elbow {1000 * r['elbow']:.2f} ms, "
                      f"kmeans {1000 * r['kmeans']:.1f} ms, silhouette {1000 * r['silhouette']:.1f} ms, "
                      f"total {1000 * r['total']:.1f} ms, peak {r['peak_mib']:.0f} MiB "
                      f"(elbow K_opt {r['k_opt_elbow']}, band {r['k_lo']}..{r['k_hi']}: {r['problems']} problems)",
                      flush=True)
    rows_c: list[dict[str, Any]] = []
    if not args.no_crf:
        for mp in mps:
            r = time_crf(mp, device, args.repeats, with_ref=device.type == "cpu" and mp <= args.crf_ref_max)
            rows_c.append(r)
            print(f"[crf] {r['W']}x{r['H']} ({r['megapixels']:.2f} MP): torch {r['torch_s']:.3f} s, "
                  f"pydensecrf {r['pydensecrf_s']:.3f} s, peak {r['peak_mib']:.0f} MiB", flush=True)

    slopes: dict[str, float] = {}
    for method in ("gram", "full"):
        rs = [r for r in rows_s if r["method"] == method]
        for key in ("eigen", "kmeans", "silhouette", "total", "peak_mib"):
            if len(rs) >= 2:
                slopes[f"{method}_{key}"] = loglog_slope([r["n"] for r in rs], [r[key] for r in rs])
    if len(rows_c) >= 2:
        slopes["crf_torch"] = loglog_slope([r["megapixels"] for r in rows_c], [r["torch_s"] for r in rows_c])
        slopes["crf_pydensecrf"] = loglog_slope([r["megapixels"] for r in rows_c], [r["pydensecrf_s"] for r in rows_c])
        slopes["crf_peak_mib"] = loglog_slope([r["megapixels"] for r in rows_c], [r["peak_mib"] for r in rows_c])
    print("log-log slopes (time ~ size^slope): " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()), flush=True)
    print("expected: gram eigen ~1 (O(n D^2)), full eigen -> 3 (O(n^3)), kmeans ~1, silhouette -> 2 "
          "(inherently O(n^2) compute, memory chunked), crf ~1 in pixels", flush=True)

    write_csv(rows_s, os.path.join(args.out_dir, "scaling_spectral.csv"))
    write_csv(rows_c, os.path.join(args.out_dir, "scaling_crf.csv"))
    pngs = plot(rows_s, rows_c, args.out_dir, title)
    for p in pngs:
        print(f"wrote {p}")
    return {"machine": machine, "spectral": rows_s, "crf": rows_c, "slopes": slopes, "notes": notes, "plots": pngs}


if __name__ == "__main__":
    main()
