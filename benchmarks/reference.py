"""Literal CPU reference of CLASP's Algorithm 1 (one image), written for clarity, not speed.

This is the independent oracle the PyTorch implementation is compared against. It uses only
numpy, scipy, scikit-learn and pydensecrf, and none of ``clasp_torch``'s stages (only its
backbones and preprocessing, in the CLI, to obtain features).

Algorithm (per image, features ``F`` of shape ``(h, w, D)``, ``n = h * w`` patches):

1. ``F_hat``: rows of ``F.reshape(n, D)`` L2-normalised.
2. ``A = F_hat @ F_hat.T`` (cosine affinity, ``n x n``).
3. ``numpy.linalg.eigh(A)`` (full), eigenvalues sorted descending, eigenvectors accordingly.
4. Eigengap elbow: points ``(i, lambda_i - lambda_{i+1})`` for ``i = 1..n-1`` (1-based); the
   straight line from the first to the last point; ``i*`` = argmax of the perpendicular
   distance to that line (first maximum); ``K_opt = i* + 1``.
5. K band: every ``K`` in ``[floor(K_opt (1 - beta)), ceil(K_opt (1 + beta))]``, ``beta = 0.5``,
   skipping ``K < 2`` (and ``K > n - 1``, where the silhouette is undefined):
   ``KMeans(n_clusters=K, n_init=10, random_state=0)`` on the first ``K`` eigenvectors
   (``U[:, :K]``, rows = patches), scored by ``silhouette_score`` (euclidean) on the same
   vectors. A clustering with fewer than 2 distinct labels scores -1. Best score wins; ties go
   to the smaller K.

CLI::

    python -m benchmarks.reference --dataset cocostuff --root ../shared/data/cocostuff-val-dev \
        --backbone efficientnet_lite0 [--crf] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ReferenceResult",
    "eigengap_elbow",
    "k_band",
    "reference_clasp",
    "gram_spectrum",
    "pixel_labels",
    "pydensecrf_q",
    "pydensecrf_refine",
    "hungarian_miou_stats",
    "DATASETS",
]

BETA = 0.5

#: dataset name -> (number of class ids (labels are 0..num_classes-1), ignore id)
DATASETS: dict[str, tuple[int, int]] = {
    "cocostuff": (182, 255),  # COCO-Stuff fine ids 0..181, 255 = ignore
    "ade20k": (151, 0),  # ADE20K 1..150, 0 = ignore ("other")
}


@dataclass
class ReferenceResult:
    """Output of :func:`reference_clasp` for one image."""

    labels: np.ndarray  # (h, w) int, patch labels in 0..k-1
    k_opt: int
    k: int
    scores: dict[int, float]  # K -> silhouette score
    eigenvalues: np.ndarray  # (n,) descending
    timings: dict[str, float] = field(default_factory=dict)  # seconds: eigh, kmeans, silhouette


def eigengap_elbow(eigenvalues: np.ndarray) -> int:
    """``K_opt`` from eigenvalues sorted descending (see the module docstring, step 4)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    n = lam.shape[0]
    if n < 3:
        return 2
    x = np.arange(1, n, dtype=np.float64)  # i = 1..n-1
    y = lam[:-1] - lam[1:]  # lambda_i - lambda_{i+1}
    x1, y1, x2, y2 = x[0], y[0], x[-1], y[-1]
    # perpendicular distance of (x, y) to the line through (x1, y1) and (x2, y2)
    dist = np.abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / math.hypot(x2 - x1, y2 - y1)
    i_star = int(x[int(np.argmax(dist))])  # first maximum, 1-based index
    return i_star + 1


def k_band(k_opt: int, n: int, beta: float = BETA) -> list[int]:
    """Candidate K values ``floor(K_opt (1-beta)) .. ceil(K_opt (1+beta))`` with ``2 <= K <= n-1``."""
    lo = int(math.floor(k_opt * (1 - beta)))
    hi = int(math.ceil(k_opt * (1 + beta)))
    return [k for k in range(lo, hi + 1) if 2 <= k <= n - 1]


def gram_spectrum(F_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spectrum of ``A = F_hat F_hat^T`` from the ``D x D`` Gram matrix ``G = F_hat^T F_hat``
    (numpy): ``G = V L V^T`` gives A's nonzero eigenvalues ``L`` and eigenvectors
    ``U = F_hat V L^-1/2``; A's other ``n - D`` eigenvalues are 0. Returns the ``n`` eigenvalues
    descending and the ``min(n, D)`` eigenvectors of the nonzero ones (zero columns beyond the
    numerical rank)."""
    n, D = F_hat.shape
    lam, V = np.linalg.eigh(F_hat.T @ F_hat)
    lam, V = lam[::-1][: min(n, D)], V[:, ::-1][:, : min(n, D)]
    keep = lam > max(float(lam[0]), 0.0) * 1e-12
    U = np.where(keep, (F_hat @ V) / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    evals = np.zeros(n)
    evals[: len(lam)] = np.where(keep, lam, 0.0)
    return evals, U


def reference_clasp(features: np.ndarray, beta: float = BETA, eigen: str = "full") -> ReferenceResult:
    """Run CLASP's Algorithm 1 literally on ``features`` of shape ``(h, w, D)``.

    ``eigen="full"`` (the literal algorithm): ``numpy.linalg.eigh`` of the ``n x n`` affinity.
    ``eigen="gram"``: the same spectrum from the ``D x D`` Gram matrix (:func:`gram_spectrum`,
    the algebra clasp_torch uses), so that a timing against it isolates the clustering stages;
    the K band, KMeans and silhouette are unchanged.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if eigen not in ("full", "gram"):
        raise ValueError(f"eigen must be 'full' or 'gram', got {eigen!r}")
    h, w, D = features.shape
    n = h * w
    F = np.asarray(features, dtype=np.float64).reshape(n, D)
    norms = np.linalg.norm(F, axis=1, keepdims=True)
    F_hat = F / np.maximum(norms, 1e-12)

    timings = {"eigh": 0.0, "kmeans": 0.0, "silhouette": 0.0}
    t = time.perf_counter()
    if eigen == "gram":
        evals, evecs = gram_spectrum(F_hat)
        timings["eigh"] = time.perf_counter() - t
    else:
        A = F_hat @ F_hat.T
        t = time.perf_counter()
        evals, evecs = np.linalg.eigh(A)  # ascending
        timings["eigh"] = time.perf_counter() - t
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]

    k_opt = eigengap_elbow(evals)
    ks = k_band(k_opt, n, beta)
    if not ks:
        raise ValueError(f"no admissible K for K_opt={k_opt} with n={n} patches")
    scores: dict[int, float] = {}
    labelings: dict[int, np.ndarray] = {}
    for K in ks:
        U = evecs[:, :K]
        t = time.perf_counter()
        lab = KMeans(n_clusters=K, n_init=10, random_state=0).fit_predict(U)
        timings["kmeans"] += time.perf_counter() - t
        t = time.perf_counter()
        if len(np.unique(lab)) < 2:
            s = -1.0
        else:
            s = float(silhouette_score(U, lab, metric="euclidean"))
        timings["silhouette"] += time.perf_counter() - t
        scores[K] = s
        labelings[K] = lab
    best_k = ks[0]
    for K in ks:  # ascending: strict '>' keeps the smaller K on ties
        if scores[K] > scores[best_k]:
            best_k = K
    return ReferenceResult(
        labels=labelings[best_k].reshape(h, w).astype(np.int64),
        k_opt=k_opt,
        k=best_k,
        scores=scores,
        eigenvalues=evals,
        timings=timings,
    )


def pixel_labels(patch_labels: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest upsampling of ``(h, w)`` patch labels to ``(H, W)``: pixel (y, x) takes patch
    ``(floor(y h / H), floor(x w / W))``."""
    h, w = patch_labels.shape
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return patch_labels[rows][:, cols]


def pydensecrf_q(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    gt_prob: float = 0.8,
    sxy_g: float = 4,
    compat_g: float = 4,
    sxy_b: float = 80,
    srgb: float = 13,
    compat_b: float = 10,
    n_iter: int = 20,
) -> np.ndarray:
    """pydensecrf's mean-field marginals ``Q (n_labels, H, W)`` (float32) for hard labels.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        labels: ``(H, W)`` int labels in ``0..n_labels-1``.
        compat_g, compat_b: a kernel whose weight is 0 is not added at all.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    H, W = labels.shape
    d = dcrf.DenseCRF2D(W, H, n_labels)
    U = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    d.setUnaryEnergy(np.ascontiguousarray(U))
    if compat_g:
        d.addPairwiseGaussian(sxy=sxy_g, compat=compat_g)
    if compat_b:
        d.addPairwiseBilateral(sxy=sxy_b, srgb=srgb, rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=compat_b)
    return np.array(d.inference(n_iter), dtype=np.float32).reshape(n_labels, H, W)


def pydensecrf_refine(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    gt_prob: float = 0.8,
    sxy_g: float = 4,
    compat_g: float = 4,
    sxy_b: float = 80,
    srgb: float = 13,
    compat_b: float = 10,
    n_iter: int = 20,
) -> np.ndarray:
    """Dense-CRF refinement of pixel labels with pydensecrf: the argmax of :func:`pydensecrf_q`.

    Returns:
        ``(H, W)`` int64 refined labels.
    """
    n_labels = max(int(n_labels), 2)  # unary_from_labels divides by n_labels - 1
    Q = pydensecrf_q(image, labels, n_labels, gt_prob, sxy_g, compat_g, sxy_b, srgb, compat_b, n_iter)
    return Q.argmax(0).astype(np.int64)


def hungarian_miou_stats(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                         ignore: int) -> dict[str, np.ndarray | int]:
    """Per-image Hungarian matching of predicted clusters to ground-truth classes.

    Over the non-ignored pixels, the overlap matrix (clusters x classes present in ``gt``) is
    built and ``scipy.optimize.linear_sum_assignment`` picks the one-to-one assignment with
    maximum total overlap. Each matched cluster takes its class; pixels of unmatched clusters
    are wrong (a false negative of their true class, no false positive).

    Returns:
        ``tp``, ``fp``, ``fn`` (int64 arrays of length ``num_classes``), ``correct``, ``total``.
    """
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred).ravel()
    gt = np.asarray(gt).ravel()
    valid = gt != ignore
    p, g = pred[valid], gt[valid].astype(np.int64)
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    fn = np.zeros(num_classes, np.int64)
    if p.size == 0:
        return {"tp": tp, "fp": fp, "fn": fn, "correct": 0, "total": 0}
    clusters = np.unique(p)
    classes = np.unique(g)
    overlap = np.zeros((len(clusters), len(classes)), np.int64)
    ci = np.searchsorted(clusters, p)
    gi = np.searchsorted(classes, g)
    np.add.at(overlap, (ci, gi), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = np.full(len(clusters), -1, np.int64)
    mapping[rows] = classes[cols]
    mapped = mapping[ci]
    for c in classes:
        tp[c] = int(np.sum((mapped == c) & (g == c)))
        fp[c] = int(np.sum((mapped == c) & (g != c)))
        fn[c] = int(np.sum((mapped != c) & (g == c)))
    correct = int(np.sum(mapped == g))
    return {"tp": tp, "fp": fp, "fn": fn, "correct": correct, "total": int(g.size)}


def dataset_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, correct: int, total: int) -> tuple[float, float]:
    """Dataset mIoU (%) over classes present (``tp + fn > 0``) and pixel accuracy (%)."""
    present = (tp + fn) > 0
    iou = tp[present] / np.maximum(tp[present] + fp[present] + fn[present], 1)
    miou = 100.0 * float(iou.mean()) if present.any() else float("nan")
    acc = 100.0 * correct / max(total, 1)
    return miou, acc


# ----------------------------------------------------------------------------------- CLI


def list_pairs(root: str) -> list[tuple[str, str, str]]:
    """``(id, image path, label path)`` for ``root/images/<id>.jpg`` + ``root/labels/<id>.png``."""
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"no images/ folder under {root}")
    out = []
    for f in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        lp = os.path.join(lab_dir, stem + ".png")
        if os.path.isfile(lp):
            out.append((stem, os.path.join(img_dir, f), lp))
    return out


def load_pair(img_path: str, lab_path: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = np.array(Image.open(img_path).convert("RGB"))
    lab = np.array(Image.open(lab_path))
    if lab.shape != img.shape[:2]:
        raise ValueError(f"label {lab.shape} and image {img.shape[:2]} sizes differ for {img_path}")
    return img, lab


def extract_features(backbone, img: np.ndarray, max_patches: int = 2500) -> np.ndarray:
    """Features ``(h, w, D)`` (numpy float32) of an ``(H, W, 3)`` uint8 image."""
    import torch

    from clasp_torch.preprocess import preprocess_image

    x, _ = preprocess_image(torch.from_numpy(img).permute(2, 0, 1).contiguous(), backbone.patch_size,
                            backbone.mean, backbone.std, max_patches)
    with torch.inference_mode():
        f = backbone(x[None])[0]
    return f.float().numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--crf", action="store_true", help="also score dense-CRF-refined pixel labels")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-patches", type=int, default=2500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from clasp_torch.backbones import get_backbone

    torch.manual_seed(0)
    num_classes, ignore = DATASETS[args.dataset]
    backbone = get_backbone(args.backbone, weights=args.weights).eval()
    pairs = list_pairs(args.root)[: args.limit]
    variants = ["patch"] + (["crf"] if args.crf else [])
    acc = {v: dict(tp=np.zeros(num_classes, np.int64), fp=np.zeros(num_classes, np.int64),
                   fn=np.zeros(num_classes, np.int64), correct=0, total=0) for v in variants}
    per_image = []
    for idx, (stem, ip, lp) in enumerate(pairs):
        img, gt = load_pair(ip, lp)
        H, W = gt.shape
        t0 = time.perf_counter()
        feats = extract_features(backbone, img, args.max_patches)
        t_feat = time.perf_counter() - t0
        res = reference_clasp(feats)
        rec = {"id": stem, "h": int(feats.shape[0]), "w": int(feats.shape[1]), "k_opt": res.k_opt, "k": res.k,
               "scores": {str(k): v for k, v in res.scores.items()},
               "time": {"features": t_feat, **res.timings}}
        preds = {"patch": pixel_labels(res.labels, H, W)}
        if args.crf:
            t0 = time.perf_counter()
            preds["crf"] = pydensecrf_refine(img, preds["patch"], res.k)
            rec["time"]["crf"] = time.perf_counter() - t0
        line = f"[{idx + 1}/{len(pairs)}] {stem} grid={feats.shape[0]}x{feats.shape[1]} K_opt={res.k_opt} K={res.k}"
        for v in variants:
            st = hungarian_miou_stats(preds[v], gt, num_classes, ignore)
            for key in ("tp", "fp", "fn"):
                acc[v][key] += st[key]
            acc[v]["correct"] += st["correct"]
            acc[v]["total"] += st["total"]
            miou, pa = dataset_scores(st["tp"], st["fp"], st["fn"], st["correct"], st["total"])
            rec[f"miou_{v}"], rec[f"acc_{v}"] = miou, pa
            line += f" {v}: mIoU={miou:.1f} acc={pa:.1f}"
        times = (rec["time"][k] for k in ("features", "eigh", "kmeans", "silhouette"))
        line += " t[feat/eigh/km/sil]=" + "/".join(f"{t:.2f}" for t in times)
        print(line, flush=True)
        per_image.append(rec)

    summary = {"dataset": args.dataset, "root": args.root, "backbone": args.backbone, "n_images": len(pairs),
               "max_patches": args.max_patches}
    for v in variants:
        miou, pa = dataset_scores(acc[v]["tp"], acc[v]["fp"], acc[v]["fn"], acc[v]["correct"], acc[v]["total"])
        summary[f"miou_{v}"], summary[f"acc_{v}"] = miou, pa
        print(f"{args.dataset} {v}: mIoU={miou:.2f} pixel_acc={pa:.2f} ({len(pairs)} images)")
    for k in ("features", "eigh", "kmeans", "silhouette"):
        vals = [r["time"][k] for r in per_image]
        if vals:
            summary[f"mean_time_{k}"] = float(np.mean(vals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "images": per_image}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
