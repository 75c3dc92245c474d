"""Resizing and normalisation of images before the backbone.

An image of any size is resized (never cropped) so that both sides are multiples of the
backbone's patch size and the patch grid holds at most ``max_patches`` patches.

Example:
    >>> import torch
    >>> img = torch.full((3, 50, 70), 255, dtype=torch.uint8)    # a white 70x50 image
    >>> x, grid = preprocess_image(img, patch_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> x.shape, grid                                             # resized to 64x48: 4x3 patches
    (torch.Size([3, 48, 64]), (3, 4))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["target_size", "preprocess_image", "DEFAULT_MAX_PATCHES"]

DEFAULT_MAX_PATCHES = 2500


def target_size(H: int, W: int, patch_size: int, max_patches: int = DEFAULT_MAX_PATCHES) -> tuple[int, int]:
    """Size ``(H', W')`` the image is resized to before feature extraction.

    Each side is rounded DOWN to a multiple of ``patch_size`` (the image is resized, not
    cropped). If the grid ``(H'/p) * (W'/p)`` then exceeds ``max_patches``, both sides are
    scaled by one common factor (aspect ratio kept, up to rounding) so that the grid holds at
    most ``max_patches`` patches.

    Args:
        H, W: input height and width in pixels.
        patch_size: backbone patch size / output stride ``p``.
        max_patches: upper bound on ``h * w`` with ``h = H'/p``, ``w = W'/p``.

    Returns:
        ``(H', W')``, both positive multiples of ``patch_size``.

    Raises:
        ValueError: if the image is smaller than one patch or the arguments are invalid.

    Example:
        >>> target_size(480, 640, patch_size=14)                     # 34 x 45 = 1530 patches
        (476, 630)
        >>> target_size(480, 640, patch_size=16, max_patches=300)    # 30 x 40 patches scaled to 15 x 20
        (240, 320)
    """
    H, W, p = int(H), int(W), int(patch_size)
    if p < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    if H < p or W < p:
        raise ValueError(
            f"image of size {H}x{W} (HxW) is smaller than one {p}x{p} patch of this backbone; "
            f"both sides must be at least {p} pixels"
        )
    h, w = H // p, W // p
    if h * w > max_patches:
        # common scale factor s with (H s / p) * (W s / p) == max_patches; flooring keeps
        # the product <= max_patches.
        s = math.sqrt(max_patches * p * p / (H * W))
        h = max(1, int(math.floor(H * s / p)))
        w = max(1, int(math.floor(W * s / p)))
        while h * w > max_patches:  # guard against floating-point round-up
            if h >= w:
                h -= 1
            else:
                w -= 1
    return h * p, w * p


def preprocess_image(
    img: Tensor,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_patches: int = DEFAULT_MAX_PATCHES,
) -> tuple[Tensor, tuple[int, int]]:
    """Resize and normalise one image for a backbone.

    Args:
        img: ``(3, H, W)`` RGB image, ``uint8`` in [0, 255] or floating point in [0, 1].
        patch_size: backbone patch size ``p``.
        mean, std: per-channel normalisation applied to RGB in [0, 1].
        max_patches: upper bound on the number of patches (see :func:`target_size`).

    Returns:
        ``(x, (h, w))``: ``x`` is a float32 ``(3, H', W')`` normalised tensor with
        ``H' = h * p`` and ``W' = w * p``; resizing is bilinear with antialiasing.

    Example:
        >>> img = torch.zeros(3, 32, 48)                              # already a multiple of 16: not resized
        >>> x, grid = preprocess_image(img, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> grid, x.unique().tolist()                                 # (0 - 0.5) / 0.25
        ((2, 3), [-2.0])
    """
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        x = img.to(torch.float32) / 255.0
    elif img.is_floating_point():
        x = img.to(torch.float32)
    else:
        raise TypeError(f"expected a uint8 or floating-point image, got dtype {img.dtype}")
    H, W = x.shape[-2:]
    Ht, Wt = target_size(H, W, patch_size, max_patches)
    if (Ht, Wt) != (H, W):
        x = F.interpolate(x[None], size=(Ht, Wt), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    x = (x - m) / s
    return x, (Ht // patch_size, Wt // patch_size)
