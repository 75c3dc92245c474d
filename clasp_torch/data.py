"""Datasets: robust image loading, unlabelled image folders, labelled segmentation sets.

Everything here returns **uint8 RGB tensors of shape (3, H, W)** at the stored resolution; resizing
and normalisation belong to :mod:`clasp_torch.preprocess`, padding to the model.

* :func:`load_image` - one file -> ``uint8 (3, H, W)`` RGB, or :class:`ImageLoadError`.
* :class:`ImageFolder` - every image under a folder (or a single file), sorted, unlabelled.
* :class:`SegmentationDataset` - ``ROOT/images/<id>.jpg`` + ``ROOT/labels/<id>.png`` pairs for
  COCO-Stuff (182 fine or 27 coarse classes) and ADE20K (150 classes); ignore label ``-1``.
* :func:`collate_images` - DataLoader ``collate_fn`` for images of different sizes (no padding).

COCO-Stuff 27-class coarse mapping
----------------------------------
``coarse=True`` maps the 182 COCO-Stuff fine ids to the 27 supercategories used by the
unsupervised-segmentation literature (IIC / PiCIE / STEGO "cocostuff27": the ``fine_to_coarse``
dict in STEGO's ``src/data.py``, https://github.com/mhamilton723/STEGO). Those supercategories are
the official COCO-Stuff label hierarchy (Caesar et al., CVPR 2018,
https://github.com/nightrome/cocostuff): 12 thing supercategories (coarse ids 0-11) followed by 15
stuff supercategories (coarse ids 12-26), in the order of :data:`COCOSTUFF_COARSE_NAMES`. The table
below is written per supercategory and checked (tests) to give exactly STEGO's mapping, including
the 11 fine ids that COCO never annotates (e.g. 11 "street sign"), which map to their
supercategory. Fine labels follow the COCO-Stuff 164k PNG convention: value = COCO category id - 1
(0..181), 255 = unlabelled; 182 ("other", absent from the 182-class evaluation) is ignored too.

Example (the class tables, defined in :mod:`clasp_torch.classes`):
    >>> COCOSTUFF_FINE_NAMES[11], COCOSTUFF_COARSE_NAMES[COCOSTUFF_FINE_TO_COARSE[11]]  # never annotated
    ('street sign', 'outdoor')
    >>> grass = COCOSTUFF_FINE_NAMES.index("grass")
    >>> COCOSTUFF_COARSE_NAMES[COCOSTUFF_FINE_TO_COARSE[grass]]
    'plant'
    >>> len(set(COCOSTUFF_FINE_TO_COARSE)), ADE20K_NAMES[:3]
    (27, ('wall', 'building', 'sky'))
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .classes import ADE20K_NAMES, COCOSTUFF_COARSE_NAMES, COCOSTUFF_FINE_NAMES, COCOSTUFF_FINE_TO_COARSE

__all__ = [
    "IMAGE_EXTENSIONS",
    "IGNORE_INDEX",
    "COCOSTUFF_FINE_NAMES",
    "COCOSTUFF_COARSE_NAMES",
    "COCOSTUFF_FINE_TO_COARSE",
    "ADE20K_NAMES",
    "ImageLoadError",
    "load_image",
    "load_image_bytes",
    "load_label",
    "ImageFolder",
    "SegmentationDataset",
    "collate_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
"""Lower-case file suffixes picked up by :class:`ImageFolder` (matched case-insensitively)."""

IGNORE_INDEX: int = -1
"""Label value of pixels that are excluded from evaluation."""

# --------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """A file could not be decoded as an image.

    Attributes:
        path: the offending file.
        reason: one-line human-readable cause (``"empty file"``, ``"not an image ..."``, ...).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # force one line
        super().__init__(f"cannot load image {self.path!r}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def _alpha_free_rgb(img: Image.Image) -> Image.Image:
    """Return an ``RGB`` image; alpha channels are dropped (not composited)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette transparency would trigger a Pillow warning on a direct RGB conversion.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        return img.convert("RGB") if img.mode == "RGBA" else img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            arr = np.clip(arr, 0, 255)  # genuinely 32-bit data: no sane scale, keep 8-bit range
        else:
            arr = (arr * 255 + 32767) // 65535  # 16-bit -> 8-bit with rounding (x / 257)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        arr = np.clip(np.rint(arr), 0, 255)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    # 1, L, LA, La, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, ...: Pillow's converters.
    # (RGBA -> RGB and LA -> RGB drop alpha; CMYK -> RGB is Pillow's naive conversion.)
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str], *, exif_transpose: bool = True) -> Tensor:
    """Read an image file as a ``uint8`` RGB tensor of shape ``(3, H, W)``.

    Handles grayscale (``1``/``L``), palette (``P``, with or without transparency), alpha
    (``LA``/``RGBA``: alpha dropped), ``CMYK``, ``YCbCr``, 16-bit PNG (scaled ``v -> round(v/257)``;
    Pillow already reduces 48/64-bit RGB(A) PNGs to their high byte), float TIFF (``[0, 1]``
    scaled to ``[0, 255]``), animated GIF/WebP/multi-page TIFF (first frame).

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation tag (so a phone photo shot in portrait comes
            out portrait, ``H`` and ``W`` swapped for orientations 5-8). Set ``False`` when pixel
            labels refer to the stored pixel grid (COCO/ADE annotations do).

    Raises:
        ImageLoadError: missing/unreadable, empty, truncated/corrupt, or not an image.
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            raise ImageLoadError(path, "is a directory")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "empty file")
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, "permission denied") from exc
    return _decode(path, path, exif_transpose)


def load_image_bytes(data: bytes, name: str = "<bytes>", *, exif_transpose: bool = True) -> Tensor:
    """Decode an encoded image (the bytes of a file, e.g. a tar member) as :func:`load_image` does.

    Args:
        data: the encoded file.
        name: what error messages call it.
        exif_transpose: apply the EXIF orientation tag.

    Returns:
        ``uint8 (3, H, W)`` RGB.

    Raises:
        ImageLoadError: empty, truncated/corrupt, or not an image.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (4, 3), (255, 0, 0)).save(buf, "PNG")
        >>> load_image_bytes(buf.getvalue()).shape
        torch.Size([3, 3, 4])
    """
    import io

    if not data:
        raise ImageLoadError(name, "empty file")
    return _decode(io.BytesIO(data), name, exif_transpose)


def _decode(source: Any, path: str, exif_transpose: bool) -> Tensor:
    """Decode ``source`` (a path or a binary file object) to ``uint8 (3, H, W)``."""
    try:
        with Image.open(source) as img:
            img.seek(0)  # first frame of animations / multi-page files
            img.load()
            if exif_transpose:
                try:
                    img = ImageOps.exif_transpose(img) or img
                except Exception as exc:  # malformed EXIF must not lose the pixels
                    warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({exc})", stacklevel=3)
            rgb = _alpha_free_rgb(img)
            arr = np.array(rgb, dtype=np.uint8, copy=True)
    except ImageLoadError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, "permission denied") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image or unsupported format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(path, f"decoded to an unusable array of shape {arr.shape}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel label PNG as an integer array ``(H, W)`` of raw stored values.

    The dtype is the stored one (``uint8`` for mode ``L``/``P``, wider for 16/32-bit maps).

    Raises:
        ImageLoadError: unreadable file, or not a single-channel (``L``/``P``/``I``/``I;16``) image.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
                raise ImageLoadError(path, f"label map must be single-channel, got mode {img.mode}")
            arr = np.array(img)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(path, f"unreadable label map ({exc})") from exc
    return arr


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

OnError = Literal["raise", "return"]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


class ImageFolder(Dataset):
    """Unlabelled images under a folder, in sorted (deterministic) order.

    Files are matched by suffix (case-insensitive); hidden files and folders (name starting with
    ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped. Order: sorted by path relative to
    ``root`` (POSIX form), so it is the same on every machine and every run.

    Items: ``{"image": uint8 (3, H, W) RGB, "path": str, "index": int}``. With
    ``on_error="return"`` an unreadable file yields
    ``{"image": None, "path": ..., "index": ..., "error": reason}`` instead of raising, so one bad
    file never kills a DataLoader (see :func:`collate_images`).

    Args:
        root: a folder, or a single image file (a one-item dataset).
        recursive: descend into sub-folders.
        extensions: accepted suffixes, with or without the leading dot.
        on_error: ``"raise"`` (default) or ``"return"``.
        exif_transpose: apply EXIF orientation (default ``True``).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no matching file under ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        recursive: bool = True,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        on_error: OnError = "raise",
        exif_transpose: bool = True,
    ) -> None:
        _check_on_error(on_error)
        self.root = Path(root)
        self.recursive = recursive
        self.extensions = tuple(
            sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in extensions})
        )
        self.on_error: OnError = on_error
        self.exif_transpose = exif_transpose
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if self.root.is_file():
            self.paths = [str(self.root)]
        else:
            self.paths = self._scan()
        if not self.paths:
            raise ValueError(
                f"no image files ({', '.join(self.extensions)}) found under {self.root}"
                + ("" if recursive else " (recursive=False)")
            )

    def _scan(self) -> list[str]:
        found: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)) if self.recursive else []
            for name in filenames:
                if _is_hidden(name) or not name.lower().endswith(self.extensions):
                    continue
                full = Path(dirpath) / name
                if not full.is_file():
                    continue
                found.append((full.relative_to(self.root).as_posix(), str(full)))
        found.sort()
        return [p for _, p in found]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path = self.paths[index]
        try:
            image = load_image(path, exif_transpose=self.exif_transpose)
        except ImageLoadError as exc:
            if self.on_error == "raise":
                raise
            return {"image": None, "path": path, "index": index, "error": exc.reason}
        return {"image": image, "path": path, "index": index}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)})"


DatasetName = Literal["cocostuff", "ade20k"]


def _label_lut(dataset: str, coarse: bool) -> np.ndarray:
    """Raw stored value (0..255) -> training label; ``-1`` = ignore, ``-2`` = invalid value."""
    lut = np.full(256, -2, dtype=np.int64)
    if dataset == "cocostuff":
        fine = np.arange(182)
        lut[:182] = np.asarray(COCOSTUFF_FINE_TO_COARSE) if coarse else fine
        lut[182] = IGNORE_INDEX  # "other"
        lut[255] = IGNORE_INDEX  # unlabelled
    else:  # ade20k
        lut[0] = IGNORE_INDEX
        lut[1:151] = np.arange(150)
    return lut


class SegmentationDataset(Dataset):
    """Labelled evaluation images: ``root/images/<id>.jpg`` with ``root/labels/<id>.png``.

    Label conventions (raw PNG value -> returned label, ``-1`` = ignore):

    * ``"cocostuff"``: fine id ``0..181`` kept (``num_classes = 182``); with ``coarse=True``
      mapped by :data:`COCOSTUFF_FINE_TO_COARSE` to ``0..26`` (``num_classes = 27``, see module
      docstring for the source). ``255`` (unlabelled) and ``182`` ("other") -> ``-1``.
    * ``"ade20k"``: ``1..150`` -> ``0..149`` (``num_classes = 150``), ``0`` ("other") -> ``-1``.

    Any other stored value raises ``ValueError`` (a wrong ``dataset`` argument should fail loudly,
    not score silently). Images are loaded **without** EXIF transposition because the annotations
    refer to the stored pixel grid; image and label sizes must agree.

    Items: ``{"image": uint8 (3, H, W), "label": int64 (H, W), "path": str, "index": int,
    "id": str}``.

    Args:
        root: dataset folder (containing ``images/`` and ``labels/``).
        dataset: ``"cocostuff"`` or ``"ade20k"``.
        coarse: COCO-Stuff 27-class labels (COCO-Stuff only).
        limit: keep only the first ``limit`` ids (sorted order).
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike[str],
        dataset: DatasetName = "cocostuff",
        coarse: bool = False,
        limit: int | None = None,
    ) -> None:
        if dataset not in ("cocostuff", "ade20k"):
            raise ValueError(f"dataset must be 'cocostuff' or 'ade20k', got {dataset!r}")
        if coarse and dataset != "cocostuff":
            raise ValueError("coarse=True is only defined for dataset='cocostuff'")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.root = Path(root)
        self.dataset: DatasetName = dataset
        self.coarse = coarse
        image_dir, label_dir = self.root / "images", self.root / "labels"
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise FileNotFoundError(
                f"{self.root} must contain 'images/' and 'labels/' folders (<id>.jpg / <id>.png)"
            )
        images = {
            p.stem: p
            for p in image_dir.iterdir()
            if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
        }
        ids = sorted(images)
        if not ids:
            raise ValueError(f"no images found in {image_dir}")
        missing = [i for i in ids if not (label_dir / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) under {image_dir} lack labels/<id>.png, e.g. {missing[0]!r}"
            )
        if limit is not None:
            ids = ids[:limit]
        self.ids: list[str] = ids
        self.image_paths: list[str] = [str(images[i]) for i in ids]
        self.label_paths: list[str] = [str(label_dir / f"{i}.png") for i in ids]
        self._lut = _label_lut(dataset, coarse)

    @property
    def num_classes(self) -> int:
        """182 (COCO-Stuff fine), 27 (COCO-Stuff coarse) or 150 (ADE20K)."""
        if self.dataset == "ade20k":
            return 150
        return 27 if self.coarse else 182

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names indexed by label ``0..num_classes-1``."""
        if self.dataset == "ade20k":
            return ADE20K_NAMES
        return COCOSTUFF_COARSE_NAMES if self.coarse else COCOSTUFF_FINE_NAMES

    def __len__(self) -> int:
        return len(self.ids)

    def load_label(self, index: int) -> Tensor:
        """The mapped ``int64 (H, W)`` label of item ``index`` (ignore = ``-1``)."""
        path = self.label_paths[index]
        raw = load_label(path)
        if raw.dtype != np.uint8 and raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"{path}: label values outside 0..255")
        label = self._lut[raw.astype(np.uint8, copy=False)]
        if (label == -2).any():
            bad = sorted(set(raw[label == -2].tolist()))[:10]
            raise ValueError(f"{path}: values {bad} are not valid {self.dataset} labels")
        label = torch.from_numpy(label)
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = load_image(self.image_paths[index], exif_transpose=False)
        label = self.load_label(index)
        if tuple(image.shape[1:]) != tuple(label.shape):
            raise ValueError(
                f"{self.ids[index]}: image {tuple(image.shape[1:])} and label {tuple(label.shape)} "
                "sizes differ"
            )
        return {
            "image": image,
            "label": label,
            "path": self.image_paths[index],
            "index": index,
            "id": self.ids[index],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, dataset={self.dataset!r}, "
            f"coarse={self.coarse}, n={len(self)}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def collate_images(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for :class:`ImageFolder` / :class:`SegmentationDataset` items (and the
    collection sources of :mod:`clasp_torch.sources`).

    Images keep their own sizes (no padding or stacking; the model pads).

    Returns:
        ``{"image": list[Tensor (3,H,W) | None], "path": list[str], "index": LongTensor (B,),
        "errors": list[dict]}`` plus ``"label": list[Tensor (H,W)]`` and ``"id": list[str]`` when
        the items carry them. Items whose ``image`` is ``None`` (``on_error="return"``) are
        moved to ``"errors"`` (each ``{"path", "index", "error"}``) and left out of the other
        entries, so ``B`` counts the good items only (it may be 0). Collection items also give
        ``"name"`` and ``"part"`` lists, ``"encoded"`` (JPEG bytes, ``None`` where ``image`` is
        set: such items count as good) and ``"part_ends"`` (the shard end markers).

    Example:
        >>> b = collate_images([{"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "path": "a", "index": 0},
        ...                     {"image": None, "path": "b", "index": 1, "error": "empty file"}])
        >>> len(b["image"]), b["errors"]
        (1, [{'path': 'b', 'index': 1, 'error': 'empty file'}])
    """
    ends = [item for item in batch if "part_end" in item]
    items = [item for item in batch if "part_end" not in item]
    good = [item for item in items if item.get("image") is not None or item.get("encoded") is not None]
    errors = []
    for item in items:
        if item.get("image") is None and item.get("encoded") is None:
            err = {"path": item.get("path"), "index": item.get("index"), "error": item.get("error", "unknown error")}
            for extra in ("name", "part"):
                if extra in item:
                    err[extra] = item[extra]
            errors.append(err)
    out: dict[str, Any] = {
        "image": [item.get("image") for item in good],
        "path": [item["path"] for item in good],
        "index": torch.tensor([int(item["index"]) for item in good], dtype=torch.long),
        "errors": errors,
    }
    if any("label" in item for item in good):
        out["label"] = [item["label"] for item in good]
    if any("id" in item for item in good):
        out["id"] = [item["id"] for item in good]
    if any("name" in item for item in items):
        out["name"] = [item.get("name") for item in good]
        out["part"] = [item.get("part") for item in good]
    if any("encoded" in item for item in good):
        out["encoded"] = [item.get("encoded") for item in good]
    if ends:
        out["part_ends"] = [{"part": e["part_end"], "count": e["count"], "path": e.get("path")} for e in ends]
    return out
