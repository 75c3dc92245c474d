"""Choose the EfficientNet-Lite0 feature layer by measurement.

For every stride-16 MBConv block (flat indices 5-7: stage 4, 80 channels; 8-10: stage 5,
112 channels) the literal reference (``benchmarks/reference.py``, patch-level labels, no
CRF, max 2500 patches) is run on each dataset and the dataset mIoU / pixel accuracy are
printed as a table. One backbone forward pass per image serves all candidate layers.
Per-image statistics are appended to a cache file (``--cache``, JSON lines) so an
interrupted run resumes where it stopped; the running mIoU of every layer is printed after
each image.

    python -m benchmarks.select_effnet_layer [--data ../shared/data] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_NAMES = {5: "blocks.3.0", 6: "blocks.3.1", 7: "blocks.3.2", 8: "blocks.4.0", 9: "blocks.4.1", 10: "blocks.4.2"}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--datasets", nargs="+", default=["cocostuff", "ade20k"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--impl", choices=["clasp_torch", "reference"], default="clasp_torch",
                    help="clustering implementation: clasp_torch (fast; agrees with the reference on K, see "
                         "benchmarks/compare_reference.py) or the literal numpy/sklearn reference (slow)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache",
                    default=os.path.join(os.path.dirname(__file__), "out", "select_effnet_layer_cache.jsonl"))
    return ap.parse_args(argv)


def _load_cache(path: str | None) -> dict[tuple[str, str], dict]:
    """Records of earlier runs by ``(dataset, image id)``; creates the cache's folder."""
    cache: dict[tuple[str, str], dict] = {}
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    cache[(rec["dataset"], rec["id"])] = rec
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return cache


def _clusterer(impl: str, bb: Any) -> Callable[[np.ndarray], tuple[np.ndarray, int, int]]:
    """``features (h, w, C) -> (patch labels, K_opt, K)`` of clasp_torch or of the literal reference."""
    import torch

    from benchmarks.reference import reference_clasp

    if impl == "clasp_torch":
        from clasp_torch.pipeline import CLASP

        model = CLASP(bb, refiner=None)

        def cluster(f: np.ndarray) -> tuple[np.ndarray, int, int]:
            ft = torch.from_numpy(f)[None]
            mask = torch.ones(ft.shape[:3], dtype=torch.bool)
            lab, k_opt, _, sel = model.cluster_features(ft, mask)
            return lab[0].numpy(), int(k_opt[0]), int(sel.k[0])
    else:

        def cluster(f: np.ndarray) -> tuple[np.ndarray, int, int]:
            r = reference_clasp(f)
            return r.labels, r.k_opt, r.k

    return cluster


def _image_record(ds: str, stem: str, ip: str, lp: str, bb: Any, layers: list[int],
                  cluster: Callable[[np.ndarray], tuple[np.ndarray, int, int]]) -> dict[str, Any]:
    """One backbone pass over the image, then K, the time and the matched counts of every layer."""
    import torch

    from benchmarks.reference import DATASETS, hungarian_miou_stats, load_pair, pixel_labels
    from clasp_torch.preprocess import preprocess_image

    num_classes, ignore = DATASETS[ds]
    img, gt = load_pair(ip, lp)
    x, _ = preprocess_image(torch.from_numpy(img).permute(2, 0, 1).contiguous(), bb.patch_size, bb.mean, bb.std, 2500)
    with torch.inference_mode():
        feats = bb.forward_layers(x[None], layers)
    rec: dict[str, Any] = {"dataset": ds, "id": stem, "layers": {}}
    for L in layers:
        t0 = time.perf_counter()
        labels, k_opt, k = cluster(feats[L][0].numpy())
        dt = time.perf_counter() - t0
        st = hungarian_miou_stats(pixel_labels(labels, *gt.shape), gt, num_classes, ignore)
        nz = np.nonzero(st["tp"] + st["fp"] + st["fn"])[0]
        rec["layers"][str(L)] = {
            "k_opt": k_opt, "k": k, "classes": nz.tolist(),
            "tp": st["tp"][nz].tolist(), "fp": st["fp"][nz].tolist(), "fn": st["fn"][nz].tolist(),
            "correct": st["correct"], "total": st["total"], "time": dt,
        }
    return rec


def _evaluate(ds: str, root: str, args: argparse.Namespace, cache: dict[tuple[str, str], dict], bb: Any,
              layers: list[int], cluster: Callable[[np.ndarray], tuple[np.ndarray, int, int]]) -> dict[int, dict]:
    """Dataset mIoU / accuracy / mean K of every layer on ``root``, printing the running mIoU."""
    from benchmarks.reference import DATASETS, dataset_scores, list_pairs

    num_classes, _ = DATASETS[ds]
    acc = {L: dict(tp=np.zeros(num_classes, np.int64), fp=np.zeros(num_classes, np.int64),
                   fn=np.zeros(num_classes, np.int64), correct=0, total=0, ks=[]) for L in layers}
    pairs = list_pairs(root)[: args.limit]
    t_start = time.perf_counter()
    for i, (stem, ip, lp) in enumerate(pairs):
        rec = cache.get((ds, stem))
        if rec is None or any(str(L) not in rec["layers"] for L in layers):
            rec = _image_record(ds, stem, ip, lp, bb, layers, cluster)
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        msg = f"[{ds} {i + 1}/{len(pairs)}] {stem}"
        for L in layers:
            r = rec["layers"][str(L)]
            a = acc[L]
            cls = np.asarray(r["classes"], np.int64)
            for key in ("tp", "fp", "fn"):
                a[key][cls] += np.asarray(r[key], np.int64)
            a["correct"] += r["correct"]
            a["total"] += r["total"]
            a["ks"].append(r["k"])
            miou, _ = dataset_scores(a["tp"], a["fp"], a["fn"], a["correct"], a["total"])
            msg += f" L{L}:K={r['k']},mIoU={miou:.1f}"
        print(msg, f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    out = {}
    for L in layers:
        a = acc[L]
        miou, pa = dataset_scores(a["tp"], a["fp"], a["fn"], a["correct"], a["total"])
        out[L] = {"miou": miou, "acc": pa, "mean_k": float(np.mean(a["ks"])), "n_images": len(pairs)}
    return out


def _print_table(results: dict[str, dict[int, dict]], layers: list[int], impl: str) -> None:
    print(f"\nEfficientNet-Lite0 stride-16 layers, {impl}, patch variant (no CRF), max 2500 patches")
    header = f"{'layer':>16} {'ch':>4}" + "".join(f" | {ds + ' mIoU':>16} {'acc':>6} {'mean K':>6}" for ds in results)
    print(header)
    print("-" * len(header))
    for L in layers:
        ch = 80 if L <= 7 else 112
        row = f"{L:>3} {_NAMES[L]:>12} {ch:>4}"
        for ds in results:
            r = results[ds][L]
            row += f" | {r['miou']:>16.2f} {r['acc']:>6.2f} {r['mean_k']:>6.2f}"
        print(row)
    if "cocostuff" in results:
        best = max(layers, key=lambda L: results["cocostuff"][L]["miou"])
        print(f"best on cocostuff-val-dev (mIoU): flat block {best} ({_NAMES[best]})")


def main(argv: list[str] | None = None) -> int:
    import torch

    from clasp_torch.backbones.efficientnet import STRIDE16_BLOCKS, EfficientNetLite0Backbone

    args = _parse_args(argv)
    cache = _load_cache(args.cache)
    torch.manual_seed(0)
    bb = EfficientNetLite0Backbone(layer=max(STRIDE16_BLOCKS))
    cluster = _clusterer(args.impl, bb)
    if args.cache:
        args.cache = args.cache.replace(".jsonl", f".{args.impl}.jsonl")
    layers = list(STRIDE16_BLOCKS)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for ds in args.datasets:
        root = os.path.join(args.data, f"{ds}-val-dev")
        if not os.path.isdir(root):
            print(f"skipping {ds}: {root} not found")
            continue
        results[ds] = _evaluate(ds, root, args, cache, bb, layers, cluster)
    _print_table(results, layers, args.impl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({ds: {str(L): r for L, r in d.items()} for ds, d in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
