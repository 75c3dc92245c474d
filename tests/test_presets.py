"""Presets (clasp_torch.presets): documented values, overrides, paper == CLASP's defaults."""

from __future__ import annotations

import doctest

import pytest
import torch

from clasp_torch import presets
from clasp_torch.pipeline import CLASP
from clasp_torch.presets import PRESETS, build_smoothing, clasp_kwargs, resolve_preset
from clasp_torch.smoothing import FeatureSmoothing
from tests.conftest import PatchMeanBackbone, toy_image

# the values documented in the module docstring and benchmarks/RESULTS.md (chosen by benchmarks.ablate)
DOCUMENTED = {
    "paper": {"n_init": 10, "max_iter": 300, "tol": 1e-4, "smoothing": "none"},
    "best": {"n_init": 10, "max_iter": 300, "tol": 1e-4, "smoothing": "guided", "smoothing_sigma": 1.0,
             "smoothing_eps": 0.001},
    "fast": {"n_init": 1, "max_iter": 5, "tol": 1e-4, "smoothing": "gaussian", "smoothing_sigma": 1.25},
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_presets_resolve_to_documented_values(name: str) -> None:
    assert resolve_preset(name) == DOCUMENTED[name]
    assert list(PRESETS) == list(DOCUMENTED)


def test_overrides_win_and_preset_is_not_modified() -> None:
    s = resolve_preset("best", n_init=3, smoothing_sigma=1.5, beta=0.4, max_iter=None)
    assert s["n_init"] == 3 and s["smoothing_sigma"] == 1.5 and s["beta"] == 0.4
    assert s["max_iter"] == PRESETS["best"]["max_iter"]  # None = not given
    s["tol"] = 1.0
    assert PRESETS["best"] == DOCUMENTED["best"]
    none = resolve_preset("best", smoothing="none")
    assert clasp_kwargs(none)["smoothing"] is None and "smoothing_sigma" not in clasp_kwargs(none)


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="paper, best, fast"):
        resolve_preset("bestest")


def test_paper_equals_clasp_defaults() -> None:
    default = CLASP(PatchMeanBackbone(), refiner=None)
    kw = clasp_kwargs(resolve_preset("paper"))
    assert {k: getattr(default, k) for k in kw} == kw  # n_init, max_iter, tol, smoothing (None)
    imgs = [toy_image(96, 128, 0), toy_image(70, 50, 1)]
    plain = default(imgs)
    paper = CLASP(PatchMeanBackbone(), refiner=None, **kw)(imgs)
    assert torch.equal(plain.labels, paper.labels) and torch.equal(plain.k, paper.k)


def test_build_smoothing() -> None:
    sm = build_smoothing(resolve_preset("best"))
    assert isinstance(sm, FeatureSmoothing) and (sm.kind, sm.sigma, sm.eps) == ("guided", 1.0, 0.001)
    assert sm.needs_guide
    sm = build_smoothing(resolve_preset("fast"))
    assert isinstance(sm, FeatureSmoothing) and (sm.kind, sm.sigma) == ("gaussian", 1.25)
    assert build_smoothing({}) is None
    sm = build_smoothing({"smoothing": "bilateral", "smoothing_sigma": 0.75, "smoothing_sigma_color": 0.2})
    assert isinstance(sm, FeatureSmoothing) and sm.needs_guide and sm.sigma_color == 0.2
    sm = build_smoothing({"smoothing": "guided", "smoothing_sigma": 2.0, "smoothing_eps": 0.1})
    assert isinstance(sm, FeatureSmoothing) and sm.eps == 0.1
    with pytest.raises(ValueError, match="kind"):
        build_smoothing({"smoothing": "median"})


def test_every_preset_builds_a_working_model() -> None:
    for name in PRESETS:
        out = CLASP(PatchMeanBackbone(), refiner=None, **clasp_kwargs(resolve_preset(name)))(toy_image(64, 80, 0))
        assert out.labels.shape == (1, 64, 80) and int(out.k[0]) >= 1


def test_doctests() -> None:
    res = doctest.testmod(presets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
