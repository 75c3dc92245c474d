"""Feature smoothing (clasp_torch.smoothing): against slow per-image references written with
scipy.ndimage / numpy, ragged batches equal single images, gradients, and inside CLASP."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from clasp_torch import smoothing
from clasp_torch.pipeline import CLASP
from clasp_torch.smoothing import FeatureSmoothing, box_radius, gaussian_radius, smooth_features
from tests.conftest import PatchMeanBackbone, toy_image

pytestmark = pytest.mark.usefixtures("single_thread")

GRIDS = [(7, 9), (5, 6), (3, 9), (1, 4)]  # ragged, with a one-row grid


def ragged_batch(dtype: torch.dtype = torch.float64, D: int = 5, seed: int = 0):
    """Features (B, 7, 9, D) and guides (B, 3, 7, 9) with garbage in the padding (it must never be read)."""
    g = torch.Generator().manual_seed(seed)
    B, hm, wm = len(GRIDS), max(h for h, _ in GRIDS), max(w for _, w in GRIDS)
    mask = torch.zeros(B, hm, wm, dtype=torch.bool)
    for b, (h, w) in enumerate(GRIDS):
        mask[b, :h, :w] = True
    feats = torch.randn(B, hm, wm, D, generator=g, dtype=dtype)
    feats = torch.where(mask[..., None], feats, torch.full_like(feats, 100.0))
    guide = torch.rand(B, 3, hm, wm, generator=g, dtype=dtype)
    guide = torch.where(mask[:, None], guide, torch.full_like(guide, -5.0))
    return feats, mask, guide


# ------------------------------------------------------------------ slow per-image references


def ref_gaussian(f: np.ndarray, sigma: float) -> np.ndarray:
    """(h, w, D): scipy's Gaussian with border replication and the same kernel radius."""
    r = gaussian_radius(sigma)
    return ndi.gaussian_filter(f, (sigma, sigma, 0), mode="nearest", radius=(r, r, 0))


def ref_bilateral(f: np.ndarray, g: np.ndarray, sigma: float, sigma_color: float) -> np.ndarray:
    """(h, w, D) joint bilateral filter, literally: every pixel, every tap, nearest border; g (3, h, w)."""
    h, w, _ = f.shape
    r = gaussian_radius(sigma)
    out = np.zeros_like(f)
    for y in range(h):
        for x in range(w):
            num, den = 0.0, 0.0
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    qy, qx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    dist = np.abs(g[:, qy, qx] - g[:, y, x]).sum()
                    wgt = np.exp(-(dy * dy + dx * dx) / (2 * sigma**2)) * np.exp(-dist**2 / (2 * sigma_color**2))
                    num = num + wgt * f[qy, qx]
                    den += wgt
            out[y, x] = num / den
    return out


def box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window of the leading two axes, border replicated."""
    h, w = a.shape[:2]
    p = np.pad(a, [(r, r), (r, r)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)) / (2 * r + 1) ** 2


def ref_guided(f: np.ndarray, g: np.ndarray, sigma: float, eps: float) -> np.ndarray:
    """(h, w, D) guided filter of He et al. (colour guide, Algorithm 2 of the 2013 PAMI paper)."""
    r = box_radius(sigma)
    I = np.moveaxis(g, 0, -1)  # (h, w, 3)
    mean_I, mean_p = box_mean(I, r), box_mean(f, r)
    corr_II = box_mean(I[..., :, None] * I[..., None, :], r)  # (h, w, 3, 3)
    corr_Ip = box_mean(I[..., :, None] * f[..., None, :], r)  # (h, w, 3, D)
    var_I = corr_II - mean_I[..., :, None] * mean_I[..., None, :]
    cov_Ip = corr_Ip - mean_I[..., :, None] * mean_p[..., None, :]
    a = np.linalg.solve(var_I + eps * np.eye(3), cov_Ip)  # (h, w, 3, D)
    b = mean_p - np.einsum("hwc,hwcd->hwd", mean_I, a)
    return np.einsum("hwc,hwcd->hwd", I, box_mean(a, r)) + box_mean(b, r)


REFERENCE_CASES = [("gaussian", sigma, {}) for sigma in (0.5, 1.0, 1.5, 2.0)] + [
    ("bilateral", 0.75, {"sigma_color": 0.3}), ("bilateral", 1.25, {"sigma_color": 0.3}),
    ("guided", 0.5, {"eps": 0.02}), ("guided", 1.5, {"eps": 0.02}),
]


def slow_reference(kind: str, f: np.ndarray, g: np.ndarray, sigma: float, **kw: float) -> np.ndarray:
    if kind == "gaussian":
        return ref_gaussian(f, sigma)
    if kind == "bilateral":
        return ref_bilateral(f, g, sigma, kw["sigma_color"])
    return ref_guided(f, g, sigma, kw["eps"])


@pytest.mark.parametrize(("kind", "sigma", "kw"), REFERENCE_CASES)
def test_equals_slow_per_image_reference_on_ragged_batch(kind: str, sigma: float, kw: dict[str, float]) -> None:
    feats, mask, guide = ragged_batch(D=3)
    out = smooth_features(feats, mask, kind, sigma, guide, **kw)  # type: ignore[arg-type]
    for b, (h, w) in enumerate(GRIDS):
        ref = slow_reference(kind, feats[b, :h, :w].numpy(), guide[b, :, :h, :w].numpy(), sigma, **kw)
        np.testing.assert_allclose(out[b, :h, :w].numpy(), ref, rtol=1e-9, atol=1e-11)
    assert torch.all(out[~mask] == 0)


@pytest.mark.parametrize("kind", ["gaussian", "bilateral", "guided"])
def test_batch_equals_single_images(kind: str) -> None:
    feats, mask, guide = ragged_batch(torch.float32, D=16, seed=1)
    out = smooth_features(feats, mask, kind, 1.0, guide)
    for b, (h, w) in enumerate(GRIDS):
        one = smooth_features(feats[b:b + 1, :h, :w].contiguous(), mask[b:b + 1, :h, :w].contiguous(), kind, 1.0,
                              guide[b:b + 1, :, :h, :w].contiguous())
        torch.testing.assert_close(out[b:b + 1, :h, :w], one, rtol=1e-6, atol=1e-6)
    # and the same image alone in a larger zero/garbage padded canvas
    canvas = torch.zeros(1, 9, 11, 16)
    canvas[0, :5, :6] = feats[1, :5, :6]
    cmask = torch.zeros(1, 9, 11, dtype=torch.bool)
    cmask[0, :5, :6] = True
    cguide = torch.rand(1, 3, 9, 11)
    cguide[0, :, :5, :6] = guide[1, :, :5, :6]
    big = smooth_features(canvas, cmask, kind, 1.0, cguide)
    torch.testing.assert_close(big[0, :5, :6], out[1, :5, :6], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "bilateral", "guided"])
def test_gradcheck_float64(kind: str) -> None:
    feats, mask, guide = ragged_batch(D=2)
    feats = feats[:3, :5, :6].contiguous().requires_grad_()  # keep it small: gradcheck is O(numel^2)
    mask, guide = mask[:3, :5, :6].contiguous(), guide[:3, :, :5, :6].contiguous()
    assert torch.autograd.gradcheck(lambda x: smooth_features(x, mask, kind, 0.75, guide), (feats,))


def test_none_is_identity_and_bad_arguments() -> None:
    feats, mask, _ = ragged_batch()
    assert smooth_features(feats, mask, "none") is feats
    with pytest.raises(ValueError, match="kind"):
        smooth_features(feats, mask, "median", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guide"):
        smooth_features(feats, mask, "bilateral", 1.0)
    with pytest.raises(ValueError, match="sigma"):
        smooth_features(feats, mask, "gaussian", 0.0)
    holey = mask.clone()
    holey[0, 0, 0] = False
    with pytest.raises(ValueError, match="rectangle"):
        smooth_features(feats, holey, "gaussian", 1.0)
    assert FeatureSmoothing("guided").needs_guide and not FeatureSmoothing("gaussian").needs_guide


def test_doctests() -> None:
    res = doctest.testmod(smoothing, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_inside_clasp_none_is_bit_identical_and_batches_match() -> None:
    imgs = [toy_image(96, 128, 0), toy_image(70, 50, 1), toy_image(130, 90, 2)]
    plain = CLASP(PatchMeanBackbone(), refiner=None)(imgs)
    none = CLASP(PatchMeanBackbone(), refiner=None, smoothing=FeatureSmoothing("none"))(imgs)
    assert torch.equal(plain.labels, none.labels) and torch.equal(plain.k, none.k)
    for kind in ("gaussian", "bilateral"):
        model = CLASP(PatchMeanBackbone(), refiner=None, smoothing=FeatureSmoothing(kind, 1.0, sigma_color=0.2))
        batch = model(imgs)
        assert torch.equal(batch.features, plain.features)  # CLASPOutput.features stays the backbone's
        for i, im in enumerate(imgs):
            assert torch.equal(model([im]).label_map(0), batch.label_map(i))
