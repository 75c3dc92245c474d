"""clasp_torch vs the literal CPU transcription of Algorithm 1, on the same features.

For every image of a dev set: backbone features are computed once; then

* the reference (``benchmarks/reference.py``: numpy full ``eigh`` of A, sklearn
  ``KMeans(n_init=10)`` and ``silhouette_score`` for each K of the band), and
* clasp_torch's batched spectral + clustering stage (``CLASP.cluster_features``)

run on those same features. Reported: agreement of ``K_opt`` and of the chosen K, per-image
Hungarian mIoU / pixel accuracy of both (patch variant), and the time of the
spectral+clustering stage per image, as a ratio measured in this one run.

    python -m benchmarks.compare_reference --dataset cocostuff --root ../shared/data/cocostuff-val-dev
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.reference import (
    DATASETS,
    dataset_scores,
    hungarian_miou_stats,
    list_pairs,
    load_pair,
    pixel_labels,
    reference_clasp,
)


@dataclass
class Comparison:
    """Outcome of :func:`compare` (all times in seconds)."""

    n_images: int
    k_opt_agreement: float
    k_agreement: float
    ours: dict[str, float]
    reference: dict[str, float]
    time_ours: float
    time_reference: float
    speedup: float
    per_image: list[dict[str, Any]] = field(default_factory=list)


def compare(root: str, dataset: str, backbone: str = "efficientnet_lite0", limit: int | None = None,
            max_patches: int = 2500, threads: int | None = None, progress: bool = True) -> Comparison:
    """Run both implementations on the same features of every image under ``root``."""
    import torch

    from clasp_torch.pipeline import CLASP

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CLASP(backbone, refiner=None, max_patches=max_patches).eval()
    num_classes, ignore = DATASETS[dataset]
    pairs = list_pairs(root)[:limit]
    acc = {name: [np.zeros(num_classes, np.int64) for _ in range(3)] + [0, 0] for name in ("ours", "reference")}
    t_ours: list[float] = []
    t_ref: list[float] = []
    per_image = []
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc=f"{dataset}: ours vs reference")
    for img_id, ip, lp in it:
        img, gt = load_pair(ip, lp)
        im_t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        feats, pmask, grids = model.extract_features([im_t])
        # ours (warm: the first image pays one-off costs in both)
        t = time.perf_counter()
        patch, k_opt, _, sel = model.cluster_features(feats, pmask)
        t_ours.append(time.perf_counter() - t)
        h, w = int(grids[0, 0]), int(grids[0, 1])
        ours_patch = patch[0, :h, :w].numpy()
        # reference on the very same features
        f_np = feats[0, :h, :w].double().numpy()
        t = time.perf_counter()
        ref = reference_clasp(f_np)
        t_ref.append(time.perf_counter() - t)
        H, W = gt.shape
        rec: dict[str, Any] = {"id": img_id, "n": h * w}
        for name, lab, kk, ko in (("ours", ours_patch, int(sel.k[0]), int(k_opt[0])),
                                  ("reference", ref.labels, ref.k, ref.k_opt)):
            st = hungarian_miou_stats(pixel_labels(lab, H, W), gt, num_classes, ignore)
            a = acc[name]
            a[0] += st["tp"]
            a[1] += st["fp"]
            a[2] += st["fn"]
            a[3] += int(st["correct"])
            a[4] += int(st["total"])
            im_miou, _ = dataset_scores(st["tp"], st["fp"], st["fn"], int(st["correct"]), int(st["total"]))
            rec[name] = {"k": kk, "k_opt": ko, "miou": im_miou}
        per_image.append(rec)
    scores = {}
    for name, a in acc.items():
        miou, pa = dataset_scores(a[0], a[1], a[2], a[3], a[4])
        scores[name] = {"miou": miou, "pixel_accuracy": pa,  # already in %
                        "mean_k": statistics.mean(r[name]["k"] for r in per_image)}
    n = len(per_image)
    # medians over images, the first image excluded (warm-up) when there are several
    sl = slice(1, None) if n > 1 else slice(None)
    to, tr = statistics.median(t_ours[sl]), statistics.median(t_ref[sl])
    return Comparison(
        n_images=n,
        k_opt_agreement=sum(r["ours"]["k_opt"] == r["reference"]["k_opt"] for r in per_image) / max(n, 1),
        k_agreement=sum(r["ours"]["k"] == r["reference"]["k"] for r in per_image) / max(n, 1),
        ours=scores["ours"], reference=scores["reference"], time_ours=to, time_reference=tr,
        speedup=tr / to if to > 0 else float("inf"), per_image=per_image,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cocostuff")
    ap.add_argument("--root", default=os.path.join("..", "shared", "data", "cocostuff-val-dev"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads, and (threadpoolctl) numpy/sklearn threads of the reference")
    args = ap.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(args.threads):
            c = compare(args.root, args.dataset, args.backbone, args.limit, threads=args.threads)
    else:
        c = compare(args.root, args.dataset, args.backbone, args.limit)
    print(f"\n{args.dataset}: {c.n_images} images, backbone {args.backbone}, patch variant")
    print("| implementation | mIoU | pixel acc. | mean K |")
    print("| --- | --- | --- | --- |")
    for name, s in (("literal reference (numpy eigh + sklearn)", c.reference), ("clasp_torch", c.ours)):
        print(f"| {name} | {s['miou']:.1f} | {s['pixel_accuracy']:.1f} | {s['mean_k']:.2f} |")
    print(f"K_opt agreement {100 * c.k_opt_agreement:.0f}%, chosen-K agreement {100 * c.k_agreement:.0f}%")
    print(f"spectral+clustering per image (median): reference {1000 * c.time_reference:.0f} ms, "
          f"clasp_torch {1000 * c.time_ours:.0f} ms -> {c.speedup:.1f}x faster")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(c), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
