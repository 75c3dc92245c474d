"""`clasp eval` end to end on the real dev sets, and the torch CRF inside the pipeline vs pydensecrf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clasp_torch.cli import main
from tests.conftest import data_dir


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cocostuff", "ade20k"])
def test_clasp_eval_runs_end_to_end(dataset: str, tmp_path: Path, capsys) -> None:
    root = data_dir(f"{dataset}-val-dev")
    out = tmp_path / "res.json"
    rc = main(["eval", "--dataset", dataset, "--root", str(root), "--backbone", "efficientnet_lite0",
               "--device", "cpu", "--limit", "3", "--quiet", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["images"] == 3
    for variant in ("patch", "pixel"):
        assert 0 < res[variant]["miou"] <= 100 and 0 < res[variant]["pixel_accuracy"] <= 100
    assert res["mean_k"] >= 2
    printed = capsys.readouterr().out
    assert "pixel (CRF)" in printed and "patch" in printed


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cocostuff", "ade20k"])
def test_torch_crf_matches_pydensecrf_in_the_pipeline(dataset: str) -> None:
    """Issue 3: pixel-variant mIoU with the torch CRF within 1 point of pydensecrf's."""
    from benchmarks.compare_crf_pipeline import compare

    root = data_dir(f"{dataset}-val-dev")
    r = compare(str(root), dataset, limit=3, progress=False)
    assert r["label_agreement_min"] >= 0.95
    assert abs(r["torch_crf"]["miou"] - r["pydensecrf"]["miou"]) <= 1.0
    assert abs(r["torch_crf"]["pixel_accuracy"] - r["pydensecrf"]["pixel_accuracy"]) <= 1.0
