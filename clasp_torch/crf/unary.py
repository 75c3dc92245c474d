"""Unary energies of the dense CRF, as pydensecrf's ``unary_from_labels`` / ``unary_from_softmax``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_bool_mask, check_float

__all__ = ["unary_from_labels", "unary_from_probs"]


def unary_from_labels(
    labels: Tensor,
    n_labels: int,
    gt_prob: float = 0.8,
    label_mask: Tensor | None = None,
) -> Tensor:
    """Unary energies from a hard label map, as ``pydensecrf.utils.unary_from_labels(..., zero_unsure=False)``.

    The given label gets ``-log(gt_prob)``, every other valid label ``-log((1-gt_prob)/(K-1))`` where
    ``K`` is the number of valid labels of the image (``n_labels`` without ``label_mask``).
    Labels outside ``label_mask`` get ``+inf`` energy (probability 0).

    Args:
        labels: ``(B, H, W)`` int64 labels in ``[0, n_labels)`` (or ``(H, W)``).
        n_labels: number of label channels ``C``.
        gt_prob: confidence in the given labels, in ``(0, 1)``.
        label_mask: optional ``(B, C)`` bool mask of valid labels per image.

    Returns:
        ``(B, C, H, W)`` float32 energies.

    Example:
        >>> lab = torch.tensor([[[0, 1], [2, 2]]])
        >>> U = unary_from_labels(lab, 3, 0.8)
        >>> U.shape, round(float(U[0, 0, 0, 0]), 4), round(float(U[0, 1, 0, 0]), 4)
        (torch.Size([1, 3, 2, 2]), 0.2231, 2.3026)
    """
    check_float("gt_prob", gt_prob, minimum=0.0, maximum=1.0, open_interval=True)
    if labels.dim() == 2:
        labels = labels.unsqueeze(0)
    B, H, W = labels.shape
    C = int(n_labels)
    device = labels.device
    lm = check_bool_mask("label_mask", label_mask, (B, C), device)
    k = lm.sum(1).to(torch.float64)  # (B,)
    n_energy = -torch.log((1.0 - gt_prob) / (k - 1).clamp_min(1.0))
    n_energy = torch.where(k > 1, n_energy, torch.zeros_like(n_energy))
    p_energy = -math.log(gt_prob)
    U = n_energy.to(torch.float32).view(B, 1, 1, 1).expand(B, C, H, W).clone()
    U.scatter_(1, labels.long().unsqueeze(1), p_energy)
    if label_mask is not None:
        U.masked_fill_(~lm.view(B, C, 1, 1), float("inf"))
    return U


def unary_from_probs(probs: Tensor, clip: float = 1e-5) -> Tensor:
    """Unary energies ``-log(clamp(probs, clip, 1))`` from soft probabilities ``(B, C, H, W)``.

    Same as ``pydensecrf.utils.unary_from_softmax(probs, clip=clip)``; differentiable.
    """
    return -torch.log(probs.clamp(clip, 1.0))
