"""User errors never cost data or a traceback: naming rule, --out inside the inputs, unsafe names,
bad weights files, float images in 0..255, half precision, a quiet terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clasp_torch.cli import main
from clasp_torch.inputs import OutputFolder, check_member_name, plan_inputs, safe_output_path
from tests.conftest import photo

SEG = ["--backbone", "efficientnet_lite0", "--no-crf", "--device", "cpu", "--quiet", "--no-overlay",
       "--num-workers", "0"]


def _labels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


# ------------------------------------------------------------------ the naming rule
def test_two_folders_with_equal_file_names_give_two_outputs(tmp_path: Path) -> None:
    for i, month in enumerate(("2024-01", "2024-02")):
        (tmp_path / month).mkdir()
        photo(i).save(tmp_path / month / "x.jpg")
    out = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "2024-01"), str(tmp_path / "2024-02"), "--out", str(out), *SEG]) == 0
    a, b = _labels(out / "2024-01" / "x.png"), _labels(out / "2024-02" / "x.png")
    assert a.shape == b.shape == (96, 128)
    assert not np.array_equal(a, b) or not np.array_equal(np.array(photo(0)), np.array(photo(1)))
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] == 2
    # --resume uses the same names: nothing left to do
    assert main(["segment", str(tmp_path / "2024-01"), str(tmp_path / "2024-02"), "--out", str(out), *SEG,
                 "--resume"]) == 0
    assert json.loads((out / "clasp_report.json").read_text())["skipped_existing"] == 2


def test_two_equal_stems_given_as_files_give_two_outputs(tmp_path: Path) -> None:
    for i, d in enumerate("ab"):
        (tmp_path / d).mkdir()
        photo(i).save(tmp_path / d / "x.jpg")
    out = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "a/x.jpg"), str(tmp_path / "b/x.jpg"), "--out", str(out), *SEG]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/x.png", "b/x.png"]


def test_single_folder_keeps_names_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("p.jpg", "sub/q.png"):
        photo(0).save(tmp_path / "photos" / name)
    plan = plan_inputs([str(tmp_path / "photos")])
    assert sorted(f.name for f in plan.files) == ["p", "sub/q"]
    assert [f.name for f in plan_inputs([str(tmp_path / "photos" / "p.jpg")]).files] == ["p"]


def test_collision_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    d = tmp_path / "in"
    d.mkdir()
    photo(0).save(d / "x.jpg")
    photo(1).save(d / "x.png")
    photo(2).save(d / "y.jpg")
    out = tmp_path / "seg"
    assert main(["segment", str(d), "--out", str(out), *SEG]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("  x:")]
    assert len(lines) == 1 and "x.jpg" in lines[0] and "x.png" in lines[0]
    assert not out.exists() or not list(out.rglob("*.png"))  # nothing was done


# ------------------------------------------------------------------ --out inside the inputs
@pytest.mark.parametrize("resume", [False, True])
def test_out_inside_the_input_folder_is_never_read(tmp_path: Path, resume: bool) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        photo(i).save(photos / f"p{i}.jpg")
    out = photos / "seg"
    args = ["segment", str(photos), "--out", str(out), "--backbone", "efficientnet_lite0", "--no-crf",
            "--device", "cpu", "--quiet", "--num-workers", "0"]  # overlays on: they must not come back as inputs
    assert main(args) == 0
    assert json.loads((out / "clasp_report.json").read_text())["ok"] == 3
    assert main(args + (["--resume"] if resume else [])) == 0
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] + report["skipped_existing"] == 3 and report["failed"] == 0
    assert report["ok"] == (0 if resume else 3)
    assert not (out / "seg").exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p1.png", "p2.png"]
    assert not list(out.rglob("*_overlay_overlay.jpg"))


# ------------------------------------------------------------------ untrusted names
def test_check_member_name_rejects_unsafe_names() -> None:
    for bad in ("../evil.jpg", "/abs/evil.jpg", "a/../../x", "a\x00b", "new\nline", "C:\\x.jpg", ""):
        assert check_member_name(bad) is not None, bad
    for good in ("ok.jpg", "a/b/c.jpg", "dots.in.name.jpg", "..hidden"):
        assert check_member_name(good) is None, good
    with pytest.raises(ValueError):
        safe_output_path("/tmp/out", "../x", ".png")


def test_output_folder_checks_as_safe_output_path(tmp_path: Path) -> None:
    """OutputFolder (the writer's cached check) accepts and rejects exactly what safe_output_path
    does, and gives the same paths."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    outside.mkdir()
    (out / "link_dir").symlink_to(outside)  # a sub-folder that leads out
    (out / "inner_link").symlink_to(out / "sub")  # one that stays inside
    (out / "sub" / "leaf.png").symlink_to(outside / "x.png")  # a target that is itself a link out
    folder = OutputFolder(out)
    names = ["a", "sub/b", "new/deeper/c", "inner_link/d", "link_dir/e", "sub/leaf", "../x", "/abs",
             "a\x00b", "", "dots.in.name", "sub/../../x", "new/../../x", "tab\tname"]
    outcomes = []
    for name in names * 2:  # the second pass uses the cache
        try:
            want: str | None = str(safe_output_path(out, name, ".png"))
        except ValueError:
            want = None
        try:
            got: str | None = folder.path(name, ".png")
        except ValueError:
            got = None
        assert got == want, name
        outcomes.append(got is not None)
    assert outcomes[: len(names)] == [True, True, True, True, False, False, False, False,
                                      False, False, True, False, False, False]
    assert folder.path("sub/b", ".png") == os.path.join(os.path.realpath(out), "sub", "b.png")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    photo(seed).save(buf, "JPEG")
    return buf.getvalue()


def test_tar_shard_with_unsafe_member_names_writes_nothing_outside_out(tmp_path: Path) -> None:
    shard = tmp_path / "work" / "shard.tar"
    shard.parent.mkdir()
    _tar(shard, {"../evil.jpg": _jpeg(0), "/abs/evil.jpg": _jpeg(1), "ok.jpg": _jpeg(2)})
    out = tmp_path / "work" / "out"
    before = {p for p in tmp_path.rglob("*")}
    rc = main(["segment", str(shard), "--out", str(out), *SEG])
    assert rc == 1  # two per-input failures
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in created), created
    assert (out / "shard" / "ok.png").is_file()
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] == 1 and report["failed"] == 2
    assert all("unsafe name" in f["error"] for f in report["failures"])
    assert not list(tmp_path.rglob("evil*.png"))


def test_list_file_with_parent_and_absolute_paths_writes_nothing_outside_out(tmp_path: Path) -> None:
    (tmp_path / "a" / "lists").mkdir(parents=True)
    photo(0).save(tmp_path / "evil.jpg")
    photo(1).save(tmp_path / "a" / "ok.jpg")
    lst = tmp_path / "a" / "lists" / "inputs.txt"
    lst.write_text(f"# inputs\n\n../../evil.jpg\n{tmp_path / 'a' / 'ok.jpg'}\nmissing.jpg\n")
    out = tmp_path / "a" / "out"
    before = {p for p in tmp_path.rglob("*")}
    rc = main(["segment", f"@{lst}", "--out", str(out), *SEG])
    assert rc == 1  # missing.jpg
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in created), created
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/ok.png", "evil.png"]


# ------------------------------------------------------------------ bad weights files
def _garbage(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04" + os.urandom(256))  # a truncated download
    return path


def _wrong_keys(path: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    return path


@pytest.mark.parametrize("make", [_garbage, _wrong_keys])
@pytest.mark.parametrize("backbone", ["dinov2_vits14_reg", "efficientnet_lite0"])
def test_bad_weights_file_is_exit_2_without_traceback(tmp_path: Path, capsys, make, backbone: str) -> None:
    w = make(tmp_path / "w.pth")
    photo(0).save(tmp_path / "p.jpg")
    rc = main(["segment", str(tmp_path / "p.jpg"), "--out", str(tmp_path / "o"), "--weights", str(w),
               "--backbone", backbone, "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and str(w) in err and "Remedies" in err
    assert len(err.strip().splitlines()) == 1


def test_other_vit_size_raises_invalid_weights_error(tmp_path: Path) -> None:
    import timm

    from clasp_torch.backbones import InvalidWeightsError, WeightsUnavailableError, get_backbone

    base = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518,
                             depth=1)  # ViT-B shapes (768 wide), one block to stay small
    torch.save(base.state_dict(), tmp_path / "vitb.pth")
    with pytest.raises(InvalidWeightsError) as info:
        get_backbone("dinov2_vits14_reg", weights=tmp_path / "vitb.pth")
    assert isinstance(info.value, WeightsUnavailableError)
    assert "vitb.pth" in str(info.value) and "other shapes" in str(info.value)


# ------------------------------------------------------------------ the Python API's inputs
class _Conv(nn.Module):
    patch_size = 8
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1)


def test_float_images_in_0_255_raise_a_value_error() -> None:
    from clasp_torch import CLASP

    model = CLASP(_Conv(), refiner=None, n_init=2)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divide by 255|Divide by 255"):
        model(x * 255)
    with pytest.raises(ValueError, match="Divide by 255"):
        model([x[0], x[1] * 255])
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.full((1, 3, 48, 64), float("nan")))
    model((x * (1 + 5e-4)).clamp_max(1 + 5e-4))  # rounding above 1 within the tolerance is fine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_and_keeps_float32_stages(dtype: torch.dtype) -> None:
    from clasp_torch import CLASP

    x = (torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    ref = CLASP(_Conv(), refiner=None, n_init=2)(x)
    model = CLASP(_Conv(), refiner=None, n_init=2).to(dtype)
    assert next(model.backbone.parameters()).dtype == dtype
    out = model(x)
    assert out.features.dtype == torch.float32 and out.eigenvalues.dtype in (torch.float32, torch.float64)
    assert out.labels.shape == ref.labels.shape == (2, 48, 64)
    # the half backbone computes the same features up to its precision
    assert torch.allclose(out.features, ref.features, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------ a quiet terminal
def test_normal_run_stderr_has_no_tips_and_no_deprecation_lines(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        photo(i).save(d / f"p{i}.jpg")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    cmd = [sys.executable, "-m", "clasp_torch.cli", "segment", str(d), "--out", str(tmp_path / "o"),
           "--backbone", "efficientnet_lite0", "--no-crf", "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    err = res.stderr
    assert "Tip" not in err and "litlogger" not in err
    assert "deprecated" not in err.lower() and "Warning" not in err
    assert "GPU available" not in err
    assert "segmented 2 image(s)" in err  # our own summary still shows


def test_quiet_filter_lets_other_warnings_through() -> None:
    import warnings

    from clasp_torch.cli import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party():
            warnings.warn("our own warning", UserWarning)
            warnings.warn_explicit("dep", DeprecationWarning, "x.py", 1, module="lightning.pytorch.x")
            warnings.warn_explicit("dep", DeprecationWarning, "y.py", 1, module="mypkg")
    msgs = [(str(w.message), w.category) for w in caught]
    assert ("our own warning", UserWarning) in msgs
    assert ("dep", DeprecationWarning) in msgs and len(msgs) == 2  # lightning's one hidden, mypkg's kept
