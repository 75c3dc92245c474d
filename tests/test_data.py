"""Tests for clasp_torch.data: robust image loading, ImageFolder, SegmentationDataset, collation."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clasp_torch.data import (
    ADE20K_NAMES,
    COCOSTUFF_COARSE_NAMES,
    COCOSTUFF_FINE_NAMES,
    COCOSTUFF_FINE_TO_COARSE,
    IMAGE_EXTENSIONS,
    ImageFolder,
    ImageLoadError,
    SegmentationDataset,
    collate_images,
    load_image,
)

DATA_DIR = Path(os.environ.get("CLASP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
COCO_DIR = DATA_DIR / "cocostuff-val-dev"
ADE_DIR = DATA_DIR / "ade20k-val-dev"

needs_coco = pytest.mark.skipif(
    not COCO_DIR.is_dir(), reason=f"real COCO-Stuff dev data not found at {COCO_DIR} (set CLASP_DATA)"
)
needs_ade = pytest.mark.skipif(
    not ADE_DIR.is_dir(), reason=f"real ADE20K dev data not found at {ADE_DIR} (set CLASP_DATA)"
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rgb_blocks(h: int = 32, w: int = 48) -> np.ndarray:
    """Left half red, right half blue (big flat blocks survive JPEG)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


def _write_png16(path: Path, arr: np.ndarray) -> None:
    """Minimal 16-bit PNG writer (Pillow cannot write 48-bit RGB). arr: uint16 (H, W) or (H, W, 3)."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _close(img: torch.Tensor, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    return bool((img.permute(1, 2, 0).reshape(-1, 3).int() - torch.tensor(rgb)).abs().max() <= tol)


# --------------------------------------------------------------------------------------------
# load_image: formats and modes
# --------------------------------------------------------------------------------------------


def test_rgb_png_exact(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 7, 9) and img.is_contiguous()
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(a))


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    g = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (3, 6, 10)
    for c in range(3):
        assert torch.equal(img[c], torch.from_numpy(g))
    Image.fromarray(g > 100).save(tmp_path / "b.png")  # mode "1"
    img = load_image(tmp_path / "b.png")
    assert set(img.unique().tolist()) <= {0, 255}
    assert torch.equal(img[0] == 255, torch.from_numpy(g > 100))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.fromarray(_rgb_blocks()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    p.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert img.shape == (3, 32, 48)
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(_rgb_blocks()))
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as check:
        assert "transparency" in check.info
    img = load_image(tmp_path / "pt.png")  # alpha dropped, colours kept
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(_rgb_blocks()))


def test_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb_blocks(), np.zeros((32, 48), np.uint8)])  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (3, 32, 48)
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(_rgb_blocks()))
    la = np.dstack([np.full((5, 4), 77, np.uint8), np.full((5, 4), 10, np.uint8)])
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.shape == (3, 5, 4) and bool((img == 77).all())


def test_16bit_grayscale_png_scaled_not_clipped(tmp_path: Path) -> None:
    vals = np.array([[0, 257, 128 * 257, 65535, 1000, 300 * 257 // 300]], dtype=np.uint16)
    Image.fromarray(vals).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    expect = np.rint(vals.astype(np.float64) / 257).astype(np.uint8)
    assert torch.equal(img[0], torch.from_numpy(expect)) and torch.equal(img[0], img[2])
    # Pillow's own convert("L") would clip: 1000 -> 255; we must give round(1000/257) = 4
    assert int(img[0, 0, 4]) == 4


def test_16bit_rgb_png(tmp_path: Path) -> None:
    a = np.zeros((3, 4, 3), np.uint16)
    a[..., 0] = 65535
    a[..., 1] = 100 * 257
    a[..., 2] = 0
    _write_png16(tmp_path / "rgb16.png", a)
    img = load_image(tmp_path / "rgb16.png")
    assert img.shape == (3, 3, 4)
    assert _close(img, (255, 100, 0), tol=1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    red = Image.fromarray(np.full((16, 16, 3), (255, 0, 0), np.uint8)).convert("CMYK")
    red.save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    img = load_image(tmp_path / "cmyk.jpg")
    assert img.shape == (3, 16, 16) and _close(img, (255, 0, 0), tol=16)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = Image.fromarray(_rgb_blocks(h=32, w=48))  # landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.shape == (3, 48, 32)  # portrait after transposition
    assert _close(img[:, 4:20, 4:28], (255, 0, 0), tol=20)  # stored left half is now on top
    assert _close(img[:, 28:44, 4:28], (0, 0, 255), tol=20)
    raw = load_image(tmp_path / "rot.jpg", exif_transpose=False)
    assert raw.shape == (3, 32, 48)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as check:
        assert getattr(check, "n_frames", 1) == 3
    img = load_image(tmp_path / "anim.gif")
    assert img.shape == (3, 8, 10) and _close(img, (255, 0, 0), tol=0)


def test_webp_tiff_bmp(tmp_path: Path) -> None:
    a = _rgb_blocks(10, 12)
    Image.fromarray(a).save(tmp_path / "x.webp", lossless=True)
    Image.fromarray(a).save(tmp_path / "x.tif")
    Image.fromarray(a).save(tmp_path / "x.bmp")
    for name in ("x.webp", "x.tif", "x.bmp"):
        img = load_image(tmp_path / name)
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(a)), name


def test_multipage_and_float_tiff(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (6, 5), c) for c in ((10, 20, 30), (200, 200, 200))]
    pages[0].save(tmp_path / "multi.tiff", save_all=True, append_images=pages[1:])
    assert _close(load_image(tmp_path / "multi.tiff"), (10, 20, 30), tol=0)
    f = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    assert torch.equal(img[1], torch.from_numpy(np.rint(f * 255).astype(np.uint8)))


@pytest.mark.parametrize(
    ("name", "content", "reason_part"),
    [
        ("empty.jpg", b"", "empty"),
        ("garbage.jpg", b"\x00\x01 definitely not a jpeg" * 10, "not an image"),
        ("text.png", b"hello world\n", "not an image"),
    ],
    ids=["empty", "garbage", "text"],
)
def test_bad_files_raise_image_load_error(
    tmp_path: Path, name: str, content: bytes, reason_part: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path) and reason_part in err.reason
    assert "\n" not in str(err) and "\n" not in err.reason


def test_truncated_jpeg_and_missing_file(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path / "dir.jpg")


def test_image_load_error_pickles() -> None:
    err = ImageLoadError("/x/y.jpg", "corrupt\nmulti-line   reason")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageLoadError)
    assert back.path == "/x/y.jpg" and back.reason == "corrupt multi-line reason"
    assert str(back) == str(err)


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (10, 6), (255, 0, 0)).save(root / "b.png")
    Image.new("RGB", (7, 9), (0, 255, 0)).save(root / "A.JPG")
    Image.new("L", (5, 5), 128).save(root / "sub" / "c.bmp")
    Image.new("RGB", (4, 3), (0, 0, 255)).save(root / "sub" / "deeper" / "d.webp")
    Image.new("RGB", (4, 3)).save(root / ".hidden" / "e.png")
    Image.new("RGB", (4, 3)).save(root / "._f.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_sorted_recursive(folder: Path) -> None:
    ds = ImageFolder(folder)
    rel = [Path(p).relative_to(folder).as_posix() for p in ds.paths]
    assert rel == ["A.JPG", "b.png", "sub/c.bmp", "sub/deeper/d.webp"]
    assert len(ds) == 4 and ImageFolder(folder).paths == ds.paths  # deterministic
    item = ds[1]
    assert set(item) == {"image", "path", "index"}
    assert item["index"] == 1 and item["path"].endswith("b.png")
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 6, 10)
    assert ds[-1]["path"].endswith("d.webp")
    with pytest.raises(IndexError):
        ds[4]


def test_image_folder_options(folder: Path) -> None:
    flat = ImageFolder(folder, recursive=False)
    assert [Path(p).name for p in flat.paths] == ["A.JPG", "b.png"]
    only_png = ImageFolder(folder, extensions=("PNG",))
    assert [Path(p).name for p in only_png.paths] == ["b.png"]
    single = ImageFolder(folder / "b.png")
    assert len(single) == 1 and single[0]["image"].shape == (3, 6, 10)
    with pytest.raises(FileNotFoundError):
        ImageFolder(folder / "missing")
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(folder / "empty")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(folder, on_error="skip")  # type: ignore[arg-type]
    assert ".jpg" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS


def test_image_folder_bad_file_raise_or_return(folder: Path) -> None:
    (folder / "broken.png").write_bytes(b"")
    ds = ImageFolder(folder, recursive=False)
    names = [Path(p).name for p in ds.paths]
    bad = names.index("broken.png")
    with pytest.raises(ImageLoadError, match="empty"):
        ds[bad]
    tolerant = ImageFolder(folder, recursive=False, on_error="return")
    item = tolerant[bad]
    assert item["image"] is None and item["index"] == bad and "empty" in item["error"]
    assert tolerant[0]["image"] is not None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_survives_bad_file(folder: Path, num_workers: int) -> None:
    (folder / "broken.jpg").write_bytes(b"garbage" * 3)
    ds = ImageFolder(folder, on_error="return")
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_images)
    images, errors, indices = [], [], []
    for batch in loader:
        assert len(batch["image"]) == len(batch["path"]) == batch["index"].numel()
        images += batch["image"]
        errors += batch["errors"]
        indices += batch["index"].tolist()
    assert len(images) == 4 and len(errors) == 1
    assert errors[0]["path"].endswith("broken.jpg") and "not an image" in errors[0]["error"]
    assert sorted([*indices, errors[0]["index"]]) == list(range(5))
    assert {tuple(im.shape) for im in images} == {(3, 9, 7), (3, 6, 10), (3, 5, 5), (3, 3, 4)}


def test_collate_images_shapes() -> None:
    batch = [
        {"image": torch.zeros(3, 4, 5, dtype=torch.uint8), "label": torch.zeros(4, 5, dtype=torch.long),
         "path": "a", "index": 3, "id": "a"},
        {"image": None, "path": "bad", "index": 4, "error": "empty file"},
        {"image": torch.ones(3, 6, 2, dtype=torch.uint8), "label": torch.ones(6, 2, dtype=torch.long),
         "path": "b", "index": 5, "id": "b"},
    ]  # fmt: skip
    out = collate_images(batch)
    assert [tuple(x.shape) for x in out["image"]] == [(3, 4, 5), (3, 6, 2)]
    assert [tuple(x.shape) for x in out["label"]] == [(4, 5), (6, 2)]
    assert out["path"] == ["a", "b"] and out["id"] == ["a", "b"]
    assert out["index"].dtype == torch.long and out["index"].tolist() == [3, 5]
    assert out["errors"] == [{"path": "bad", "index": 4, "error": "empty file"}]
    empty = collate_images([batch[1]])
    assert empty["image"] == [] and empty["index"].numel() == 0 and len(empty["errors"]) == 1
    assert "label" not in collate_images([{"image": torch.zeros(3, 1, 1), "path": "p", "index": 0}])


# --------------------------------------------------------------------------------------------
# class tables
# --------------------------------------------------------------------------------------------


def test_cocostuff_tables() -> None:
    assert len(COCOSTUFF_FINE_NAMES) == 182 and len(set(COCOSTUFF_FINE_NAMES)) == 182
    assert len(COCOSTUFF_COARSE_NAMES) == 27 and len(set(COCOSTUFF_COARSE_NAMES)) == 27
    assert len(ADE20K_NAMES) == 150 and ADE20K_NAMES[0] == "wall" and ADE20K_NAMES[-1] == "flag"
    table = COCOSTUFF_FINE_TO_COARSE
    assert len(table) == 182 and set(table) == set(range(27))
    assert set(table[:91]) == set(range(12)) and set(table[91:]) == set(range(12, 27))  # things / stuff
    fine = {name: i for i, name in enumerate(COCOSTUFF_FINE_NAMES)}
    # spot checks against the published cocostuff27 (STEGO src/data.py fine_to_coarse) mapping
    expected_ids = {0: 9, 1: 11, 11: 8, 25: 6, 43: 5, 51: 2, 61: 3, 71: 0, 77: 1, 83: 4, 90: 4, 33: 10,
                    15: 7, 91: 17, 93: 22, 94: 20, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 105: 23,
                    119: 26, 120: 14, 126: 24, 129: 15, 148: 21, 156: 23, 170: 18, 179: 19, 181: 24}  # fmt: skip
    for f, c in expected_ids.items():
        assert table[f] == c, (f, COCOSTUFF_FINE_NAMES[f])
    by_name = {"person": "person", "tv": "electronic", "street sign": "outdoor", "sky-other": "sky",
               "clouds": "sky", "road": "ground", "fog": "water", "light": "furniture-stuff",
               "hill": "solid", "banner": "textile", "cage": "structural", "cardboard": "rawmaterial",
               "salad": "food-stuff", "pizza": "food-things", "bed": "furniture-things"}  # fmt: skip
    for f, c in by_name.items():
        assert COCOSTUFF_COARSE_NAMES[table[fine[f]]] == c, f


# --------------------------------------------------------------------------------------------
# SegmentationDataset: synthetic
# --------------------------------------------------------------------------------------------


def _make_seg_root(root: Path, labels: dict[str, np.ndarray], size: tuple[int, int] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, lab in labels.items():
        h, w = size or lab.shape
        Image.new("RGB", (w, h), (1, 2, 3)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "labels" / f"{i}.png")
    return root


def test_segmentation_dataset_synthetic_cocostuff(tmp_path: Path) -> None:
    lab = np.array([[0, 1, 181], [182, 255, 156]], np.uint8)
    root = _make_seg_root(tmp_path / "coco", {"002": lab, "001": lab[::-1].copy()})
    ds = SegmentationDataset(root)
    assert ds.ids == ["001", "002"] and ds.num_classes == 182 and ds.ignore_index == -1
    item = ds[1]
    assert set(item) == {"image", "label", "path", "index", "id"}
    assert item["id"] == "002" and item["index"] == 1
    assert item["label"].dtype == torch.int64
    assert item["label"].tolist() == [[0, 1, 181], [-1, -1, 156]]
    coarse = SegmentationDataset(root, coarse=True)
    assert coarse.num_classes == 27 and coarse.class_names == COCOSTUFF_COARSE_NAMES
    assert coarse[1]["label"].tolist() == [[9, 11, 24], [-1, -1, 23]]
    assert len(SegmentationDataset(root, limit=1)) == 1


def test_segmentation_dataset_synthetic_ade_and_errors(tmp_path: Path) -> None:
    lab = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)
    root = _make_seg_root(tmp_path / "ade", {"a": lab})
    ds = SegmentationDataset(root, "ade20k")
    assert ds.num_classes == 150 and ds.class_names == ADE20K_NAMES
    assert ds[0]["label"].tolist() == [[-1, 0, 149], [1, -1, 74]]
    with pytest.raises(ValueError, match="coarse"):
        SegmentationDataset(root, "ade20k", coarse=True)
    with pytest.raises(ValueError, match="dataset"):
        SegmentationDataset(root, "voc")  # type: ignore[arg-type]
    bad = _make_seg_root(tmp_path / "bad", {"a": np.array([[151, 3]], np.uint8)})
    with pytest.raises(ValueError, match="151"):
        SegmentationDataset(bad, "ade20k")[0]
    bad_coco = _make_seg_root(tmp_path / "bad_coco", {"a": np.array([[200, 3]], np.uint8)})
    with pytest.raises(ValueError, match="200"):
        SegmentationDataset(bad_coco)[0]
    mismatch = _make_seg_root(tmp_path / "mm", {"a": np.zeros((4, 4), np.uint8)}, size=(5, 4))
    with pytest.raises(ValueError, match="sizes differ"):
        SegmentationDataset(mismatch)[0]
    Image.new("RGB", (2, 2)).save(root / "images" / "orphan.jpg")
    with pytest.raises(FileNotFoundError, match="orphan"):
        SegmentationDataset(root, "ade20k")
    with pytest.raises(FileNotFoundError, match="images"):
        SegmentationDataset(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# SegmentationDataset: real data
# --------------------------------------------------------------------------------------------


def _raw_label(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        assert im.mode == "L"
        return torch.from_numpy(np.array(im).astype(np.int64))


@needs_coco
def test_real_cocostuff_fine_and_coarse() -> None:
    fine = SegmentationDataset(COCO_DIR, "cocostuff")
    coarse = SegmentationDataset(COCO_DIR, "cocostuff", coarse=True)
    assert len(fine) == len(coarse) == 50 and fine.ids == sorted(fine.ids)
    assert fine.num_classes == 182 and coarse.num_classes == 27
    table = np.asarray(COCOSTUFF_FINE_TO_COARSE)
    seen: set[int] = set()
    for i in range(0, 50, 5):
        f, c = fine[i], coarse[i]
        img = f["image"]
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
        assert f["label"].dtype == torch.int64 and tuple(f["label"].shape) == tuple(img.shape[1:])
        assert f["id"] == c["id"] and f["path"].endswith(f["id"] + ".jpg")
        lab, cl = f["label"].numpy(), c["label"].numpy()
        raw = _raw_label(fine.label_paths[i]).numpy()
        np.testing.assert_array_equal(lab == -1, raw == 255)  # 255 -> -1, nothing else ignored
        np.testing.assert_array_equal(lab[raw != 255], raw[raw != 255])  # fine ids kept
        assert lab.min() >= -1 and lab.max() < 182
        np.testing.assert_array_equal(cl == -1, lab == -1)
        assert cl.min() >= -1 and cl.max() <= 26
        np.testing.assert_array_equal(cl[lab >= 0], table[lab[lab >= 0]])
        seen |= set(np.unique(cl).tolist())
    assert len(seen) > 5


@needs_ade
def test_real_ade20k() -> None:
    ds = SegmentationDataset(ADE_DIR, "ade20k")
    assert len(ds) == 15 and ds.num_classes == 150
    for i in range(len(ds)):
        item = ds[i]
        lab = item["label"]
        assert lab.dtype == torch.int64 and tuple(lab.shape) == tuple(item["image"].shape[1:])
        raw = _raw_label(ds.label_paths[i]).numpy()
        np.testing.assert_array_equal(lab.numpy(), raw - 1)  # 0 -> -1, 1..150 -> 0..149
        assert lab.min() >= -1 and lab.max() <= 149
    limited = SegmentationDataset(ADE_DIR, "ade20k", limit=3)
    assert limited.ids == ds.ids[:3]


@needs_ade
def test_real_data_loader_batches() -> None:
    ds = SegmentationDataset(ADE_DIR, "ade20k", limit=4)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_images)))
    assert len(batch["image"]) == len(batch["label"]) == 4 and batch["errors"] == []
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["id"] == ds.ids
    for img, lab in zip(batch["image"], batch["label"]):
        assert tuple(img.shape[1:]) == tuple(lab.shape)
