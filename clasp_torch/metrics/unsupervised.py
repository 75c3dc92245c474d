"""The unsupervised-segmentation score, functional and ``torchmetrics.Metric``, laid out as in
torchmetrics: three private steps shared by both,

* ``_validate_args`` - the settings (``num_classes``, ``matching``, ``n_clusters``);
* ``_update`` - one batch of maps -> its sum-reduced states (``tp``, ``fp``, ``fn``, ``correct``,
  ``total``, ``n_images``, and ``confusion`` for dataset matching);
* ``_compute`` - summed states -> ``{"miou", "pixel_accuracy"}``;

:func:`unsupervised_segmentation_scores` is ``_compute(_update(...))`` of all the maps;
:class:`UnsupervisedSegmentationMetric` adds each batch's ``_update`` to its states (summed
across processes by torchmetrics) and ``_compute``s them. The protocols are defined in the
docstring of :mod:`clasp_torch.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .matching import (
    MapLike,
    Matching,
    SegmentationStats,
    as_map_list,
    assign_max_overlap,
    check_maps,
    confusion_counts,
    dataset_stats,
    image_overlap,
    iou_per_class,
    scores_from_stats,
    stats_from_overlap,
)

__all__ = ["unsupervised_segmentation_scores", "UnsupervisedSegmentationMetric"]


# --------------------------------------------------------------------------------------------
# Shared by the functional and the Metric: argument checks, one batch's states, the reduction
# --------------------------------------------------------------------------------------------


def _validate_args(num_classes: int, matching: str, n_clusters: int | None) -> None:
    """Check the settings of :func:`unsupervised_segmentation_scores` / the Metric."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if matching not in ("per_image", "dataset"):
        raise ValueError(f"matching must be 'per_image' or 'dataset', got {matching!r}")
    if matching == "dataset" and n_clusters is None:
        raise ValueError("matching='dataset' needs n_clusters (number of global cluster ids)")
    if n_clusters is not None and n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")


def _zero_states(
    num_classes: int, matching: Matching, n_clusters: int | None, device: torch.device | None = None
) -> dict[str, Tensor]:
    """The sum-reduced states, all ``int64`` zeros: ``tp``, ``fp``, ``fn`` ``(num_classes,)``,
    ``correct``, ``total``, ``n_images`` and, for ``"dataset"``, ``confusion (n_clusters, num_classes)``."""

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.long, device=device)

    states = {"tp": zeros(num_classes), "fp": zeros(num_classes), "fn": zeros(num_classes),
              "correct": zeros(), "total": zeros(), "n_images": zeros()}
    if matching == "dataset":
        assert n_clusters is not None
        states["confusion"] = zeros(n_clusters, num_classes)
    return states


def _update(
    preds: MapLike | Sequence[MapLike],
    targets: MapLike | Sequence[MapLike],
    num_classes: int,
    matching: Matching,
    n_clusters: int | None,
    ignore_index: int,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """The states (:func:`_zero_states`) of one batch, on ``device`` (default: the first map's).

    ``"per_image"``: each image's matched ``tp``/``fp``/``fn``/``correct``/``total``.
    ``"dataset"``: the histogram ``confusion``, ``total``, and in ``fn`` the pixels without a
    prediction (``tp``/``fp``/``correct`` stay 0 until :func:`_reduce`).
    """
    pred_list = as_map_list(preds, "preds")
    target_list = as_map_list(targets, "targets")
    if len(pred_list) != len(target_list):
        raise ValueError(f"{len(pred_list)} predictions but {len(target_list)} targets")
    if device is None and pred_list:
        device = torch.as_tensor(pred_list[0]).device
    states = _zero_states(num_classes, matching, n_clusters, device)
    for pred, target in zip(pred_list, target_list):
        p, t = check_maps(pred, target, num_classes, ignore_index)
        if n_clusters is not None and p.numel() and int(p.max()) >= n_clusters:
            raise ValueError(f"pred values must be < n_clusters={n_clusters}, found {int(p.max())}")
        if matching == "per_image":
            _, class_ids, overlap, gt_count, total = image_overlap(p, t, num_classes, ignore_index)
            s = stats_from_overlap(overlap, class_ids, gt_count, total, num_classes)
            for name, value in zip(SegmentationStats._fields, s):
                states[name] += value.to(device)
        else:
            assert n_clusters is not None
            valid = t != ignore_index
            no_pred = valid & (p < 0)
            states["fn"] += torch.bincount(t[no_pred], minlength=num_classes).to(device)
            states["confusion"] += confusion_counts(p, t, n_clusters, num_classes, ignore_index).to(device)
            states["total"] += valid.sum().to(device)
        states["n_images"] += 1
    return states


def _reduce(states: dict[str, Tensor], matching: Matching) -> SegmentationStats:
    """Summed states -> ``tp, fp, fn, correct, total`` (``"dataset"``: after the global matching)."""
    if matching == "per_image":
        return SegmentationStats(*(states[name] for name in SegmentationStats._fields))
    s = dataset_stats(states["confusion"], unassigned=states["fn"])
    return SegmentationStats(s.tp, s.fp, s.fn, s.correct, states["total"])


def _compute(states: dict[str, Tensor], matching: Matching) -> dict[str, Tensor]:
    """Summed states -> ``{"miou", "pixel_accuracy"}``."""
    return scores_from_stats(_reduce(states, matching))


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

    Returns:
        float32 scalars in ``[0, 1]`` on the device of the first prediction.

    Example:
        >>> pred = torch.tensor([[5, 5, 7], [7, 7, 9]])       # cluster ids
        >>> target = torch.tensor([[0, 0, 1], [1, 1, -1]])    # class ids, -1 ignored
        >>> unsupervised_segmentation_scores(pred, target, num_classes=2)
        {'miou': tensor(1.), 'pixel_accuracy': tensor(1.)}
        >>> s = unsupervised_segmentation_scores([pred, pred], [target, 1 - target.clamp_min(0)], 2, "dataset", 10)
        >>> round(float(s["pixel_accuracy"]), 4)
        0.4545
    """
    _validate_args(num_classes, matching, n_clusters)
    return _compute(_update(preds, targets, num_classes, matching, n_clusters, ignore_index), matching)


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
    in ``[0, 1]``), the same as :func:`unsupervised_segmentation_scores` of all the maps.

    Example:
        >>> metric = UnsupervisedSegmentationMetric(num_classes=2)
        >>> metric.update(torch.tensor([[5, 5, 7]]), torch.tensor([[0, 0, 1]]))
        >>> metric.update([torch.tensor([[3, 3, 4]])], [torch.tensor([[1, 1, 1]])])  # 4: unmatched
        >>> metric.compute()
        {'miou': tensor(0.8750), 'pixel_accuracy': tensor(0.8333)}
        >>> int(metric.n_images), metric.tp.tolist(), metric.fn.tolist()
        (2, [2, 3], [0, 1])
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
        _validate_args(num_classes, matching, n_clusters)
        self.num_classes = int(num_classes)
        self.matching: Matching = matching
        self.n_clusters = None if n_clusters is None else int(n_clusters)
        self.ignore_index = int(ignore_index)
        for name, default in _zero_states(self.num_classes, matching, self.n_clusters).items():
            self.add_state(name, default=default, dist_reduce_fx="sum")

    def update(self, preds: MapLike | Sequence[MapLike], targets: MapLike | Sequence[MapLike]) -> None:
        """Accumulate a batch: ``(B, H, W)`` / ``(H, W)`` tensors or lists of ``(H, W)`` maps."""
        batch = _update(preds, targets, self.num_classes, self.matching, self.n_clusters, self.ignore_index,
                        device=self.tp.device)
        for name, value in batch.items():
            getattr(self, name).add_(value)

    def stats(self) -> SegmentationStats:
        """Accumulated (``"dataset"``: matched) ``tp, fp, fn, correct, total``."""
        return _reduce(self.metric_state, self.matching)

    def cluster_to_class(self) -> Tensor:
        """``"dataset"`` only: ``int64 (n_clusters,)`` matched class of each cluster, ``-1`` if
        unmatched (for colouring predictions). Uses this process's states; under DDP call it
        inside ``with metric.sync_context():``."""
        if self.matching != "dataset":
            raise RuntimeError("cluster_to_class() is defined for matching='dataset' only")
        rows, cols = assign_max_overlap(self.confusion)
        out = torch.full((self.confusion.shape[0],), -1, dtype=torch.long, device=self.confusion.device)
        out[rows] = cols
        return out

    def iou_per_class(self) -> Tensor:
        """Per-class IoU ``float64 (num_classes,)`` (``nan`` for classes never in the targets)."""
        s = self.stats()
        return iou_per_class(s.tp, s.fp, s.fn)

    def compute(self) -> dict[str, Tensor]:
        """``{"miou": Tensor, "pixel_accuracy": Tensor}`` (float32 scalars in ``[0, 1]``)."""
        return _compute(self.metric_state, self.matching)
