"""The stage Modules CLASP composes: each equals its functional core, and CLASP equals the stages
called one after another (on every ``--device`` / ``--dtype``)."""

from __future__ import annotations

import pytest
import torch

from clasp_torch.cluster import KBandClustering, select_k
from clasp_torch.crf import crf_refine_labels
from clasp_torch.crf_resolution import CRFRefiner, crf_refine_labels_bounded
from clasp_torch.embedding import SpectralEmbedding, spectral_embedding
from clasp_torch.pipeline import CLASP
from clasp_torch.settings import CLASPSettings
from tests.conftest import PatchMeanBackbone, toy_image


def _features(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Three ragged images of points around 3-5 directions: ``(B, N, D)`` features, ``(B, N)`` mask."""
    g = torch.Generator().manual_seed(7)
    B, N, D = 3, 90, 6
    dirs = torch.randn(B, 5, D, generator=g)
    pick = torch.randint(0, 5, (B, N), generator=g)
    f = dirs.gather(1, pick.unsqueeze(-1).expand(B, N, D)) + 0.15 * torch.randn(B, N, D, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 60:] = False
    f = f * mask.unsqueeze(-1)
    return f.to(device=device, dtype=dtype), mask.to(device)


def test_spectral_embedding_module_equals_functional(device: torch.device, dtype: torch.dtype) -> None:
    f, m = _features(device, dtype)
    single = torch.tensor([False, False, True], device=device)
    for kw in ({}, {"fixed_k": 4}, {"k_selector": "entropy", "beta": 0.3}):
        ref = spectral_embedding(f, m, single_segment=single, **kw)  # type: ignore[arg-type]
        out = SpectralEmbedding(**kw)(f, m, single_segment=single)  # type: ignore[arg-type]
        for name in ("k_opt", "k_lo", "k_hi", "single"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (kw, name)
        assert torch.equal(out.spectral.eigenvalues, ref.spectral.eigenvalues)
        # the flagged image is one segment: empty band, k_opt 1
        assert int(out.k_opt[2]) == 1 and int(out.k_hi[2]) < int(out.k_lo[2])


def test_kband_clustering_module_equals_select_k(device: torch.device, dtype: torch.dtype) -> None:
    f, m = _features(device, dtype)
    emb = spectral_embedding(f, m)
    ref = select_k(emb.spectral.eigenvectors, m, emb.k_lo, emb.k_hi, n_init=3, seed=2, keep_band=True)
    out = KBandClustering(n_init=3, seed=2, keep_band=True)(emb.spectral, emb.k_lo, emb.k_hi)
    assert torch.equal(out.labels, ref.labels) and torch.equal(out.k, ref.k)
    assert torch.equal(out.scores.nan_to_num(-9), ref.scores.nan_to_num(-9))
    assert out.band_labels is not None and ref.band_labels is not None
    assert torch.equal(out.band_labels, ref.band_labels)


def test_crf_refiner_module_equals_functional(device: torch.device) -> None:
    imgs = torch.stack([toy_image(40, 56, 0), toy_image(40, 56, 1)]).to(device)
    lab = (torch.arange(40 * 56, device=device).view(1, 40, 56) // 300 % 3).expand(2, 40, 56).contiguous()
    mask = torch.ones(2, 40, 56, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    mask[1, :, 44:] = False
    n = torch.tensor([3, 2], device=device)
    lab = torch.where(torch.arange(2, device=device).view(2, 1, 1) == 1, lab.clamp(max=1), lab)
    got = CRFRefiner(n_iter=5)(imgs, lab, n, mask)
    ref = crf_refine_labels_bounded(imgs, lab, n, 0.8, mask, n_iter=5)
    assert torch.equal(got, ref)
    # every image at most max_pixels: the plain dense CRF with each image's labels valid
    lm = torch.arange(3, device=device).view(1, 3) < n.view(2, 1)
    assert torch.equal(got, crf_refine_labels(imgs, lab, 3, 0.8, mask=mask, label_mask=lm, n_iter=5))


def test_crf_params_reject_dense_crf_only_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="n_labels"):
        CLASP(PatchMeanBackbone(), crf_params={"n_labels": 4})
    with pytest.raises(ValueError, match="unknown argument.*'sxy'.*accepted: n_iter"):
        CLASP(PatchMeanBackbone(), crf_params={"sxy": 4})
    m = CLASP(PatchMeanBackbone(), crf_params={"n_iter": 3, "gt_prob": 0.7, "upsample": "nearest"})
    assert isinstance(m.refiner, CRFRefiner) and m.refiner.gt_prob == 0.7 and m.refiner.params == {"n_iter": 3}


def test_clasp_equals_its_stages_called_in_turn(device: torch.device) -> None:
    model = CLASP(PatchMeanBackbone(), refiner=None, n_init=2).to(device)
    imgs = [toy_image(64, 80, 3).to(device), toy_image(48, 64, 4).to(device)]
    out = model(imgs)
    feats, pmask, _ = model.extract_features(imgs)
    B, h, w, D = feats.shape
    flat = pmask.reshape(B, h * w)
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)
    f = feats.reshape(B, h * w, D).gather(1, order.unsqueeze(-1).expand(B, h * w, D))
    emb = spectral_embedding(f, flat.gather(1, order))
    sel = select_k(emb.spectral.eigenvectors, emb.spectral.mask, emb.k_lo, emb.k_hi, n_init=2)
    lab = torch.full((B, h * w), -1, dtype=torch.long, device=device).scatter_(1, order, sel.labels)
    assert torch.equal(out.patch_labels, lab.view(B, h, w))
    assert torch.equal(out.k, sel.k) and torch.equal(out.k_opt, emb.k_opt)


def test_settings_are_validated_once_and_exposed() -> None:
    m = CLASP(PatchMeanBackbone(), refiner=None, n_init=3, beta=0.4)
    assert m.settings == CLASPSettings(n_init=3, beta=0.4)
    assert m.n_init == 3 and m.clustering.n_init == 3 and m.embedding.beta == 0.4
    with pytest.raises(AttributeError):
        m.n_init = 4  # baked into a stage: build a new model
    m.max_patches = 100  # read at every forward: replaceable, validated
    assert m.settings.max_patches == 100
    with pytest.raises(ValueError, match="max_patches"):
        m.max_patches = 2
    for bad, match in (({"n_init": 0}, "n_init"), ({"tol": -1.0}, "tol"), ({"k_selector": "x"}, "k_selector"),
                       ({"smoothing": "median"}, "smoothing"), ({"beta": 1.0}, "beta")):
        with pytest.raises(ValueError, match=match):
            CLASPSettings(**bad)  # type: ignore[arg-type]


def test_clasp_presets_resolve_and_keywords_override() -> None:
    from clasp_torch.presets import PRESETS
    from clasp_torch.smoothing import FeatureSmoothing

    paper = CLASP(PatchMeanBackbone(), refiner=None)
    assert paper.settings == CLASPSettings() and paper.smoothing is None  # the default changes nothing
    for name, values in PRESETS.items():
        m = CLASP(PatchMeanBackbone(), refiner=None, preset=name)
        assert m.settings.preset == name
        for key in ("n_init", "max_iter", "tol"):
            assert getattr(m.settings, key) == values[key] == getattr(m.clustering, key), (name, key)
        kind = values.get("smoothing", "none")
        assert (m.smoothing is None) == (kind == "none")
        if kind != "none":
            assert isinstance(m.smoothing, FeatureSmoothing) and m.smoothing.kind == kind
    over = CLASP(PatchMeanBackbone(), refiner=None, preset="best", n_init=2, smoothing="none")
    assert over.settings.n_init == 2 and over.clustering.n_init == 2 and over.smoothing is None
    sig = CLASP(PatchMeanBackbone(), refiner=None, preset="paper", smoothing="gaussian", smoothing_sigma=0.5)
    assert isinstance(sig.smoothing, FeatureSmoothing) and sig.smoothing.sigma == 0.5
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        CLASP(PatchMeanBackbone(), preset="nope")
