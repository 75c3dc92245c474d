"""A MaskCut-style baseline on CLASP's own patch features (an independent reference for issue #14).

MaskCut (Wang et al., *Cut and Learn for Unsupervised Object Detection and Instance Segmentation*,
CVPR 2023, the pseudo-labeller of CutLER), re-implemented from the paper's description on the
features of the backbone CLASP uses (here EfficientNet-Lite0 on CLASP's patch grid, not DINO
ViT-B/8 at 480x480), so that both methods see the same features:

1. Patch affinity ``W_ij = 1`` if the cosine similarity of patches ``i, j`` exceeds ``tau``
   (0.15), else ``1e-5``; the normalised cut's relaxation: the second smallest generalised
   eigenvector of ``(D - W) x = lambda D x`` (``scipy.linalg.eigh``).
2. Bipartition by the eigenvector's mean; the foreground is the side holding the patch of the
   largest absolute eigenvector entry, unless that side holds 3 or 4 of the grid's corners (then
   the other side); the mask is the 4-connected component of the foreground holding the
   foreground's seed (the largest entry after the sign fix).
3. ``N`` (3) rounds: the features of the patches already covered are zeroed before the next cut;
   a mask overlapping the previous one by IoU > 0.5 or covering at most 1 % of the grid is left
   empty; each mask loses the pixels of the earlier ones.
4. Each mask is refined by a dense CRF with MaskCut's settings (10 mean-field steps, Gaussian
   sxy 3 weight 7, bilateral sxy 50 srgb 5 weight 10, unary from the softmax of the pixel mask
   and its complement; :func:`clasp_torch.crf.dense_crf`), its holes filled, and dropped when the refined mask
   and the patch mask overlap by IoU < 0.5. Masks keep the order they were found in (scores
   ``N, N-1, ...``).

Usage: :func:`maskcut_masks` (one image); ``benchmarks/proposals.py`` runs it on the dev set.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.linalg import eigh

__all__ = ["ncut_bipartition", "maskcut_patch_masks", "maskcut_masks", "MASKCUT_CRF"]

MASKCUT_CRF = dict(n_iter=10, sxy_gaussian=3.0, compat_gaussian=7.0, sxy_bilateral=50.0, srgb_bilateral=5.0,
                   compat_bilateral=10.0)
"""MaskCut's dense-CRF settings (its ``crf.py``)."""


def ncut_bipartition(feats: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """Second smallest generalised eigenvector of the thresholded cosine affinity of ``feats (n, D)``."""
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    f = np.divide(feats, norm, out=np.zeros_like(feats), where=norm > 0)
    A = np.where(f @ f.T > tau, 1.0, eps)
    d = A.sum(1)
    _, vec = eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 1])
    return vec[:, 0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def maskcut_patch_masks(features: np.ndarray, tau: float = 0.15, n_masks: int = 3) -> list[np.ndarray]:
    """MaskCut's rounds on one image's patch features ``(h, w, D)``: ``n_masks`` bool ``(h, w)``
    masks (some may be empty)."""
    h, w, D = features.shape
    feats = features.reshape(h * w, D).astype(np.float64)
    painted = np.zeros(h * w, dtype=bool)
    masks: list[np.ndarray] = []
    prev: np.ndarray | None = None
    for r in range(n_masks):
        vec = ncut_bipartition(feats * ~painted[:, None], tau)
        fg = vec > vec.mean()
        seed = int(np.argmax(np.abs(vec)))
        grid = fg.reshape(h, w)
        corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
        if corners >= 3 or not fg[seed]:
            vec, fg = -vec, ~fg
        seed = int(np.argmax(vec))
        comp, _ = ndimage.label(fg.reshape(h, w))  # 4-connected components
        mask = comp == comp.flat[seed]
        if r >= 1 and prev is not None and (_iou(prev, mask) > 0.5 or mask.mean() <= 0.01):
            mask = np.zeros((h, w), dtype=bool)
        prev = mask
        painted |= mask.reshape(-1)
        masks.append(mask)
    return masks


def maskcut_masks(
    image: torch.Tensor, features: torch.Tensor, tau: float = 0.15, n_masks: int = 3, crf: bool = True
) -> list[np.ndarray]:
    """MaskCut-style masks of one image.

    Args:
        image: ``(3, H, W)`` uint8 RGB.
        features: ``(h, w, D)`` patch features of that image (nearest rule from patches to pixels,
            as :func:`clasp_torch.pipeline.upsample_labels`).
        tau, n_masks: MaskCut's graph threshold and number of rounds.
        crf: refine each mask with MaskCut's dense CRF (and its IoU >= 0.5 filter).

    Returns:
        Non-empty bool ``(H, W)`` masks, in the order found.
    """
    from clasp_torch.crf import dense_crf, unary_from_probs

    H, W = image.shape[-2:]
    h, w = features.shape[:2]
    ys = np.floor(np.arange(H) * (h / H)).astype(int)
    xs = np.floor(np.arange(W) * (w / W)).astype(int)
    taken = np.zeros((H, W), dtype=bool)
    out = []
    for m in maskcut_patch_masks(features.double().numpy(), tau, n_masks):
        px = m[ys][:, xs] & ~taken
        taken |= px
        if not px.any():
            continue
        if crf:
            probs = torch.softmax(torch.from_numpy(np.stack([~px, px]).astype(np.float32))[None], 1)
            Q = dense_crf(image[None], unary_from_probs(probs), **MASKCUT_CRF)
            refined = ndimage.binary_fill_holes(Q[0].argmax(0).numpy() == 1)
            if _iou(px, refined) < 0.5:
                continue
            px = refined
        if px.any():
            out.append(px)
    return out
