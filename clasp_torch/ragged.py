"""Ragged image batches: a list of ``(3, H_i, W_i)`` images as one padded batch with masks, and
patch labels brought back to each image's pixels.

Shapes: ``B`` images, ``H_max, W_max`` the largest sizes, ``h_i, w_i`` each image's patch grid.
Padding is never mixed into an image's values: masks mark the real pixels and patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImagesLike", "images_to_list", "pad_images", "patch_guides", "upsample_labels", "to_uint8",
           "FLOAT_RANGE_TOLERANCE", "check_float_range"]

ImagesLike = Tensor | Sequence[Tensor]


def images_to_list(images: ImagesLike) -> list[Tensor]:
    """Normalise the accepted inputs to a list of ``(3, H, W)`` tensors.

    Accepts a ``(B, 3, H, W)`` tensor, a single ``(3, H, W)`` tensor, or a sequence of
    ``(3, H_i, W_i)`` tensors; ``uint8`` in [0, 255] or floating point in [0, 1].
    """
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        imgs = list(images.unbind(0))
    else:
        imgs = list(images)
    if not imgs:
        raise ValueError("images is empty: pass at least one image")
    for i, im in enumerate(imgs):
        if not isinstance(im, Tensor):
            raise TypeError(f"images[{i}] is a {type(im).__name__}, expected a torch.Tensor (3, H, W)")
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"images[{i}] must have shape (3, H, W) (RGB), got {tuple(im.shape)}")
        if not (im.dtype == torch.uint8 or im.is_floating_point()):
            raise ValueError(f"images[{i}] has dtype {im.dtype}; expected uint8 (0..255) or float (0..1)")
    check_float_range(imgs)
    return imgs


FLOAT_RANGE_TOLERANCE = 1e-3
"""Float images may exceed [0, 1] by this much (rounding) before they are rejected."""


def check_float_range(imgs: Sequence[Tensor]) -> None:
    """Float images must lie in [0, 1] (NaN rejected): a 0..255 float image would otherwise be
    clipped to white and segmented silently."""
    floats = [(i, im) for i, im in enumerate(imgs) if im.is_floating_point() and im.numel()]
    if not floats or any(im.device.type == "meta" for _, im in floats):
        return
    lo = torch.stack([im.amin() for _, im in floats]).float().cpu().tolist()  # one host sync
    hi = torch.stack([im.amax() for _, im in floats]).float().cpu().tolist()
    for (i, _), a, b in zip(floats, lo, hi):
        if not (a >= -FLOAT_RANGE_TOLERANCE and b <= 1 + FLOAT_RANGE_TOLERANCE):
            raise ValueError(
                f"images[{i}] is a float image with values in [{a:g}, {b:g}]; float images must lie in [0, 1]. "
                "Divide by 255 (e.g. read_image(path).float() / 255) or pass the uint8 tensor as it is."
            )


def pad_images(imgs: Sequence[Tensor], value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pad ``(3, H_i, W_i)`` images to ``(B, 3, H_max, W_max)`` plus a ``(B, H_max, W_max)`` mask."""
    Hm = max(int(im.shape[-2]) for im in imgs)
    Wm = max(int(im.shape[-1]) for im in imgs)
    out = imgs[0].new_full((len(imgs), 3, Hm, Wm), value)
    mask = torch.zeros(len(imgs), Hm, Wm, dtype=torch.bool, device=imgs[0].device)
    for i, im in enumerate(imgs):  # a copy per image, not compute
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
        mask[i, : im.shape[-2], : im.shape[-1]] = True
    return out, mask


def patch_guides(imgs: Sequence[Tensor], grid_sizes: Tensor) -> Tensor:
    """Each image area-resized to its own patch grid, zero padded: the guide of edge-aware
    feature smoothing.

    Args:
        imgs: ``B`` images ``(3, H_i, W_i)``, uint8 or float in [0, 1].
        grid_sizes: ``(B, 2)`` patch grid ``(h_i, w_i)`` per image.

    Returns:
        ``(B, 3, h_max, w_max)`` float32 in [0, 1], zeros outside each image's grid.
    """
    hm, wm = int(grid_sizes[:, 0].max()), int(grid_sizes[:, 1].max())
    out = torch.zeros(len(imgs), 3, hm, wm, device=imgs[0].device)
    for i, im in enumerate(imgs):  # ragged sizes: one small resize per image
        h, w = int(grid_sizes[i, 0]), int(grid_sizes[i, 1])
        x = im.float() / 255.0 if not im.is_floating_point() else im.float()
        out[i, :, :h, :w] = F.adaptive_avg_pool2d(x[None], (h, w))[0]
    return out


def upsample_labels(patch_labels: Tensor, grid_sizes: Tensor, image_sizes: Tensor) -> Tensor:
    """Nearest-neighbour upsampling of ragged patch label maps to their image sizes.

    Same convention as ``F.interpolate(mode="nearest")``: output pixel ``y`` takes patch row
    ``floor(y * h / H)``.

    Args:
        patch_labels: ``(B, h_max, w_max)`` int64.
        grid_sizes: ``(B, 2)`` patch grid per image.
        image_sizes: ``(B, 2)`` target size per image.

    Returns:
        ``(B, H_max, W_max)`` int64, ``-1`` outside each image.
    """
    B, hm, wm = patch_labels.shape
    dev = patch_labels.device
    Hm, Wm = int(image_sizes[:, 0].max()), int(image_sizes[:, 1].max())
    gs = grid_sizes.to(dev).double()
    isz = image_sizes.to(dev).double()
    ys = torch.arange(Hm, device=dev).double().view(1, Hm)
    xs = torch.arange(Wm, device=dev).double().view(1, Wm)
    ry = torch.floor(ys * (gs[:, :1] / isz[:, :1])).long().clamp(max=hm - 1)  # (B, Hm)
    rx = torch.floor(xs * (gs[:, 1:] / isz[:, 1:])).long().clamp(max=wm - 1)  # (B, Wm)
    # per image: patch rows widened to pixels once, then row copies (no full-size index or mask)
    out = torch.empty(B, Hm, Wm, dtype=patch_labels.dtype, device=dev)
    for b, (H, W) in enumerate(image_sizes.tolist()):
        torch.index_select(patch_labels[b].index_select(1, rx[b]), 0, ry[b], out=out[b])
        out[b, H:] = -1
        out[b, :, W:] = -1
    return out


def to_uint8(im: Tensor) -> Tensor:
    """An image as uint8: unchanged if uint8, else a float in [0, 1] scaled by 255 and rounded."""
    if im.dtype == torch.uint8:
        return im
    return (im.float().clamp(0, 1) * 255).round().to(torch.uint8)
