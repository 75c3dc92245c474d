"""Visualisation helpers: label palettes, overlays, contact sheets, atomic image writes."""

from __future__ import annotations

import colorsys
import contextlib
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "palette", "colorize", "overlay", "overlay_array", "overlay_image", "overlay_tensor", "boundaries", "contact_sheet",
    "save_label_png",
    "label_png_bytes", "save_image_atomic", "atomic_write_bytes", "atomic_path", "encode_overlay_jpeg",
]


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
    np.not_equal(labels[:, :-1], labels[:, 1:], out=b[:, :-1])
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def overlay(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map over an image and draw segment boundaries in white.

    Args:
        image: ``(3, H, W)`` uint8 tensor or ``(H, W, 3)`` uint8 array.
        labels: ``(H, W)`` integer labels.
        alpha: weight of the colour layer.

    Returns:
        ``(H, W, 3)`` uint8 array: ``trunc((1 - alpha) * image + alpha * colour)`` in float32,
        white on boundaries (``alpha = 0.5``: :func:`overlay_array`, the same pixels).
    """
    if alpha == 0.5:
        return overlay_array(image, labels)
    img = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    col = colorize(lab).astype(np.float32)
    out = (1 - alpha) * img.astype(np.float32) + alpha * col
    out[boundaries(lab)] = 255
    return out.clip(0, 255).astype(np.uint8)


def overlay_image(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> Image.Image:
    """:func:`overlay` with ``alpha = 0.5`` as a PIL image (:func:`overlay_array`'s pixels)."""
    return Image.fromarray(overlay_array(image, labels))


def overlay_array(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """:func:`overlay` with ``alpha = 0.5``: ``floor((image + colour) / 2)`` (the float blend's
    pixels), white on boundaries, composited by NumPy, which releases the GIL in its element-wise
    loops (Pillow's ``Image.blend`` holds it): the writer threads of ``clasp segment`` composite
    side by side.

    Args:
        image: ``(3, H, W)`` uint8 tensor or ``(H, W, 3)`` uint8 array.
        labels: ``(H, W)`` integer labels (negative: black colour layer).

    Returns:
        ``(H, W, 3)`` uint8 array.

    Example:
        >>> img = np.full((4, 4, 3), 100, dtype=np.uint8); lab = np.zeros((4, 4), dtype=np.int64)
        >>> lab[:, 2:] = 1
        >>> ov = overlay_array(img, lab)
        >>> bool((ov[:, 0] == (100 + palette(1)[0].astype(int)) // 2).all()), bool((ov[:, 1] == 255).all())
        (True, True)
    """
    img = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    n = int(lab.max()) + 1 if lab.size else 1
    pal = _PALETTE_ARRAY if n <= 256 else palette(n)
    neg = lab < 0
    has_neg = bool(neg.any())
    col = np.take(pal, np.where(neg, 0, lab) if has_neg else lab, axis=0)
    if has_neg:
        col[neg] = 0
    out = np.add(img, col, dtype=np.uint16)
    out >>= 1
    out = out.astype(np.uint8)
    out[boundaries(lab)] = 255
    return out


def overlay_tensor(image: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """:func:`overlay` in torch, on the tensors' device (a GPU composites for free).

    Args:
        image: ``(3, H, W)`` uint8.
        labels: ``(H, W)`` integer labels (negative: black).
        alpha: weight of the colour layer.

    Returns:
        ``(3, H, W)`` uint8, equal to ``overlay(image, labels)`` (channels first).

    Example:
        >>> img = torch.full((3, 4, 4), 100, dtype=torch.uint8); lab = torch.zeros(4, 4, dtype=torch.long)
        >>> lab[:, 2:] = 1
        >>> bool((overlay_tensor(img, lab).permute(1, 2, 0).numpy() == overlay(img, lab)).all())
        True
    """
    lab = labels.long()
    n = max(int(lab.max()) + 1, 1) if lab.numel() else 1
    pal = torch.from_numpy(palette(n)).to(device=lab.device, dtype=torch.float32)  # (n, 3)
    col = pal[lab.clamp_min(0)].permute(2, 0, 1)  # (3, H, W)
    col = col.masked_fill((lab < 0).unsqueeze(0), 0.0)
    out = (1 - alpha) * image.to(torch.float32) + alpha * col
    edge = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    out = out.masked_fill(edge.unsqueeze(0), 255.0)
    return out.clamp_(0, 255).to(torch.uint8)


def encode_overlay_jpeg(overlay_img: torch.Tensor | np.ndarray | Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an overlay: ``(3, H, W)`` uint8 tensor (from :func:`overlay_tensor`),
    ``(H, W, 3)`` uint8 array (from :func:`overlay_array`) or PIL image.

    Encoded by libjpeg-turbo through ``simplejpeg`` (4:2:0 chroma, accurate DCT), which releases
    the GIL while it encodes: two writer threads encode at 1.95x one thread's rate, where Pillow's
    encoder (same speed alone) holds the GIL (0.95x) and ``torchvision.io.encode_jpeg`` too
    (``benchmarks/io.py``). The decoded pixels differ from Pillow's encoding of the same image by
    a few levels (both are lossy encodings of the same pixels)."""
    import simplejpeg

    if isinstance(overlay_img, Image.Image):
        arr = np.asarray(overlay_img.convert("RGB"))
    elif isinstance(overlay_img, torch.Tensor):
        arr = overlay_img.permute(1, 2, 0).cpu().numpy()
    else:
        arr = overlay_img
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                  colorsubsampling="420", fastdct=False)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None,
                  width: int = 320) -> Image.Image:
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


_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read once: ``os.umask`` can only be read by setting it, which is not
    safe while writer threads create files."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
        return _UMASK


def _mode() -> int:
    return 0o666 & ~_umask()  # mkstemp creates 0600; give the usual file mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it is fsynced (unless the caller
    did: ``fsync=False``) and renamed onto ``path`` (atomic), on any error removed. Readers never
    see a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _mode())
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder
    (:func:`clasp_torch.commit.stage_bytes`), fsynced, then renamed onto ``path``. For many files
    at once, :class:`clasp_torch.commit.GroupCommitter` pays one sync per group instead."""
    from .commit import discard, fsync_file, publish, stage_bytes

    staged = stage_bytes(path, data)
    try:
        fsync_file(staged.tmp)
    except BaseException:
        discard([staged])
        raise
    publish([staged])


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
    atomic_write_bytes(path, label_png_bytes(labels))


_PALETTE_ARRAY: np.ndarray = palette(256)
_PALETTE_BYTES: bytes = _PALETTE_ARRAY.tobytes()


def label_png_bytes(labels: torch.Tensor | np.ndarray, compress_level: int = 1) -> bytes:
    """The indexed PNG of :func:`save_label_png` as bytes (``compress_level`` 1: zlib's fastest;
    the pixel values do not depend on it).

    Written here with :mod:`zlib` (which releases the GIL while it compresses), byte for byte the
    file Pillow writes for the same palette image (unfiltered rows, one ``IDAT`` chunk per
    ``max(65536, 4 W)`` bytes of compressed data; tested against Pillow).
    """
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {lab.shape}")
    if lab.dtype != np.uint8 and lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError(f"labels must lie in [0, 255] for a PNG label map, got [{lab.min()}, {lab.max()}]")
    h, w = lab.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter byte 0 (None) before every row
    rows[:, 1:] = lab
    deflate = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9)  # Pillow's settings (memLevel 9)
    data = deflate.compress(memoryview(rows).cast("B")) + deflate.flush()  # the buffer itself, no copy
    step = max(65536, 4 * w)
    idat = b"".join(_png_chunk(b"IDAT", data[i : i + step]) for i in range(0, max(len(data), 1), step))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + _png_chunk(b"PLTE", _PALETTE_BYTES) + idat + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
