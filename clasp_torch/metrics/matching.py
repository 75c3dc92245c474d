"""Matching core of :mod:`clasp_torch.metrics`: input checks, overlap counts, the Hungarian
assignment, per-image and dataset-level pixel statistics, and scores from statistics.

The protocols (per-image and dataset matching, what counts as tp / fp / fn) are defined in the
docstring of :mod:`clasp_torch.metrics`. The lower-level building blocks (:func:`check_maps`,
:func:`as_map_list`, :func:`image_overlap`, :func:`stats_from_overlap`, :func:`confusion_counts`,
:func:`assign_max_overlap`) are what :mod:`clasp_torch.metrics.unsupervised` accumulates with.

Example:
    >>> pred = torch.tensor([[5, 5, 7], [7, 7, 9]])       # cluster ids
    >>> target = torch.tensor([[0, 0, 1], [1, 1, -1]])    # class ids, -1 ignored
    >>> hungarian_match(pred, target, num_classes=2)
    {5: 0, 7: 1}
    >>> s = per_image_stats(pred, target, num_classes=2)
    >>> s.tp.tolist(), int(s.correct), int(s.total)
    ([2, 3], 5, 5)
    >>> scores_from_stats(s)
    {'miou': tensor(1.), 'pixel_accuracy': tensor(1.)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "Matching",
    "MapLike",
    "SegmentationStats",
    "check_maps",
    "as_map_list",
    "assign_max_overlap",
    "image_overlap",
    "stats_from_overlap",
    "hungarian_match",
    "per_image_stats",
    "hungarian_segmentation_stats",
    "confusion_histogram",
    "confusion_counts",
    "dataset_stats",
    "iou_per_class",
    "scores_from_stats",
]

Matching = Literal["per_image", "dataset"]
MapLike = Tensor | np.ndarray


class SegmentationStats(NamedTuple):
    """Pixel counts after matching. ``tp``/``fp``/``fn``: ``int64 (num_classes,)``;
    ``correct``/``total``: ``int64`` scalars (correct pixels, non-ignored pixels)."""

    tp: Tensor
    fp: Tensor
    fn: Tensor
    correct: Tensor
    total: Tensor


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _as_long(x: MapLike, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype} (pass argmax'ed maps)")
    return t.long()


def check_maps(pred: MapLike, target: MapLike, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(pred, target)`` as ``int64`` tensors on ``pred``'s device, checked.

    Raises:
        TypeError: a map of floating-point or boolean values.
        ValueError: shapes differ, ``num_classes < 1``, or a target outside ``[0, num_classes)``
            other than ``ignore_index``.
    """
    p = _as_long(pred, "pred")
    t = _as_long(target, "target").to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} shapes differ")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    bad = ((t < 0) | (t >= num_classes)) & (t != ignore_index)
    if bool(bad.any()):
        examples = sorted(set(t[bad].unique()[:5].tolist()))
        raise ValueError(
            f"target values must be in [0, {num_classes}) or ignore_index={ignore_index}, found {examples}"
        )
    return p, t


def as_map_list(x: MapLike | Sequence[MapLike], name: str) -> list[MapLike]:
    """An ``(H, W)`` map, a ``(B, H, W)`` batch or a sequence of ``(H, W)`` maps as a list of maps.

    Raises:
        ValueError: other shapes.
        TypeError: neither a tensor/array nor a sequence of them.
    """
    if isinstance(x, (Tensor, np.ndarray)):
        if x.ndim == 2:
            return [x]
        if x.ndim == 3:
            return list(x)
        raise ValueError(
            f"{name} must be (H, W), (B, H, W) or a list of (H, W) maps, got shape {tuple(x.shape)}"
        )
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        out = list(x)
        for m in out:
            if getattr(m, "ndim", None) != 2:
                raise ValueError(f"every element of {name} must be an (H, W) map")
        return out
    raise TypeError(f"{name} must be a tensor/array or a sequence of them, got {type(x).__name__}")


# --------------------------------------------------------------------------------------------
# Matching core
# --------------------------------------------------------------------------------------------


def assign_max_overlap(overlap: Tensor) -> tuple[Tensor, Tensor]:
    """Max-overlap one-to-one assignment on ``overlap (C, K)``; zero-overlap pairs dropped.

    Returns ``rows, cols`` (``int64``, on ``overlap``'s device) of the kept pairs.
    """
    if overlap.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=overlap.device)
        return empty, empty
    rows, cols = linear_sum_assignment(overlap.detach().cpu().numpy(), maximize=True)
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=overlap.device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=overlap.device)
    keep = overlap[rows_t, cols_t] > 0
    return rows_t[keep], cols_t[keep]


def stats_from_overlap(
    overlap: Tensor,
    class_ids: Tensor,
    gt_count: Tensor,
    total: int | Tensor,
    num_classes: int,
) -> SegmentationStats:
    """Stats from a cluster-vs-class overlap matrix (columns = ``class_ids``).

    ``gt_count (num_classes,)`` must count *every* non-ignored pixel per true class, including
    pixels whose prediction is not a row of ``overlap`` (they become false negatives).
    """
    device = gt_count.device
    rows, cols = assign_max_overlap(overlap)
    matched_classes = class_ids[cols]
    tp = torch.zeros(num_classes, dtype=torch.long, device=device)
    fp = torch.zeros(num_classes, dtype=torch.long, device=device)
    inter = overlap[rows, cols].long()
    tp[matched_classes] = inter
    fp[matched_classes] = overlap[rows].sum(1).long() - inter
    fn = gt_count.long() - tp
    correct = tp.sum()
    return SegmentationStats(tp, fp, fn, correct, torch.as_tensor(total, dtype=torch.long, device=device))


def image_overlap(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(cluster_ids (C,), class_ids (K,), overlap (C, K), gt_count (num_classes,), total)``."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    valid = target != ignore_index
    total = int(valid.sum())
    gt_count = torch.bincount(target[valid], minlength=num_classes)
    class_ids = torch.nonzero(gt_count, as_tuple=False).flatten()
    keep = valid & (pred >= 0)
    p, t = pred[keep], target[keep]
    cluster_ids, p_inv = _compact_ids(p)
    compact = torch.full((num_classes,), -1, dtype=torch.long, device=t.device)
    compact[class_ids] = torch.arange(class_ids.numel(), device=t.device)
    n_c, n_k = cluster_ids.numel(), class_ids.numel()
    overlap = torch.bincount(p_inv * n_k + compact[t], minlength=n_c * n_k).reshape(n_c, n_k)
    return cluster_ids, class_ids, overlap, gt_count, total


def _compact_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(sorted unique ids, index of each element in them)`` for non-negative ``ids``.

    Linear-time bincount path for the usual small ids; sorting ``torch.unique`` otherwise.
    """
    if ids.numel() == 0:
        return ids.new_zeros(0), ids.new_zeros(0)
    top = int(ids.max())
    if top < max(1 << 16, 4 * ids.numel()):
        present = torch.bincount(ids, minlength=top + 1) > 0
        lut = torch.cumsum(present, 0) - 1
        return torch.nonzero(present, as_tuple=False).flatten(), lut[ids]
    return torch.unique(ids, return_inverse=True)


def hungarian_match(
    pred: MapLike, target: MapLike, num_classes: int, ignore_index: int = -1
) -> dict[int, int]:
    """Per-image max-overlap matching of predicted clusters to ground-truth classes.

    Args:
        pred: ``(H, W)`` integer cluster ids (arbitrary non-negative values; negative = no
            prediction, never matched).
        target: ``(H, W)`` class ids in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: number of ground-truth classes.
        ignore_index: target value of pixels to skip.

    Returns:
        ``{cluster_id: class_id}`` for the matched clusters only (only classes present in
        ``target``; zero-overlap pairs dropped). Clusters not in the dict are unmatched.
    """
    p, t = check_maps(pred, target, num_classes, ignore_index)
    cluster_ids, class_ids, overlap, _, _ = image_overlap(p, t, num_classes, ignore_index)
    rows, cols = assign_max_overlap(overlap)
    return {int(c): int(k) for c, k in zip(cluster_ids[rows].tolist(), class_ids[cols].tolist())}


def per_image_stats(
    pred: MapLike, target: MapLike, num_classes: int, ignore_index: int = -1
) -> SegmentationStats:
    """``tp, fp, fn (num_classes,)``, ``correct``, ``total`` of one image after per-image matching.

    See the module docstring for the exact definitions (unmatched clusters: false negatives of
    their true class, false positives of none).

    Args:
        pred: ``(H, W)`` integer cluster ids (negative = no prediction).
        target: ``(H, W)`` class ids in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: number of ground-truth classes.
        ignore_index: target value of pixels to skip.
    """
    p, t = check_maps(pred, target, num_classes, ignore_index)
    _, class_ids, overlap, gt_count, total = image_overlap(p, t, num_classes, ignore_index)
    return stats_from_overlap(overlap, class_ids, gt_count, total, num_classes)


hungarian_segmentation_stats = per_image_stats
"""Alias of :func:`per_image_stats` (name used in ``docs/ARCHITECTURE.md``)."""


def confusion_histogram(
    pred: MapLike, target: MapLike, n_clusters: int, num_classes: int, ignore_index: int = -1
) -> Tensor:
    """Cluster-vs-class pixel counts ``int64 (n_clusters, num_classes)`` of one or more maps.

    Pixels with ``target == ignore_index`` or ``pred < 0`` (no prediction) are not counted.

    Raises:
        ValueError: a prediction ``>= n_clusters``.
    """
    p, t = check_maps(pred, target, num_classes, ignore_index)
    return confusion_counts(p, t, n_clusters, num_classes, ignore_index)


def confusion_counts(p: Tensor, t: Tensor, n_clusters: int, num_classes: int, ignore_index: int) -> Tensor:
    """:func:`confusion_histogram` of maps already checked by :func:`check_maps`."""
    keep = (t != ignore_index) & (p >= 0)
    p, t = p[keep], t[keep]
    if p.numel() and int(p.max()) >= n_clusters:
        raise ValueError(f"pred values must be < n_clusters={n_clusters}, found {int(p.max())}")
    flat = torch.bincount(p * num_classes + t, minlength=n_clusters * num_classes)
    return flat.reshape(n_clusters, num_classes)


def dataset_stats(confusion: Tensor, unassigned: Tensor | None = None) -> SegmentationStats:
    """Stats of one global Hungarian matching of a ``(n_clusters, num_classes)`` histogram.

    Args:
        confusion: ``H[c, k]`` = pixels of cluster ``c`` with true class ``k``.
        unassigned: optional ``(num_classes,)`` counts of non-ignored pixels without a
            prediction (``pred < 0``); they are false negatives.
    """
    confusion = torch.as_tensor(confusion).long()
    num_classes = confusion.shape[1]
    gt_count = confusion.sum(0)
    if unassigned is not None:
        gt_count = gt_count + torch.as_tensor(unassigned, device=confusion.device).long()
    class_ids = torch.arange(num_classes, device=confusion.device)
    return stats_from_overlap(confusion, class_ids, gt_count, gt_count.sum(), num_classes)


def iou_per_class(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """``tp / (tp + fp + fn)`` as a float64 CPU tensor; ``nan`` for classes absent from the
    ground truth (``tp + fn == 0``)."""
    tp, fp, fn = (torch.as_tensor(x).detach().cpu().double() for x in (tp, fp, fn))
    present = (tp + fn) > 0
    denom = (tp + fp + fn).clamp_min(1)
    return torch.where(present, tp / denom, torch.full_like(tp, float("nan")))


def scores_from_stats(stats: SegmentationStats | Sequence[Tensor]) -> dict[str, Tensor]:
    """``{"miou", "pixel_accuracy"}``: float32 scalars in ``[0, 1]`` on the device of ``tp``
    (``nan`` if nothing was evaluated)."""
    tp, fp, fn, correct, total = stats
    iou = iou_per_class(tp, fp, fn)
    present = ~torch.isnan(iou)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    miou = iou[present].mean() if bool(present.any()) else nan
    n_total = int(torch.as_tensor(total))
    acc = torch.tensor(int(torch.as_tensor(correct)) / n_total, dtype=torch.float64) if n_total > 0 else nan
    device = torch.as_tensor(tp).device
    return {
        "miou": miou.to(dtype=torch.float32).to(device),
        "pixel_accuracy": acc.to(dtype=torch.float32).to(device),
    }
