"""`clasp eval` end to end on the real dev sets, and the torch CRF inside the pipeline vs pydensecrf."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clasp_torch.cli import main
from tests.conftest import (
    IGNORE_VALUES,
    data_dir,
    load_labelled_pair,
    per_image_matching_scores,
)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cocostuff", "ade20k"])
def test_clasp_eval_reports_the_metric_of_the_model_outputs(dataset: str, tmp_path: Path, capsys) -> None:
    """``clasp eval`` (``trainer.test`` -> ``CLASPPredictor.test_step``) gives, for the patch and
    the pixel variant separately, the per-image-matching mIoU / pixel accuracy computed here
    from ``CLASP``'s own outputs on the same images by an independent numpy + scipy transcription
    of README's protocol: ``coarse_labels`` for the patch variant, ``labels`` for the pixel one
    (so a swap of the two, or a wrong protocol, fails)."""
    from clasp_torch.pipeline import CLASP

    root = data_dir(f"{dataset}-val-dev")
    out = tmp_path / "res.json"
    rc = main(["eval", "--dataset", dataset, "--root", str(root), "--backbone", "efficientnet_lite0",
               "--device", "cpu", "--limit", "3", "--quiet", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert res["images"] == 3
    assert res["preset"] == "paper" and res["settings"]["n_init"] == 10 and res["settings"]["smoothing"] == "none"

    torch.manual_seed(0)
    model = CLASP("efficientnet_lite0").eval()  # what `clasp eval` builds with its defaults
    stems = sorted(p.stem for p in (root / "images").glob("*.jpg"))[:3]
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"patch": [], "pixel": []}
    ks = []
    for stem in stems:
        img, gt = load_labelled_pair(root, stem)
        H, W = gt.shape
        with torch.no_grad():
            o = model(img)
        pairs["patch"].append((o.coarse_labels[0, :H, :W].numpy(), gt))
        pairs["pixel"].append((o.labels[0, :H, :W].numpy(), gt))
        ks.append(int(o.k[0]))
    want = {v: per_image_matching_scores(p, IGNORE_VALUES[dataset]) for v, p in pairs.items()}
    print(dataset, {v: (round(m, 3), round(a, 3)) for v, (m, a) in want.items()}, "K", ks)
    assert want["patch"] != pytest.approx(want["pixel"], abs=0.05)  # the two variants are told apart
    for variant, row in (("patch", "patch"), ("pixel", "pixel (CRF)")):
        miou, acc = want[variant]
        assert res[variant]["miou"] == pytest.approx(miou, abs=1e-4)
        assert res[variant]["pixel_accuracy"] == pytest.approx(acc, abs=1e-4)
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"{row:<12} "))
        assert line.split()[-4:-2] == [f"{miou:.1f}", f"{acc:.1f}"], line
    assert res["mean_k"] == pytest.approx(float(np.mean(ks)))
    assert "settings (preset 'paper'): preset=paper, n_init=10, max_iter=300" in printed


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cocostuff", "ade20k"])
def test_torch_crf_matches_pydensecrf_in_the_pipeline(dataset: str) -> None:
    """Issue 3: the torch CRF gives pydensecrf's pixel labels inside the pipeline (measured: 100 %
    of the pixels on every image), hence the same pixel-variant mIoU and pixel accuracy."""
    from benchmarks.compare_crf_pipeline import compare

    root = data_dir(f"{dataset}-val-dev")
    r = compare(str(root), dataset, limit=3, progress=False)
    assert r["label_agreement_min"] >= 0.999
    assert r["torch_crf"]["miou"] == pytest.approx(r["pydensecrf"]["miou"], abs=0.05)
    assert r["torch_crf"]["pixel_accuracy"] == pytest.approx(r["pydensecrf"]["pixel_accuracy"], abs=0.05)
