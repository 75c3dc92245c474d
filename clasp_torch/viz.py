"""Visualisation helpers: label palettes, overlays, contact sheets, atomic image writes."""

from __future__ import annotations

import colorsys
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["palette", "colorize", "overlay", "boundaries", "contact_sheet", "save_label_png", "save_image_atomic", "atomic_write_bytes"]


def palette(n: int) -> np.ndarray:
    """``n`` visually distinct RGB colours, ``(n, 3)`` uint8 (golden-ratio hue walk; deterministic).

    Example:
        >>> palette(3).shape
        (3, 3)
    """
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.65 + 0.3 * ((i // 7) % 2)
        v = 0.95 - 0.25 * ((i // 3) % 2)
        cols.append([int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


def colorize(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Label map ``(H, W)`` → RGB ``(H, W, 3)`` uint8; negative labels are black."""
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    pal = palette(max(int(lab.max()) + 1, 1))
    out = pal[lab.clip(min=0)]
    out[lab < 0] = 0
    return out


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` map of pixels whose right or lower neighbour has another label."""
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def overlay(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map over an image and draw segment boundaries in white.

    Args:
        image: ``(3, H, W)`` uint8 tensor or ``(H, W, 3)`` uint8 array.
        labels: ``(H, W)`` integer labels.
        alpha: weight of the colour layer.

    Returns:
        ``(H, W, 3)`` uint8 array.
    """
    img = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    col = colorize(lab).astype(np.float32)
    out = (1 - alpha) * img.astype(np.float32) + alpha * col
    out[boundaries(lab)] = 255
    return out.clip(0, 255).astype(np.uint8)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None, width: int = 320) -> Image.Image:
    """Grid of images (each row a sequence of ``(H, W, 3)`` uint8 arrays), one caption per row."""
    tiles: list[list[Image.Image]] = []
    for row in rows:
        ims = []
        for a in row:
            im = Image.fromarray(a)
            h = max(1, round(im.height * width / im.width))
            ims.append(im.resize((width, h), Image.BILINEAR))
        tiles.append(ims)
    cap_h = 18 if captions else 0
    row_h = [max(im.height for im in r) + cap_h for r in tiles]
    ncol = max(len(r) for r in tiles)
    sheet = Image.new("RGB", (ncol * width, sum(row_h)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r, ims in enumerate(tiles):
        if captions:
            draw.text((4, y + 3), captions[r], fill="black")
        for c, im in enumerate(ims):
            sheet.paste(im, (c * width, y + cap_h))
        y += row_h[r]
    return sheet


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_image_atomic(image: Image.Image, path: str | os.PathLike[str], **save_kwargs: object) -> None:
    """Save a PIL image atomically; the format follows the file suffix."""
    import io

    buf = io.BytesIO()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "PNG")
    image.save(buf, format=fmt, **save_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def save_label_png(labels: torch.Tensor | np.ndarray, path: str | os.PathLike[str]) -> None:
    """Save a label map as an indexed (palette) PNG: pixel value = segment id, shown in colour.

    Labels must lie in ``[0, 255]``. Written atomically and deterministically.
    """
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.min() < 0 or lab.max() > 255:
        raise ValueError(f"labels must lie in [0, 255] for a PNG label map, got [{lab.min()}, {lab.max()}]")
    im = Image.fromarray(lab.astype(np.uint8))  # mode L
    im.putpalette(palette(256).reshape(-1).tolist())  # L becomes P, values kept
    save_image_atomic(im, path, optimize=False)
