"""The photos the benchmarks time: COCO-Stuff dev images (or skimage's samples) at one size."""

from __future__ import annotations

import glob
import os

import numpy as np
import torch

from .paths import DEFAULT_IMAGE_DIR

__all__ = ["load_images"]

_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def load_images(
    n: int, size: tuple[int, int] = (640, 480), image_dir: str | None = None
) -> tuple[list[torch.Tensor], str]:
    """``n`` uint8 ``(3, H, W)`` RGB images resized to ``size = (W, H)``, cycling through the
    COCO-Stuff dev images (or skimage's sample photos when that folder is missing), and a line
    saying where they come from."""
    from PIL import Image

    image_dir = image_dir or DEFAULT_IMAGE_DIR
    files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")) + glob.glob(os.path.join(image_dir, "*.png")))
    arrays: list[np.ndarray] = []
    if files:
        source = f"{len(files)} images of {os.path.normpath(image_dir)}"
        for f in files[: max(n, 1)]:
            arrays.append(np.array(Image.open(f).convert("RGB").resize(size, Image.BILINEAR)))
    else:
        from skimage import data

        source = "skimage.data sample photos (COCO dev images missing)"
        for name in _SKIMAGE_PHOTOS:
            im = getattr(data, name)()
            if im.ndim == 2:
                im = np.stack([im] * 3, -1)
            arrays.append(np.array(Image.fromarray(im[..., :3]).resize(size, Image.BILINEAR)))
    imgs = [torch.from_numpy(arrays[i % len(arrays)]).permute(2, 0, 1).contiguous() for i in range(n)]
    return imgs, source
