"""Pixel variant end to end: the torch dense CRF vs pydensecrf inside the same pipeline.

For every image of a dev set, CLASP (patch variant) runs once; its upsampled patch labels are
then refined by (a) ``clasp_torch.crf.crf_refine_labels`` and (b) pydensecrf
(``benchmarks.reference.pydensecrf_refine``) with the same parameters (20 iterations,
gt_prob 0.8, Gaussian sxy 4 / weight 4, bilateral sxy 80 / srgb 13 / weight 10). Reported:
per-image Hungarian mIoU and pixel accuracy of the patch variant and of both pixel variants,
the pixel-label agreement of the two CRFs, and their time per image (same run, same inputs).

    python -m benchmarks.compare_crf_pipeline --dataset cocostuff --root ../shared/data/cocostuff-val-dev
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np


def compare(root: str, dataset: str, backbone: str = "efficientnet_lite0", limit: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    import torch

    from benchmarks.reference import pydensecrf_refine
    from clasp_torch.crf import crf_refine_labels
    from clasp_torch.data import SegmentationDataset
    from clasp_torch.metrics import UnsupervisedSegmentationMetric
    from clasp_torch.pipeline import CLASP

    torch.manual_seed(0)
    ds = SegmentationDataset(root, dataset=dataset, limit=limit)
    model = CLASP(backbone, refiner=None).eval()
    metrics = {v: UnsupervisedSegmentationMetric(ds.num_classes) for v in ("patch", "torch_crf", "pydensecrf")}
    agree: list[float] = []
    t_torch: list[float] = []
    t_ref: list[float] = []
    it: Any = range(len(ds))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"{dataset}: torch CRF vs pydensecrf")
    for i in it:
        item = ds[i]
        img, target = item["image"], item["label"]
        with torch.no_grad():
            out = model(img)
        coarse = out.label_map(0)
        k = int(out.k[0])
        t = time.perf_counter()
        ours = crf_refine_labels(img[None], coarse[None].clamp_min(0), max(k, 2))[0]
        t_torch.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = pydensecrf_refine(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), coarse.numpy(), max(k, 2))
        t_ref.append(time.perf_counter() - t)
        agree.append(float((ours.numpy() == ref).mean()))
        metrics["patch"].update(coarse, target)
        metrics["torch_crf"].update(ours, target)
        metrics["pydensecrf"].update(torch.from_numpy(ref), target)
    res: dict[str, Any] = {"dataset": dataset, "images": len(ds)}
    for v, m in metrics.items():
        s = m.compute()
        res[v] = {"miou": 100 * float(s["miou"]), "pixel_accuracy": 100 * float(s["pixel_accuracy"])}
    res["label_agreement_mean"] = statistics.mean(agree)
    res["label_agreement_min"] = min(agree)
    res["crf_seconds_torch_median"] = statistics.median(t_torch)
    res["crf_seconds_pydensecrf_median"] = statistics.median(t_ref)
    res["crf_time_ratio_torch_over_pydensecrf"] = statistics.median(t_torch) / statistics.median(t_ref)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["cocostuff", "ade20k"], default="cocostuff")
    ap.add_argument("--root", default=os.path.join("..", "shared", "data", "cocostuff-val-dev"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (pydensecrf is single-threaded)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    r = compare(args.root, args.dataset, args.backbone, args.limit)
    print(f"\n{args.dataset}: {r['images']} images, backbone {args.backbone}")
    print("| variant | mIoU | pixel acc. |")
    print("| --- | --- | --- |")
    for v in ("patch", "torch_crf", "pydensecrf"):
        print(f"| {v} | {r[v]['miou']:.1f} | {r[v]['pixel_accuracy']:.1f} |")
    print(f"CRF label agreement torch vs pydensecrf: mean {100 * r['label_agreement_mean']:.2f}%, "
          f"min {100 * r['label_agreement_min']:.2f}%")
    print(f"CRF time per image (median): torch {r['crf_seconds_torch_median']:.2f}s, pydensecrf "
          f"{r['crf_seconds_pydensecrf_median']:.2f}s, ratio {r['crf_time_ratio_torch_over_pydensecrf']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
