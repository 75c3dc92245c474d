"""Unsupervised semantic-segmentation metrics: Hungarian-matched mIoU and pixel accuracy.

A segmenter without supervision outputs *cluster ids*, not class ids, so the clusters have to be
matched to ground-truth classes before any IoU can be computed. Two protocols are implemented;
both count pixels, use the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) to
maximise the number of pixels whose matched class is correct, and skip pixels whose ground truth
is ``ignore_index`` (``-1``) entirely.

Per-image matching (``matching="per_image"``, default; the CLASP protocol)
    Each image is matched on its own. Candidates are the clusters that occur on the image's
    non-ignored pixels and the classes present in that image's ground truth. The overlap matrix
    ``O[c, k]`` = number of pixels of cluster ``c`` whose true class is ``k``; the matching is a
    one-to-one assignment of clusters to classes maximising ``sum O[c, k]`` (with ``C`` clusters
    and ``K`` classes, ``min(C, K)`` pairs). Matched pairs with zero overlap are discarded (a
    cluster that touches none of the classes left to it is unmatched; this also makes the result
    independent of how ties among zero entries are broken). Each pixel then predicts the class
    its cluster is matched to, or *nothing* if its cluster is unmatched (more clusters than
    classes) or its prediction is negative ("no prediction"). Per class ``k``:

    * ``tp[k]`` pixels of class ``k`` predicted ``k``;
    * ``fp[k]`` pixels predicted ``k`` whose true class is another one;
    * ``fn[k]`` pixels of class ``k`` predicted another class *or nothing*.

    So the pixels of an unmatched cluster are wrong: they are false negatives of their true class
    and false positives of no class. ``tp``, ``fp``, ``fn``, the correct-pixel count and the
    evaluated-pixel count are summed over all images, then

    * ``IoU[k] = tp[k] / (tp[k] + fp[k] + fn[k])``;
    * ``miou`` = mean of ``IoU[k]`` over the classes present in the evaluated ground truth
      (``tp[k] + fn[k] > 0``); classes that never occur are left out, never counted as 0;
    * ``pixel_accuracy`` = correct pixels / non-ignored pixels, over the whole evaluated set
      (pixel-weighted, not a mean of per-image accuracies).

    Because a class can only be matched in images where it occurs, per-image matching is more
    forgiving than dataset matching (a cluster may stand for "sky" in one image and "sea" in the
    next); it evaluates grouping quality, which is what a per-image segmenter such as CLASP
    produces. Numbers are not comparable with dataset-matched numbers.

Dataset matching (``matching="dataset"``; the STEGO / PiCIE / IIC protocol)
    Predictions must be *global* cluster ids ``0 .. n_clusters-1`` that mean the same thing in
    every image. One histogram ``H[c, k]`` (``n_clusters x num_classes``) of cluster-vs-class pixel
    counts is accumulated over the whole dataset, and a single Hungarian matching is run on it at
    :meth:`UnsupervisedSegmentationMetric.compute` time. With ``n_clusters > num_classes`` the
    surplus clusters stay unmatched and their pixels count as wrong (as above); with fewer
    clusters some classes get no cluster. ``tp``/``fp``/``fn``, ``miou`` and ``pixel_accuracy``
    are then defined exactly as above from the matched histogram.

    Differences from STEGO's reference ``UnsupervisedMetrics``, all in degenerate cases only:
    STEGO averages IoU over classes with ``tp + fp + fn > 0`` (here ``tp + fn > 0``: identical
    unless a cluster is matched to a class absent from the whole ground truth, which the
    zero-overlap rule above never does); STEGO keeps zero-overlap pairs of its square assignment;
    and with extra clusters STEGO drops the pixels predicted as clusters ``>= n_classes`` from its
    histogram, whereas they count as wrong here. With ``n_clusters == num_classes`` (STEGO's
    published setting) and a non-degenerate histogram, both give the same numbers.

Scores are fractions in ``[0, 1]`` (multiply by 100 for the usual percentages) and ``nan`` when no
pixel was evaluated.

Public API: :func:`hungarian_match`, :func:`per_image_stats` (alias
``hungarian_segmentation_stats``), :func:`confusion_histogram`, :func:`dataset_stats`,
:func:`iou_per_class`, :func:`scores_from_stats`, :func:`unsupervised_segmentation_scores`, and
the ``torchmetrics`` wrapper :class:`UnsupervisedSegmentationMetric` (states summed across
processes, so DDP / Lightning just work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "SegmentationStats",
    "hungarian_match",
    "per_image_stats",
    "hungarian_segmentation_stats",
    "confusion_histogram",
    "dataset_stats",
    "iou_per_class",
    "scores_from_stats",
    "unsupervised_segmentation_scores",
    "UnsupervisedSegmentationMetric",
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


def _check_pair(pred: MapLike, target: MapLike, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
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


def _as_map_list(x: MapLike | Sequence[MapLike], name: str) -> list[MapLike]:
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


def _assign(overlap: Tensor) -> tuple[Tensor, Tensor]:
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


def _stats_from_overlap(
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
    rows, cols = _assign(overlap)
    matched_classes = class_ids[cols]
    tp = torch.zeros(num_classes, dtype=torch.long, device=device)
    fp = torch.zeros(num_classes, dtype=torch.long, device=device)
    inter = overlap[rows, cols].long()
    tp[matched_classes] = inter
    fp[matched_classes] = overlap[rows].sum(1).long() - inter
    fn = gt_count.long() - tp
    correct = tp.sum()
    return SegmentationStats(tp, fp, fn, correct, torch.as_tensor(total, dtype=torch.long, device=device))


def _image_overlap(
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
    p, t = _check_pair(pred, target, num_classes, ignore_index)
    cluster_ids, class_ids, overlap, _, _ = _image_overlap(p, t, num_classes, ignore_index)
    rows, cols = _assign(overlap)
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
    p, t = _check_pair(pred, target, num_classes, ignore_index)
    _, class_ids, overlap, gt_count, total = _image_overlap(p, t, num_classes, ignore_index)
    return _stats_from_overlap(overlap, class_ids, gt_count, total, num_classes)


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
    p, t = _check_pair(pred, target, num_classes, ignore_index)
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
    return _stats_from_overlap(confusion, class_ids, gt_count, gt_count.sum(), num_classes)


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


def unsupervised_segmentation_scores(
    preds: MapLike | Sequence[MapLike],
    targets: MapLike | Sequence[MapLike],
    num_classes: int,
    matching: Matching = "per_image",
    n_clusters: int | None = None,
    ignore_index: int = -1,
) -> dict[str, Tensor]:
    """``{"miou", "pixel_accuracy"}`` of a set of predictions (see module docstring).

    Args:
        preds: ``(B, H, W)``, ``(H, W)`` or a list of ``(H_i, W_i)`` integer cluster maps.
        targets: same layout, class ids or ``ignore_index``.
        num_classes: number of ground-truth classes.
        matching: ``"per_image"`` (CLASP) or ``"dataset"`` (STEGO; needs ``n_clusters``).
        n_clusters: number of global clusters (``"dataset"`` only).
        ignore_index: target value of pixels to skip.
    """
    metric = UnsupervisedSegmentationMetric(
        num_classes, matching=matching, n_clusters=n_clusters, ignore_index=ignore_index
    )
    metric.update(preds, targets)
    return metric.compute()


# --------------------------------------------------------------------------------------------
# torchmetrics wrapper
# --------------------------------------------------------------------------------------------


class UnsupervisedSegmentationMetric(Metric):
    """Hungarian-matched mIoU and pixel accuracy as a ``torchmetrics.Metric``.

    States (all ``dist_reduce_fx="sum"``, so DDP gathering and :meth:`merge_state` are exact):
    ``tp``, ``fp``, ``fn`` ``(num_classes,)``, ``correct``, ``total``, ``n_images``; with
    ``matching="dataset"`` also ``confusion (n_clusters, num_classes)`` (then ``tp``/``fp`` stay 0
    until :meth:`compute` and ``fn`` holds the pixels without prediction).

    Args:
        num_classes: number of ground-truth classes.
        matching: ``"per_image"`` (default, CLASP protocol) or ``"dataset"`` (STEGO protocol).
        n_clusters: number of global cluster ids; required for ``"dataset"``, optional check
            (``pred < n_clusters``) for ``"per_image"``.
        ignore_index: target value of skipped pixels (default ``-1``).
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(preds, targets)`` takes ``(B, H, W)`` / ``(H, W)`` tensors or lists of differently
    sized ``(H, W)`` maps; ``compute()`` returns ``{"miou", "pixel_accuracy"}`` (float32 scalars
    in ``[0, 1]``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: Tensor
    fp: Tensor
    fn: Tensor
    correct: Tensor
    total: Tensor
    n_images: Tensor
    confusion: Tensor

    def __init__(
        self,
        num_classes: int,
        matching: Matching = "per_image",
        n_clusters: int | None = None,
        ignore_index: int = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if matching not in ("per_image", "dataset"):
            raise ValueError(f"matching must be 'per_image' or 'dataset', got {matching!r}")
        if matching == "dataset" and n_clusters is None:
            raise ValueError("matching='dataset' needs n_clusters (number of global cluster ids)")
        if n_clusters is not None and n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.num_classes = int(num_classes)
        self.matching: Matching = matching
        self.n_clusters = None if n_clusters is None else int(n_clusters)
        self.ignore_index = int(ignore_index)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731
        self.add_state("tp", default=zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("fp", default=zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("fn", default=zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if matching == "dataset":
            assert self.n_clusters is not None
            self.add_state("confusion", default=zeros(self.n_clusters, num_classes), dist_reduce_fx="sum")

    def update(self, preds: MapLike | Sequence[MapLike], targets: MapLike | Sequence[MapLike]) -> None:
        """Accumulate a batch: ``(B, H, W)`` / ``(H, W)`` tensors or lists of ``(H, W)`` maps."""
        pred_list = _as_map_list(preds, "preds")
        target_list = _as_map_list(targets, "targets")
        if len(pred_list) != len(target_list):
            raise ValueError(f"{len(pred_list)} predictions but {len(target_list)} targets")
        device = self.tp.device
        for pred, target in zip(pred_list, target_list):
            p, t = _check_pair(pred, target, self.num_classes, self.ignore_index)
            if self.n_clusters is not None and p.numel() and int(p.max()) >= self.n_clusters:
                raise ValueError(f"pred values must be < n_clusters={self.n_clusters}, found {int(p.max())}")
            if self.matching == "per_image":
                _, class_ids, overlap, gt_count, total = _image_overlap(
                    p, t, self.num_classes, self.ignore_index
                )
                s = _stats_from_overlap(overlap, class_ids, gt_count, total, self.num_classes)
                self.tp += s.tp.to(device)
                self.fp += s.fp.to(device)
                self.fn += s.fn.to(device)
                self.correct += s.correct.to(device)
                self.total += s.total.to(device)
            else:
                assert self.n_clusters is not None
                valid = t != self.ignore_index
                no_pred = valid & (p < 0)
                self.fn += torch.bincount(t[no_pred], minlength=self.num_classes).to(device)
                self.confusion += confusion_histogram(
                    p, t, self.n_clusters, self.num_classes, self.ignore_index
                ).to(device)
                self.total += valid.sum().to(device)
            self.n_images += 1

    def stats(self) -> SegmentationStats:
        """Accumulated (``"dataset"``: matched) ``tp, fp, fn, correct, total``."""
        if self.matching == "per_image":
            return SegmentationStats(self.tp, self.fp, self.fn, self.correct, self.total)
        s = dataset_stats(self.confusion, unassigned=self.fn)
        return SegmentationStats(s.tp, s.fp, s.fn, s.correct, self.total)

    def cluster_to_class(self) -> Tensor:
        """``"dataset"`` only: ``int64 (n_clusters,)`` matched class of each cluster, ``-1`` if
        unmatched (for colouring predictions). Uses this process's states; under DDP call it
        inside ``with metric.sync_context():``."""
        if self.matching != "dataset":
            raise RuntimeError("cluster_to_class() is defined for matching='dataset' only")
        rows, cols = _assign(self.confusion)
        out = torch.full((self.confusion.shape[0],), -1, dtype=torch.long, device=self.confusion.device)
        out[rows] = cols
        return out

    def iou_per_class(self) -> Tensor:
        """Per-class IoU ``float64 (num_classes,)`` (``nan`` for classes never in the targets)."""
        s = self.stats()
        return iou_per_class(s.tp, s.fp, s.fn)

    def compute(self) -> dict[str, Tensor]:
        """``{"miou": Tensor, "pixel_accuracy": Tensor}`` (float32 scalars in ``[0, 1]``)."""
        return scores_from_stats(self.stats())
