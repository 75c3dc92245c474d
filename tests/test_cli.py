"""The clasp command line and the Lightning path: outputs, failures, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clasp_torch.cli import main
from tests.conftest import photo as _photo


def _folder(tmp: Path, n: int, bad: bool = True) -> Path:
    d = tmp / "in"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        _photo(i).save(d / ("sub" if i % 5 == 0 else "") / f"img{i:03d}.jpg")
    if bad:
        (d / "broken.jpg").write_bytes(b"this is not a jpeg")
        (d / "empty.png").write_bytes(b"")
    return d


def test_segment_folder_writes_outputs_and_reports_failures(tmp_path: Path, capsys) -> None:
    d = _folder(tmp_path, 5)
    out = tmp_path / "out"
    rc = main(["segment", str(d), "--out", str(out), "--backbone", "efficientnet_lite0", "--no-crf",
               "--device", "cpu", "--batch-size", "2", "--quiet", "--json-stats"])
    assert rc == 1  # two inputs failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "empty.png" in err and "Traceback" not in err
    for i in range(5):
        stem = f"sub/img{i:03d}" if i % 5 == 0 else f"img{i:03d}"
        lab = np.array(Image.open(out / f"{stem}.png"))
        assert lab.shape == (96, 128)
        assert (out / f"{stem}_overlay.jpg").is_file()
        info = json.loads((out / f"{stem}.json").read_text())
        assert lab.max() < info["k"] and sum(s["area"] for s in info["segments"]) == 96 * 128
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] == 5 and report["failed"] == 2
    assert sorted(Path(f["path"]).name for f in report["failures"]) == ["broken.jpg", "empty.png"]


def test_resume_skips_done_and_outputs_are_deterministic(tmp_path: Path) -> None:
    d = _folder(tmp_path, 4, bad=False)
    out = tmp_path / "out"
    args = ["segment", str(d), "--out", str(out), "--backbone", "efficientnet_lite0", "--no-crf",
            "--device", "cpu", "--quiet", "--no-overlay"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.rglob("*.png")}
    (out / "img001.png").unlink()
    assert main(args + ["--resume"]) == 0
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] == 1  # only the missing one was redone
    again = {p.name: p.read_bytes() for p in out.rglob("*.png")}
    assert again == first  # byte-identical


def test_missing_weights_is_one_paragraph(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLASP_WEIGHTS", raising=False)
    d = _folder(tmp_path, 1, bad=False)
    rc = main(["segment", str(d), "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and "--weights" in err and "efficientnet_lite0" in err


def test_missing_input_is_reported(tmp_path: Path, capsys) -> None:
    rc = main(["segment", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o"),
               "--backbone", "efficientnet_lite0", "--device", "cpu", "--quiet"])
    assert rc == 1
    assert "nope.jpg: no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_write_each_image_exactly_once(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(37):  # odd on purpose: the distributed sampler must not pad with duplicates
        _photo(i, 64, 80).save(d / f"im{i:02d}.png")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "clasp_torch.cli", "segment", str(d), "--out", str(out), "--backbone",
           "efficientnet_lite0", "--no-crf", "--device", "cpu", "--devices", "2", "--strategy", "ddp",
           "--batch-size", "3", "--quiet", "--no-overlay"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"im{i:02d}.png" for i in range(37))
    from clasp_torch.lightning import read_logs

    recs = read_logs(out)
    assert len(recs) == 37 and len({r["index"] for r in recs}) == 37  # no duplicates across ranks
    logs = {Path(p).name for p in out.glob(".clasp_log.rank*.jsonl")}
    assert logs == {".clasp_log.rank0.jsonl", ".clasp_log.rank1.jsonl"}


def test_default_batch_size_is_one_on_cpu_and_eight_on_gpu() -> None:
    from clasp_torch.cli import default_batch_size

    assert default_batch_size("cpu") == 1
    assert default_batch_size("cuda") == default_batch_size("cuda:1") == 8
    assert default_batch_size("auto") == (8 if torch.cuda.is_available() else 1)


def test_preset_flag_reaches_the_model_on_every_command() -> None:
    from clasp_torch.cli import build_model, build_parser

    parser = build_parser()
    for argv in (["segment", "x.jpg", "--out", "o"], ["eval", "--dataset", "ade20k", "--root", "r"], ["demo"],
                 ["proposals", "x.jpg", "--out", "p.json"]):
        assert parser.parse_args(argv).preset == "paper"
        assert parser.parse_args(argv + ["--preset", "fast"]).preset == "fast"
    args = parser.parse_args(["segment", "x.jpg", "--out", "o", "--backbone", "efficientnet_lite0", "--preset", "best"])
    model = build_model(args, None)
    assert model.settings.preset == "best" and model.smoothing is not None
    args = parser.parse_args(["proposals", "x.jpg", "--out", "p.json", "--backbone", "efficientnet_lite0",
                              "--preset", "fast"])
    model = build_model(args, None, keep_band_labels=True)  # as cmd_proposals builds it
    assert model.settings.preset == "fast" and model.settings.n_init == 1 and model.smoothing is not None
