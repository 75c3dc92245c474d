"""Compare K selectors: eigengap elbow (the paper's) vs effective rank (spectral entropy).

Runs the CLASP patch variant (``refiner=None``) with the offline ``efficientnet_lite0`` backbone on
the real dev sets beside the project (``../shared/data/cocostuff-val-dev``,
``../shared/data/ade20k-val-dev``; a missing one is skipped with a message) once per selector,
and scores per-image Hungarian-matched mIoU and pixel accuracy
(:class:`clasp_torch.metrics.UnsupervisedSegmentationMetric`, ``matching="per_image"``). Images
are segmented one at a time (batch size 1) so that results do not depend on batch composition.

Usage::

    python -m benchmarks.compare_selectors [--data ../shared/data] [--limit N] \
        [--json benchmarks/out/compare_selectors.json]

Prints a markdown table (one row per dataset x selector): mIoU, pixel accuracy (percent), mean
K_opt (selector estimate), mean chosen K (after the silhouette search over the K band) and
seconds per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clasp_torch.data import SegmentationDataset
from clasp_torch.metrics import UnsupervisedSegmentationMetric
from clasp_torch.pipeline import CLASP

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"cocostuff": "cocostuff-val-dev", "ade20k": "ade20k-val-dev"}
SELECTORS = ("eigengap", "entropy")


def evaluate(model: CLASP, ds: SegmentationDataset) -> dict[str, Any]:
    """Per-image Hungarian mIoU / pixel accuracy and K statistics of ``model`` on ``ds``."""
    metric = UnsupervisedSegmentationMetric(ds.num_classes, ignore_index=ds.ignore_index)
    k_opt, k, secs = [], [], 0.0
    if len(ds):
        model(ds[0]["image"])  # warm-up (one-off costs), untimed, like every selector's model
    for i in range(len(ds)):
        item = ds[i]
        t0 = time.perf_counter()
        out = model(item["image"])
        secs += time.perf_counter() - t0
        metric.update(out.label_map(0), item["label"])
        k_opt.append(int(out.k_opt[0]))
        k.append(int(out.k[0]))
    scores = metric.compute()
    n = max(len(ds), 1)
    return {
        "n_images": len(ds),
        "miou": float(scores["miou"]) * 100,
        "pixel_accuracy": float(scores["pixel_accuracy"]) * 100,
        "mean_k_opt": sum(k_opt) / n,
        "mean_k": sum(k) / n,
        "sec_per_image": secs / n,
        "k_opt": k_opt,
        "k": k,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | images | k_selector | mIoU (%) | pixel acc. (%) | mean K_opt | mean K | s/image |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['n_images']} | {r['k_selector']} | {r['miou']:.1f} | "
            f"{r['pixel_accuracy']:.1f} | {r['mean_k_opt']:.1f} | {r['mean_k']:.1f} | {r['sec_per_image']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the *-val-dev sets")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--limit", type=int, default=None, help="first N images of each set")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    models = {s: CLASP(args.backbone, refiner=None, k_selector=s, seed=args.seed) for s in SELECTORS}
    # one backbone in memory, shared by both models
    models["entropy"].backbone = models["eigengap"].backbone
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        root = args.data / DATASETS[name]
        if not (root / "images").is_dir():
            print(f"skipping {name}: {root} is missing", file=sys.stderr)
            continue
        ds = SegmentationDataset(root, dataset=name, limit=args.limit)  # type: ignore[arg-type]
        for sel in SELECTORS:
            res = evaluate(models[sel], ds)
            res.update(dataset=name, k_selector=sel)
            rows.append(res)
            print(f"{name:9s} {sel:8s} mIoU {res['miou']:.1f}  pAcc {res['pixel_accuracy']:.1f}  "
                  f"K_opt {res['mean_k_opt']:.1f}  K {res['mean_k']:.1f}", file=sys.stderr)
    if not rows:
        print("no dataset found; nothing to compare", file=sys.stderr)
        return 0
    print(markdown_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"backbone": args.backbone, "refiner": None, "matching": "per_image", "seed": args.seed,
                "limit": args.limit, "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
