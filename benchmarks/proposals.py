"""Region proposals on the COCO-Stuff dev images (issue #14): class-agnostic AR@1/10/100, AP50, ms per image.

**Ground truth (an approximation).** COCO-Stuff label maps carry classes, not instances, so COCO
thing instances are approximated by the 8-connected components of each thing class (fine ids
0..90) with at least 256 pixels: two touching people are one "instance", an occluded object split
in two is two. Pixels labelled 255 (unlabelled, "other") are no instance.

**Evaluation.** ``pycocotools`` ``COCOeval(iouType="segm")``, ``useCats=0``, maxDets 1/10/100, all
areas; AR@n = ``stats[6..8]``, AP50 = ``stats[1]`` (at 100 detections).

**Variants** (all from one CLASP forward per image, ``CLASP("efficientnet_lite0",
keep_band_labels=True)``, CRF on; the forward, the CRF on every K of the band and MaskCut are
cached under ``--cache`` and timed once):

=========================  ===========================================================================
``segments``               :func:`clasp_torch.proposals.region_proposals`: one proposal per CRF segment
``+cc``                    :func:`clasp_torch.instances.instance_proposals` without the band, unscored
``+hierarchy``             ... plus every K of the band refined by the CRF
                           (:func:`clasp_torch.band.refine_band_labels`), de-duplicated, unscored
``+scoring``               ... ranked by the default score: ``clasp proposals``' defaults
``+scoring, no band CRF``  the band as upsampled patch labels (``clasp proposals --no-band-crf``)
``maskcut-style``          :mod:`benchmarks.maskcut` on the same backbone features (tau 0.15, N 3, CRF)
=========================  ===========================================================================

ms per image: the CLASP forward (for MaskCut: the backbone alone), the band's CRF where used and
the proposal stage, each the median over the images, on this machine's CPU with ``--threads``
threads (RLE encoding not included).

Usage::

    python -m benchmarks.proposals [--data ../shared/data] [--json benchmarks/out/proposals.json]
        [--max-seconds 480]     # one invocation's budget: the cache fills over several runs (exit 3)
    python -m benchmarks.proposals --sweep min_area=0,64,256,512 --sweep iou_threshold=0.5,0.7,0.9
    python -m benchmarks.proposals --fit     # the score's weights, and each half's fit on the other half
    clasp proposals ../shared/data/cocostuff-val-dev/images --out /tmp/props.json --backbone efficientnet_lite0
    python -m benchmarks.proposals --eval /tmp/props.json --json benchmarks/out/proposals_cli.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
THING_IDS = range(0, 91)
MIN_GT_AREA = 256


def thing_instances(label: np.ndarray, min_area: int = MIN_GT_AREA) -> list[np.ndarray]:
    """The approximate thing instances of a COCO-Stuff fine label map: 8-connected components of
    each thing class (ids 0..90) with at least ``min_area`` pixels."""
    from scipy import ndimage

    out = []
    for c in np.unique(label):
        if int(c) not in THING_IDS:
            continue
        comp, n = ndimage.label(label == c, np.ones((3, 3), dtype=bool))
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        out += [comp == i for i in range(1, n + 1) if sizes[i] >= min_area]
    return out


def coco_ground_truth(images: list[dict[str, Any]], instances: list[list[np.ndarray]]) -> Any:
    """A ``pycocotools.coco.COCO`` of the approximate instances (one category)."""
    from pycocotools.coco import COCO

    from clasp_torch.coco import CATEGORIES, encode_masks

    anns = []
    for im, masks in zip(images, instances):
        if not masks:
            continue
        rles = encode_masks(torch.from_numpy(np.stack(masks)))
        from pycocotools import mask as mu

        for rle, a, b in zip(rles, mu.area(rles), mu.toBbox(rles)):
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 1, "segmentation": rle,
                         "area": float(a), "bbox": [float(x) for x in b], "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def evaluate(gt: Any, dets: list[dict[str, Any]]) -> dict[str, float]:
    """Class-agnostic segm AR@1/10/100 and AP50 (in %) of ``dets`` against ``gt``."""
    from pycocotools.cocoeval import COCOeval

    if not dets:
        return {"AR@1": 0.0, "AR@10": 0.0, "AR@100": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = 0
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"AR@1": 100 * s[6], "AR@10": 100 * s[7], "AR@100": 100 * s[8], "AP50": 100 * s[1]}


# ----------------------------------------------------------------------------------- cache
def _image_list(data: Path, limit: int | None) -> list[Path]:
    paths = sorted((data / "cocostuff-val-dev" / "images").glob("*.jpg"))
    return paths[:limit] if limit else paths


def fill_cache(paths: list[Path], cache: Path, deadline: float, threads: int) -> bool:
    """Run and time the CLASP forward (and the backbone alone) of every image not cached yet;
    False when the deadline stopped it."""
    from clasp_torch.data import load_image
    from clasp_torch.pipeline import CLASP

    todo = [p for p in paths if not (cache / f"{p.stem}.pt").exists()]
    if not todo:
        return True
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    model = CLASP("efficientnet_lite0", keep_band_labels=True).eval()
    model(load_image(todo[0]))  # warm-up
    for p in todo:
        if time.time() > deadline:
            return False
        im = load_image(p)
        t0 = time.perf_counter()
        feats, _, _ = model.extract_features([im])
        t_backbone = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model(im)
        t_forward = time.perf_counter() - t0
        rec = {k: getattr(out, k) for k in ("labels", "patch_labels", "k_opt", "k", "k_values", "silhouette",
                                             "image_mask", "patch_mask", "image_sizes", "grid_sizes", "features",
                                             "band_patch_labels")}
        rec.update(t_forward=t_forward, t_backbone=t_backbone)
        torch.save(rec, cache / f"{p.stem}.pt")
    return True


def load_output(cache: Path, stem: str) -> tuple[Any, dict[str, float]]:
    """The cached CLASPOutput of one image (eigenvalues left empty) and its timings."""
    from clasp_torch.pipeline import CLASPOutput, upsample_labels

    rec = torch.load(cache / f"{stem}.pt", weights_only=False)
    times = {"forward": rec.pop("t_forward"), "backbone": rec.pop("t_backbone")}
    coarse = upsample_labels(rec["patch_labels"], rec["grid_sizes"], rec["image_sizes"])
    return CLASPOutput(eigenvalues=torch.zeros(1, 0), coarse_labels=coarse, **rec), times


def _fill_each(paths: list[Path], cache: Path, suffix: str, deadline: float, threads: int,
               work: Callable[[Path, Path], None]) -> bool:
    """``work(image, destination)`` for every image whose ``<stem><suffix>`` is not cached yet;
    False when the deadline stopped it."""
    torch.set_num_threads(threads)
    for p in paths:
        dst = cache / f"{p.stem}{suffix}"
        if dst.exists():
            continue
        if time.time() > deadline:
            return False
        work(p, dst)
    return True


def fill_maskcut(paths: list[Path], cache: Path, deadline: float, threads: int) -> bool:
    """MaskCut-style masks of every image not done yet (RLEs and seconds in ``<stem>.maskcut.json``)."""
    from benchmarks.maskcut import maskcut_masks
    from clasp_torch.coco import encode_masks
    from clasp_torch.data import load_image

    def work(p: Path, dst: Path) -> None:
        out, _ = load_output(cache, p.stem)
        h, w = (int(v) for v in out.grid_sizes[0])
        t0 = time.perf_counter()
        masks = maskcut_masks(load_image(p), out.features[0, :h, :w])
        dt = time.perf_counter() - t0
        rles = encode_masks(torch.from_numpy(np.stack(masks))) if masks else []
        dst.write_text(json.dumps({"seconds": dt, "rles": rles}))

    return _fill_each(paths, cache, ".maskcut.json", deadline, threads, work)


def fill_band(paths: list[Path], cache: Path, deadline: float, threads: int, **band: Any) -> bool:
    """The CRF on every K of the band (``clasp proposals``' default) of every image not done yet
    (``<stem>.band.pt``: labels and seconds)."""
    from clasp_torch.band import refine_band_labels
    from clasp_torch.data import load_image

    def work(p: Path, dst: Path) -> None:
        out, _ = load_output(cache, p.stem)
        im = load_image(p)
        t0 = time.perf_counter()
        labels, k = refine_band_labels([im], out, **band)
        dt = time.perf_counter() - t0
        torch.save({"labels": labels.to(torch.int16), "k": k, "seconds": dt}, dst)

    return _fill_each(paths, cache, ".band.pt", deadline, threads, work)


def load_band(cache: Path, stem: str) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    rec = torch.load(cache / f"{stem}.band.pt")
    return (rec["labels"].long(), rec["k"]), float(rec["seconds"])


# ----------------------------------------------------------------------------------- variants
VARIANTS = {
    "segments": "CRF segments (region_proposals)",
    "+cc": "+ connected components of the CRF segments, unscored",
    "+hierarchy": "+ every K of the band (CRF on each), de-duplicated, unscored",
    "+scoring": "+ the default score: clasp proposals",
    "+scoring, no band CRF": "the band as upsampled patch labels (clasp proposals --no-band-crf)",
}
"""The CLASP variants of the table (``maskcut-style`` is added by :func:`maskcut_result`)."""


def variant_dets(
    variant: str, out: Any, band: Any, image_id: int, **options: Any
) -> tuple[list[dict[str, Any]], float]:
    """Detections of one variant on one image and the proposal stage's seconds."""
    from clasp_torch.coco import proposal_annotations
    from clasp_torch.instances import instance_proposals
    from clasp_torch.proposals import region_proposals

    t0 = time.perf_counter()
    if variant == "segments":
        props = region_proposals(out)
    elif variant == "+cc":
        props = instance_proposals(out, hierarchy=False, **{"score_weights": {}, **options})
    elif variant == "+hierarchy":
        props = instance_proposals(out, band_labels=band, **{"score_weights": {}, **options})
    elif variant == "+scoring":
        props = instance_proposals(out, band_labels=band, **options)
    elif variant == "+scoring, no band CRF":
        props = instance_proposals(out, **options)
    else:
        raise ValueError(variant)
    dt = time.perf_counter() - t0
    return proposal_annotations(props, [image_id]), dt


def run_variant(variant: str, data: list[tuple[Any, Any, float]], ids: list[int], gt: Any,
                subset: list[int] | None = None, **options: Any) -> dict[str, Any]:
    """Metrics, proposals per image and median stage ms of one variant (optionally on a subset)."""
    dets, secs = [], []
    idx = range(len(data)) if subset is None else subset
    for i in idx:
        out, band, _ = data[i]
        d, dt = variant_dets(variant, out, band, ids[i], **options)
        dets += d
        secs.append(dt)
    res = evaluate(_subset_gt(gt, [ids[i] for i in idx]) if subset is not None else gt, dets)
    res.update(proposals_per_image=len(dets) / max(len(idx), 1), stage_ms=1000 * statistics.median(secs))
    return res


def _subset_gt(gt: Any, ids: list[int]) -> Any:
    from pycocotools.coco import COCO

    keep = set(ids)
    sub = COCO()
    sub.dataset = {"images": [im for im in gt.dataset["images"] if im["id"] in keep],
                   "annotations": [a for a in gt.dataset["annotations"] if a["image_id"] in keep],
                   "categories": gt.dataset["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


def maskcut_result(
    paths: list[Path], ids: list[int], gt: Any, cache: Path, times: list[dict[str, float]]
) -> dict[str, Any]:
    dets, secs = [], []
    for p, image_id, t in zip(paths, ids, times):
        rec = json.loads((cache / f"{p.stem}.maskcut.json").read_text())
        n = len(rec["rles"])
        dets += [{"image_id": image_id, "category_id": 1, "segmentation": r, "score": float(n - j)}
                 for j, r in enumerate(rec["rles"])]
        secs.append(t["backbone"] + rec["seconds"])
    res = evaluate(gt, dets)
    res.update(proposals_per_image=len(dets) / len(paths), ms_per_image=1000 * statistics.median(secs))
    return res


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| proposals | AR@1 | AR@10 | AR@100 | AP50 | proposals / image | ms / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['AR@1']:.1f} | {r['AR@10']:.1f} | {r['AR@100']:.1f} | {r['AP50']:.1f} | "
                     f"{r['proposals_per_image']:.1f} | {r['ms_per_image']:.0f} |")
    return "\n".join(lines)


def _parse_sweep(items: list[str]) -> list[tuple[str, list[Any]]]:
    out = []
    for it in items:
        name, _, vals = it.partition("=")
        out.append((name, [json.loads(v) for v in vals.split(",")]))
    return out


def candidate_table(out: Any, band: Any, gt_masks: list[np.ndarray], **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cues ``(P, C)`` of every candidate of one image (before NMS) and its best IoU with a GT instance."""
    from clasp_torch.instances import instance_proposals
    from clasp_torch.ranking import CUE_NAMES

    c = instance_proposals(out, band_labels=band, return_cues="candidates", **options)
    X = np.stack([c["cues"][n].numpy() for n in CUE_NAMES], 1).astype(np.float64)
    if not gt_masks:
        return X, np.zeros(len(X))
    cell = c["cell"][0].numpy()
    ex, eq = (t.numpy() for t in c["members"])
    gid = np.full(cell.shape, -1)
    for i, m in enumerate(gt_masks):
        gid[m.ravel()] = i
    ok = (cell >= 0) & (gid >= 0)
    n_cells, n_gt = int(cell.max()) + 1, len(gt_masks)
    cg = np.bincount(cell[ok] * n_gt + gid[ok], minlength=n_cells * n_gt).reshape(n_cells, n_gt)
    inter = np.zeros((len(X), n_gt))
    np.add.at(inter, eq, cg[ex])
    area = c["area"].numpy()[:, None]
    gt_area = np.array([m.sum() for m in gt_masks], dtype=np.float64)[None]
    return X, (inter / (area + gt_area - inter)).max(1)


def fit_weights(tables: list[tuple[np.ndarray, np.ndarray]], idx: list[int]) -> dict[str, float]:
    """Logistic regression of "best IoU with a GT instance >= 0.5" on the cues (standardised),
    as weights of the raw cues."""
    from sklearn.linear_model import LogisticRegression

    from clasp_torch.ranking import CUE_NAMES

    X = np.concatenate([tables[i][0] for i in idx])
    y = np.concatenate([tables[i][1] for i in idx]) >= 0.5
    mu, sd = X.mean(0), X.std(0)
    keep = sd > 0  # a constant cue (e.g. "refined" when every map is refined) gets weight 0
    m = LogisticRegression(C=1.0, max_iter=2000).fit((X[:, keep] - mu[keep]) / sd[keep], y)
    w = np.zeros(X.shape[1])
    w[keep] = m.coef_[0] / sd[keep]
    return {n: round(float(v), 4) for n, v in zip(CUE_NAMES, w)}


def evaluate_file(path: Path, paths: list[Path], out_json: Path) -> int:
    """AR@1/10/100 and AP50 of a ``clasp proposals`` file against the approximate instances of the
    dev images (matched by ``file_name``; dev images missing from the file count as no proposal)."""
    from PIL import Image

    dataset = json.loads(path.read_text())
    by_name = {im["file_name"]: im["id"] for im in dataset["images"]}
    ids = list(range(1, len(paths) + 1))
    labels = [np.array(Image.open(p.parent.parent / "labels" / f"{p.stem}.png")) for p in paths]
    images = [{"id": i, "file_name": p.name, "height": int(lab.shape[0]), "width": int(lab.shape[1])}
              for i, p, lab in zip(ids, paths, labels)]
    gt = coco_ground_truth(images, [thing_instances(lab) for lab in labels])
    ours = {by_name[p.name]: i for i, p in zip(ids, paths) if p.name in by_name}
    dets = [{"image_id": ours[a["image_id"]], "category_id": 1, "segmentation": a["segmentation"],
             "score": a["score"]} for a in dataset["annotations"] if a["image_id"] in ours]
    res = evaluate(gt, dets)
    report = {"file": str(path), "images": len(paths), "images_in_file": len(ours),
              "proposals_per_image": len(dets) / max(len(ours), 1), **res}
    print(json.dumps(report, indent=1))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "out" / "proposals_cache"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "proposals.json"))
    ap.add_argument("--limit", type=int, default=None, help="first N dev images only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=480, help="budget of one invocation (cache filling)")
    ap.add_argument("--options", default="{}",
                    help="JSON keyword arguments of instance_proposals for the CLASP variants")
    ap.add_argument("--sweep", action="append", default=[], help="NAME=V1,V2,...: +scoring with each value (JSON)")
    ap.add_argument("--split", action="store_true", help="also report the even and odd images apart")
    ap.add_argument("--fit", action="store_true", help="fit the score's weights (logistic regression on the cues)")
    ap.add_argument("--eval", default=None, metavar="FILE",
                    help="only evaluate a COCO dataset file written by `clasp proposals` on the dev images")
    args = ap.parse_args(argv)
    deadline = time.time() + args.max_seconds
    paths = _image_list(Path(args.data), args.limit)
    if not paths:
        print(f"no dev images under {args.data}", file=sys.stderr)
        return 2
    if args.eval:
        out = Path(args.json)
        if args.json == ap.get_default("json"):  # never overwrite the variants' table
            out = out.with_name("proposals_cli.json")
        return evaluate_file(Path(args.eval), paths, out)
    cache = Path(args.cache)
    if not (fill_cache(paths, cache, deadline, args.threads) and fill_band(paths, cache, deadline, args.threads)
            and fill_maskcut(paths, cache, deadline, args.threads)):
        done = sum((cache / f"{p.stem}.maskcut.json").exists() for p in paths)
        print(f"cache incomplete ({done}/{len(paths)} images fully done): run the same command again", file=sys.stderr)
        return 3
    torch.set_num_threads(args.threads)
    from PIL import Image

    from clasp_torch.coco import image_ids

    ids = image_ids([p.name for p in paths])
    outs, times = zip(*(load_output(cache, p.stem) for p in paths))
    bands, band_s = zip(*(load_band(cache, p.stem) for p in paths))
    data = list(zip(outs, bands, band_s))
    labels = [np.array(Image.open(p.parent.parent / "labels" / f"{p.stem}.png")) for p in paths]
    images = [{"id": i, "file_name": p.name, "height": int(lab.shape[0]), "width": int(lab.shape[1])}
              for i, p, lab in zip(ids, paths, labels)]
    instances = [thing_instances(lab) for lab in labels]
    gt = coco_ground_truth(images, instances)
    options = json.loads(args.options)
    fwd_ms = 1000 * statistics.median(t["forward"] for t in times)
    band_ms = 1000 * statistics.median(band_s)
    report: dict[str, Any] = {
        "images": len(paths), "gt_instances": len(gt.dataset["annotations"]), "options": options,
        "forward_ms": fwd_ms, "band_crf_ms": band_ms,
        "backbone_ms": 1000 * statistics.median(t["backbone"] for t in times),
        "threads": args.threads, "ground_truth": "8-connected components of each COCO thing class (fine ids 0..90), "
        f">= {MIN_GT_AREA} px: an approximation of COCO's thing instances",
    }
    halves = [list(range(0, len(paths), 2)), list(range(1, len(paths), 2))]
    if args.fit:
        tables = [candidate_table(o, b, m, **options) for (o, b, _), m in zip(data, instances)]
        report["fit"] = {"all": fit_weights(tables, list(range(len(paths)))),
                         "even": fit_weights(tables, halves[0]), "odd": fit_weights(tables, halves[1])}
        for train, test in (("even", "odd"), ("odd", "even")):  # fitted on one half, measured on the other
            sub = halves[test == "odd"]
            w = report["fit"][train]
            report["fit"][f"{train}->{test}"] = {
                "fitted": run_variant("+scoring", data, ids, gt, subset=sub, **{**options, "score_weights": w}),
                "unscored": run_variant("+hierarchy", data, ids, gt, subset=sub, **options),
            }
        print(json.dumps(report["fit"], indent=1))
    elif args.sweep:
        rows = []
        for name, values in _parse_sweep(args.sweep):
            for v in values:
                opts = {**options, name: v}
                row = {"option": name, "value": v, "all": run_variant("+scoring", data, ids, gt, **opts)}
                if args.split:
                    for h_name, h in zip(("even", "odd"), halves):
                        row[h_name] = run_variant("+scoring", data, ids, gt, subset=h, **opts)
                rows.append(row)
                print(json.dumps(row), flush=True)
        report["sweep"] = rows
    else:
        results: dict[str, dict[str, Any]] = {}
        for v in VARIANTS:
            r = run_variant(v, data, ids, gt, **({} if v == "segments" else options))
            r["ms_per_image"] = fwd_ms + r["stage_ms"] + (band_ms if v in ("+hierarchy", "+scoring") else 0.0)
            results[v] = r
        results["maskcut-style"] = maskcut_result(paths, ids, gt, cache, list(times))
        report["results"] = results
        report["variants"] = {**VARIANTS, "maskcut-style": "benchmarks/maskcut.py on the same backbone features"}
        print(markdown(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
