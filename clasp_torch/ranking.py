"""Ranking region proposals: per-proposal cues, a linear score, greedy mask NMS.

* :func:`proposal_cues`: the cues a score may weigh, one ``(B, P)`` tensor each.
* :func:`score_cues`: ``sum_c w_c * cue_c``, the weights chosen by measurement
  (:data:`clasp_torch.instances.DEFAULT_SCORE_WEIGHTS`, ``benchmarks/proposals.py``).
* :func:`mask_nms`: greedy non-maximum suppression over the list of overlapping pairs.

Example:
    >>> # 0 overlaps 1, 1 overlaps 2 (ranked 0 > 1 > 2): 1 is suppressed, so 2 survives
    >>> mask_nms(torch.tensor([0, 1]), torch.tensor([1, 2]), 3).tolist()
    [True, False, True]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["CUE_NAMES", "proposal_cues", "score_cues", "mask_nms"]

CUE_NAMES = ("persistence", "objectness", "silhouette", "fill", "log_area", "border", "refined")
"""The cues of :func:`proposal_cues`."""


def proposal_cues(
    area: Tensor, box_area: Tensor, border: Tensor, persistence: Tensor, background: Tensor, silhouette: Tensor,
    refined: Tensor, image_sizes: Tensor,
) -> dict[str, Tensor]:
    """Per-proposal cues, each of ``area``'s shape (e.g. ``(P,)`` or ``(B, P)``), float32.

    Args:
        area: pixels of every proposal; ``box_area``: pixels of its bounding box; ``border``:
            the image-border pixels it holds (corners count twice).
        persistence: mean over the other label maps of the image of the best IoU with
            one of their proposals (how stable the region is across the K band).
        background: feature dispersion of its patches (NaN: none).
        silhouette: mean silhouette of its K (NaN: undefined).
        refined: bool, from refined pixel labels (the CRF's).
        image_sizes: ``area.shape + (2,)`` the ``(H, W)`` of its image.

    Returns:
        ``{"persistence", "objectness" (1 - background), "silhouette" (0 when undefined),
        "fill" (area / box area), "log_area" (log of the area fraction), "border" (fraction of
        the image's border pixels held), "refined" (0/1)}``.
    """
    img_area = (image_sizes[..., 0] * image_sizes[..., 1]).double()
    perimeter = (2 * (image_sizes[..., 0] + image_sizes[..., 1])).double()
    a = area.double()
    cues = {
        "persistence": persistence,
        "objectness": 1 - torch.nan_to_num(background, nan=1.0),
        "silhouette": torch.nan_to_num(silhouette, nan=0.0),
        "fill": a / box_area.double().clamp_min(1),
        "log_area": torch.log((a / img_area).clamp_min(1e-8)),
        "border": border.double() / perimeter,
        "refined": refined.double(),
    }
    return {k: v.float() for k, v in cues.items()}


def score_cues(cues: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_c weights[c] * cues[c]``: ``(B, P)`` float32.

    Raises:
        KeyError: a weight names no cue.
    """
    s = torch.zeros_like(next(iter(cues.values())))
    for name, w in weights.items():
        if name not in cues:
            raise KeyError(f"unknown cue {name!r}; cues are {sorted(cues)}")
        s = s + float(w) * cues[name]
    return s


def mask_nms(src: Tensor, dst: Tensor, n: int) -> Tensor:
    """Greedy non-maximum suppression over a sparse list of overlaps.

    The ``n`` proposals are ranked best first by the caller; each edge says that proposal
    ``src[e]`` ranks above ``dst[e]`` and overlaps it beyond the threshold. A proposal is kept
    when no kept proposal has an edge to it: the greedy result, reached by iterating
    ``keep_j = not any(keep_i for edges i -> j)`` from ``keep = all`` (after ``t`` rounds every
    proposal whose chains of edges are shorter than ``t`` is final; it stops as soon as nothing
    changes, after a few rounds in practice).

    Args:
        src, dst: ``(E,)`` int64 edges (``src`` outranks ``dst``).
        n: number of proposals.

    Returns:
        ``(n,)`` bool kept.
    """
    keep = torch.ones(n, dtype=torch.bool, device=src.device)
    while True:
        hit = torch.zeros(n, dtype=torch.bool, device=src.device)
        hit[dst[keep[src]]] = True
        new = ~hit
        if torch.equal(new, keep):
            return keep
        keep = new
