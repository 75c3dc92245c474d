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
:func:`iou_per_class`, :func:`scores_from_stats` (:mod:`clasp_torch.metrics.matching`), and
:func:`unsupervised_segmentation_scores` with its ``torchmetrics`` counterpart
:class:`UnsupervisedSegmentationMetric` (states summed across processes, so DDP / Lightning just
work; :mod:`clasp_torch.metrics.unsupervised`). Both give the same numbers:

    >>> import torch
    >>> preds = [torch.tensor([[5, 5, 7], [7, 7, 9]]), torch.tensor([[1, 1, 2]])]
    >>> targets = [torch.tensor([[0, 0, 1], [1, 1, -1]]), torch.tensor([[1, 1, 1]])]
    >>> unsupervised_segmentation_scores(preds, targets, num_classes=2)
    {'miou': tensor(0.9167), 'pixel_accuracy': tensor(0.8750)}
    >>> metric = UnsupervisedSegmentationMetric(num_classes=2)
    >>> for p, t in zip(preds, targets):
    ...     metric.update(p, t)
    >>> metric.compute()
    {'miou': tensor(0.9167), 'pixel_accuracy': tensor(0.8750)}
"""

from .matching import (
    SegmentationStats,
    confusion_histogram,
    dataset_stats,
    hungarian_match,
    hungarian_segmentation_stats,
    iou_per_class,
    per_image_stats,
    scores_from_stats,
)
from .unsupervised import UnsupervisedSegmentationMetric, unsupervised_segmentation_scores

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
