"""Real-world inputs end to end (issue 6): every kind of file, every bad input reported, resume.

A folder with one file of every kind (grayscale, palette, RGBA/LA, CMYK JPEG, 16-bit PNG,
EXIF-rotated JPEG, animated GIF, WebP, TIFF, a uniform image, a huge image) plus bad inputs
(smaller than one patch, truncated, corrupt, empty, not an image) is generated in ``tmp_path``
and segmented through the CLI (in process) and through ``trainer.predict`` directly.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch  # noqa: F401  - imported here so its log handler binds the session's stderr, not capsys's
import numpy as np
import pytest
import torch
from PIL import Image

from clasp_torch.cli import main

BACKBONE = ["--backbone", "efficientnet_lite0", "--device", "cpu"]


def _photo(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A blocky 'photo': four coloured regions plus noise, ``(h, w, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    cols = rng.uniform(0, 255, (4, 3))
    yy, xx = np.mgrid[:h, :w]
    region = (yy > h * rng.uniform(0.3, 0.7)).astype(int) * 2 + (xx > w * rng.uniform(0.3, 0.7)).astype(int)
    img = cols[region] + rng.normal(0, 8, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# name -> expected (H, W) of the label map (after EXIF orientation)
GOOD: dict[str, tuple[int, int]] = {
    "rgb.jpg": (96, 128),
    "gray.png": (96, 128),
    "palette.png": (96, 128),
    "palette_transparent.gif": (96, 128),
    "rgba.png": (96, 128),
    "la.png": (96, 128),
    "cmyk.jpg": (96, 128),
    "sixteen_bit.png": (96, 128),
    "exif_rotated.jpg": (128, 96),  # stored 96x128 with orientation 6 (rotate 90 degrees)
    "animated.gif": (96, 128),
    "photo.webp": (96, 128),
    "photo2.tiff": (96, 128),  # not photo.tiff: beside photo.webp that is one output name (refused)
    "uniform.png": (80, 112),
    "bmp.bmp": (64, 64),
}
HUGE = ("huge.jpg", (3000, 4000))
# name -> a piece of the expected reason
BAD: dict[str, str] = {
    "tiny.png": "smaller than one 16x16 patch",
    "truncated.jpg": "truncated",
    "corrupt.png": "corrupt",
    "empty.jpg": "empty file",
    "not_an_image.jpg": "not an image",
}


def build_folder(root: Path, huge: bool = True) -> Path:
    d = root / "in"
    d.mkdir(parents=True)
    base = _photo(0)
    Image.fromarray(base).save(d / "rgb.jpg", quality=90)
    Image.fromarray(base).convert("L").save(d / "gray.png")
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png")
    pal = Image.fromarray(_photo(1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.save(d / "palette_transparent.gif", transparency=0)
    rgba = np.dstack([_photo(2), np.linspace(0, 255, 96 * 128).reshape(96, 128).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(_photo(3)).convert("LA").save(d / "la.png")
    Image.fromarray(_photo(4)).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    sixteen = (_photo(5)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(d / "sixteen_bit.png")
    assert Image.open(d / "sixteen_bit.png").mode.startswith("I")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(6)).save(d / "exif_rotated.jpg", exif=exif, quality=90)
    frames = [Image.fromarray(_photo(7)), Image.fromarray(_photo(8))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(_photo(9)).save(d / "photo.webp", quality=90)
    Image.fromarray(_photo(10)).save(d / "photo2.tiff")
    Image.new("RGB", (112, 80), (40, 120, 200)).save(d / "uniform.png")
    Image.fromarray(_photo(11, 64, 64)).save(d / "bmp.bmp")
    if huge:
        Image.fromarray(_photo(12, 3000, 4000)).save(d / HUGE[0], quality=80)
    # bad inputs
    Image.fromarray(_photo(13, 10, 10)).save(d / "tiny.png")
    (d / "truncated.jpg").write_bytes(_jpeg_bytes(_photo(14))[:1500])
    png = io.BytesIO()
    Image.fromarray(_photo(15)).save(png, format="PNG")
    raw = bytearray(png.getvalue())
    raw[200:400] = bytes(200)  # wipe part of the IDAT stream (CRC now wrong)
    (d / "corrupt.png").write_bytes(bytes(raw))
    (d / "empty.jpg").write_bytes(b"")
    (d / "not_an_image.jpg").write_text("hello, I am a text file\n" * 20)
    (d / "directory.jpg").mkdir()  # not a file: ignored when scanning a folder
    return d


def _check_outputs(out: Path, good: dict[str, tuple[int, int]], stats: bool = True) -> None:
    for name, (H, W) in good.items():
        stem = Path(name).stem
        lab = np.array(Image.open(out / f"{stem}.png"))
        assert lab.shape == (H, W), name
        if stats:
            info = json.loads((out / f"{stem}.json").read_text())
            assert lab.max() < info["k"], name
            assert sum(s["area"] for s in info["segments"]) == H * W
            if name == "uniform.png":
                assert info["k"] == 1 and info["k_opt"] == 1 and lab.max() == 0
            else:
                assert info["k"] >= 2, name
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"


def _check_failures(failures: list[dict], bad: dict[str, str]) -> None:
    got = {Path(f["path"]).name: f["error"] for f in failures}
    assert set(got) == set(bad), got
    for name, reason in bad.items():
        assert reason in got[name], (name, got[name])
        assert "\n" not in got[name]


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_every_kind_of_input(tmp_path: Path, capsys) -> None:
    d = build_folder(tmp_path)
    out = tmp_path / "out"
    rc = main(["segment", str(d), "--out", str(out), *BACKBONE, "--no-crf", "--batch-size", "3",
               "--json-stats", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1  # some inputs failed
    assert "Traceback" not in err
    good = dict(GOOD, **{HUGE[0]: HUGE[1]})
    _check_outputs(out, good)
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] == len(good) and report["failed"] == len(BAD)
    assert report["inputs"] == len(good) + len(BAD) and not report["interrupted"]
    _check_failures(report["failures"], BAD)
    for name, reason in BAD.items():
        # reported as it happened (one line each) and again in the summary
        lines = [ln for ln in err.splitlines() if name in ln]
        assert any(ln.startswith("failed ") and reason in ln for ln in lines), (name, err)
        assert any(ln.startswith("  ") for ln in lines)


@pytest.mark.slow
def test_cli_with_crf_on_a_few_inputs(tmp_path: Path, capsys) -> None:
    d = build_folder(tmp_path, huge=False)
    out = tmp_path / "out"
    inputs = [str(d / n) for n in ("uniform.png", "exif_rotated.jpg", "rgba.png", "tiny.png", "empty.jpg")]
    rc = main(["segment", *inputs, "--out", str(out), *BACKBONE, "--batch-size", "2", "--json-stats", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    _check_outputs(out, {n: GOOD[n] for n in ("uniform.png", "exif_rotated.jpg", "rgba.png")})
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["crf"] and report["ok"] == 3
    _check_failures(report["failures"], {k: BAD[k] for k in ("tiny.png", "empty.jpg")})


def test_cli_all_good_exit_code_zero_and_unreadable_inputs(tmp_path: Path, capsys) -> None:
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_photo(0, 64, 80)).save(d / "a.png")
    (d / "folder.jpg").mkdir()  # a directory with an image name, passed explicitly
    out = tmp_path / "out"
    assert main(["segment", str(d / "a.png"), "--out", str(out), *BACKBONE, "--no-crf", "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["segment", str(d / "a.png"), str(d / "folder.jpg"), "--out", str(tmp_path / "o2"), *BACKBONE,
               "--no-crf", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "folder.jpg: no image files" in err and "Traceback" not in err
    assert (tmp_path / "o2" / "a.png").is_file()


def test_cli_permission_denied(tmp_path: Path, capsys) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading a file")
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_photo(0, 64, 80)).save(d / "a.png")
    Image.fromarray(_photo(1, 64, 80)).save(d / "locked.png")
    os.chmod(d / "locked.png", 0)
    try:
        rc = main(["segment", str(d), "--out", str(tmp_path / "out"), *BACKBONE, "--no-crf", "--quiet"])
    finally:
        os.chmod(d / "locked.png", 0o644)
    err = capsys.readouterr().err
    assert rc == 1 and "locked.png: permission denied" in err
    assert (tmp_path / "out" / "a.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "tpu"], "--device must be"),
        (["--device", "cuda:0"], "no CUDA GPU"),
        (["--strategy", "no_such_strategy"], "--strategy"),
        (["--weights", "/no/such/weights.pth"], "weights"),
    ],
)
def test_cli_user_errors_are_one_paragraph(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    if "cuda:0" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_photo(0, 64, 80)).save(d / "a.png")
    rc = main(["segment", str(d), "--out", str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
               "--device", "cpu", "--no-crf", "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_cli_output_folder_not_writable(tmp_path: Path, capsys) -> None:
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_photo(0, 64, 80)).save(d / "a.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["segment", str(d), "--out", str(blocker / "out"), *BACKBONE, "--no-crf", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write to the output folder" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [["--fixed-k", "1"], ["--batch-size", "0"], ["--num-workers", "-1"],
                                 ["--max-patches", "2"], ["--devices", "0"]])
def test_cli_bad_numbers_are_usage_errors(tmp_path: Path, capsys, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), *BACKBONE, *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


# --------------------------------------------------------------------------------- Lightning
@pytest.mark.slow
def test_lightning_predict_every_kind_of_input(tmp_path: Path, capsys) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from clasp_torch.data import ImageFolder, collate_images
    from clasp_torch.lightning import CLASPPredictor, SegmentationWriter, read_logs
    from clasp_torch.pipeline import CLASP

    d = build_folder(tmp_path)
    out = tmp_path / "out"
    ds = ImageFolder(d, on_error="return")
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_images)
    writer = SegmentationWriter(out, root=str(d), stats_json=True)
    model = CLASP("efficientnet_lite0", refiner=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(CLASPPredictor(model), loader, return_predictions=False)
    err = capsys.readouterr().err
    good = dict(GOOD, **{HUGE[0]: HUGE[1]})
    _check_outputs(out, good)
    recs = read_logs(out)
    assert len(recs) == len(good) + len(BAD) and len({r["index"] for r in recs}) == len(recs)
    _check_failures([r for r in recs if not r["ok"]], BAD)
    assert writer.n_ok == len(good) and len(writer.failures) == len(BAD)
    for name, reason in BAD.items():
        assert any(ln.startswith("failed ") and name in ln and reason in ln for ln in err.splitlines()), err


class _NaNOnRed(torch.nn.Module):
    """Patch-mean features; NaN for mostly red images (a broken backbone on some inputs)."""

    patch_size = 8
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.nn.functional.avg_pool2d(x, 8)
        f = torch.cat([m, m**2 + 0.05], 1).permute(0, 2, 3, 1).clone()
        red = (x[:, 0].mean((1, 2)) > 0.9) & (x[:, 1:].mean((1, 2, 3)) < 0.1)
        f[red] = float("nan")
        return f


def test_lightning_nan_features_fail_only_their_image(tmp_path: Path, capsys) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from clasp_torch.data import collate_images
    from clasp_torch.lightning import CLASPPredictor, SegmentationWriter, read_logs
    from clasp_torch.pipeline import CLASP

    imgs = [torch.from_numpy(_photo(i, 64, 80)).permute(2, 0, 1).contiguous() for i in range(3)]
    red = torch.zeros(3, 64, 80, dtype=torch.uint8)
    red[0] = 255
    imgs.insert(1, red)
    items = [{"image": im, "path": f"im{i}.png", "index": i} for i, im in enumerate(imgs)]
    loader = DataLoader(items, batch_size=4, collate_fn=collate_images)
    out = tmp_path / "out"
    writer = SegmentationWriter(out, overlays=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(CLASPPredictor(CLASP(_NaNOnRed(), refiner=None)), loader, return_predictions=False)
    recs = {r["path"]: r for r in read_logs(out)}
    assert not recs["im1.png"]["ok"] and "NaN" in recs["im1.png"]["error"]
    assert all(recs[f"im{i}.png"]["ok"] for i in (0, 2, 3))
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im2.png", "im3.png"]
    assert "failed im1.png: ValueError: features contain NaN" in capsys.readouterr().err


# ------------------------------------------------------------------------------ kill + resume
def test_sigint_then_resume_gives_one_valid_output_per_input(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    sizes = {}
    for i in range(12):
        h, w = (240, 320) if i % 2 else (320, 240)
        Image.fromarray(_photo(100 + i, h, w)).save(d / f"im{i:02d}.png")
        sizes[f"im{i:02d}"] = (h, w)
    (d / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clasp_torch.cli", "segment", str(d), "--out", str(out), *BACKBONE,
           "--no-crf", "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(not p.name.startswith(".") for p in out.glob("*.png")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err[-3000:]
    done = sorted(p.stem for p in out.glob("*.png") if not p.name.startswith("."))
    assert 1 <= len(done) < 12, done
    report = json.loads((out / "clasp_report.json").read_text())
    # the label map is renamed into place just before the batch's log line: allow that window
    assert report["interrupted"] and len(done) - 1 <= report["ok"] <= len(done)
    for stem in done:  # whatever was written is complete
        assert np.array(Image.open(out / f"{stem}.png")).shape == sizes[stem]
        Image.open(out / f"{stem}_overlay.jpg").load()

    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]  # the broken file fails again
    assert f"{len(done)} of 13 file inputs already have outputs" in res.stderr
    assert "zz_broken.jpg" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["skipped_existing"] == len(done)
    assert report["ok"] == 12 - len(done) and report["failed"] == 1 and not report["interrupted"]
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs == sorted(sizes)  # exactly one label map per good input
    for stem, hw in sizes.items():
        assert np.array(Image.open(out / f"{stem}.png")).shape == hw
        Image.open(out / f"{stem}_overlay.jpg").load()
    assert not list(out.rglob("*.tmp"))
