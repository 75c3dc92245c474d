"""Selectors: effective-rank K and per-segment background dispersion vs slow numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clasp_torch.selectors import background_score, effective_rank_k, spectral_entropy
from clasp_torch.spectral import spectral_decomposition


def _np_effective_rank(lam: np.ndarray, n: int) -> int:
    """Literal per-image definition."""
    if n <= 2:
        return n
    v = np.clip(np.asarray(lam[:n], dtype=np.float64), 0, None)
    total = v.sum()
    h = 0.0
    if total > 0:
        for x in v:
            p = x / total
            if p > 0:
                h -= p * math.log(p)
    k = int(np.round(math.exp(h)))
    return int(min(max(k, 2), n - 1))


def _np_background(f: np.ndarray, lab: np.ndarray, mask: np.ndarray, C: int) -> np.ndarray:
    out = np.full(C, np.nan)
    for c in range(C):
        rows = [f[i] / max(np.linalg.norm(f[i]), 1e-12) for i in range(len(lab)) if mask[i] and lab[i] == c]
        if rows:
            mu = np.mean(rows, axis=0)
            direction = mu / np.linalg.norm(mu)
            # mean cosine distance of the unit vectors to the mean direction
            out[c] = np.mean([1.0 - float(r @ direction) for r in rows])
    return out


def test_effective_rank_uniform_spectra() -> None:
    N = 30
    lam = torch.zeros(4, N)
    for b, r in enumerate([3, 5, 10, 20]):
        lam[b, :r] = 2.0
    assert effective_rank_k(lam, torch.full((4,), N)).tolist() == [3, 5, 10, 20]


def test_effective_rank_vs_numpy_random_ragged() -> None:
    g = torch.Generator().manual_seed(0)
    B, N = 12, 40
    lam = torch.rand(B, N, generator=g, dtype=torch.float64) ** 4 * 10
    lam[:3] -= 0.3  # some negative eigenvalues, clipped to 0
    lam = lam.sort(-1, descending=True).values
    n = torch.tensor([40, 39, 25, 10, 3, 2, 1, 17, 40, 5, 4, 33])
    lam = torch.where(torch.arange(N)[None] < n[:, None], lam, torch.zeros_like(lam))
    k = effective_rank_k(lam, n)
    assert k.dtype == torch.int64 and k.shape == (B,)
    expect = [_np_effective_rank(lam[b].numpy(), int(n[b])) for b in range(B)]
    assert k.tolist() == expect
    # entropy itself
    h = spectral_entropy(lam, n)
    for b in range(B):
        v = np.clip(lam[b, : int(n[b])].numpy(), 0, None)
        p = v / v.sum()
        p = p[p > 0]
        assert h[b].item() == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)


def test_effective_rank_edge_cases() -> None:
    # all-zero spectrum: H = 0 -> exp(H) = 1 -> clamped to 2
    assert effective_rank_k(torch.zeros(1, 5), torch.tensor([5])).tolist() == [2]
    # upper clamp n - 1: a flat spectrum of 6 values gives 6 -> 5
    assert effective_rank_k(torch.ones(1, 6), torch.tensor([6])).tolist() == [5]
    # n <= 2 -> n
    assert effective_rank_k(torch.ones(3, 4), torch.tensor([0, 1, 2])).tolist() == [0, 1, 2]
    # default n = N, float32 input
    assert effective_rank_k(torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])).tolist() == [3]
    with pytest.raises(ValueError):
        effective_rank_k(torch.ones(5))


def test_effective_rank_on_spectral_decomposition() -> None:
    """Features from 4 well-separated directions: effective rank ≈ 4."""
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(16)[:4] * 5
    f = centres.repeat_interleave(25, 0) + 0.05 * torch.randn(100, 16, generator=g)
    spec = spectral_decomposition(f[None].double())
    assert effective_rank_k(spec.eigenvalues, spec.n).tolist() == [4]


def test_clasp_entropy_selector_runs() -> None:
    from clasp_torch.pipeline import CLASP

    class Tiny(torch.nn.Module):
        patch_size, mean, std, feature_dim, name = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 12, "tiny"

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 12, 8, stride=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).permute(0, 2, 3, 1)

    m = CLASP(Tiny(), refiner=None, k_selector="entropy", n_init=2)
    img = torch.randint(0, 255, (2, 3, 64, 80), dtype=torch.uint8)
    out = m(img)
    n = out.patch_mask.flatten(1).sum(-1)
    assert ((out.k_opt >= 2) & (out.k_opt <= n - 1)).all()
    assert out.k_opt.tolist() == effective_rank_k(out.eigenvalues, n).tolist()


def test_background_score_vs_numpy_loop() -> None:
    g = torch.Generator().manual_seed(2)
    B, N, D, C = 3, 50, 7, 6
    f = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    f[0, :10] = torch.tensor([1.0] + [0.0] * (D - 1), dtype=torch.float64) * torch.arange(1, 11).view(10, 1)
    lab = torch.randint(0, 5, (B, N), generator=g)  # slot 5 never used -> NaN
    lab[0, :10] = 0
    lab[0, 10:] = torch.randint(1, 5, (N - 10,), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 40:] = False
    lab[2, :5] = -1
    f[1, 45] = 0.0  # zero row counts as a zero vector
    got = background_score(f, lab, mask, C)
    assert got.shape == (B, C) and got.dtype == torch.float64
    for b in range(B):
        exp = _np_background(f[b].numpy(), lab[b].numpy(), mask[b].numpy() & (lab[b].numpy() >= 0), C)
        np.testing.assert_allclose(got[b].numpy(), exp, atol=1e-10, equal_nan=True)
    assert got[0, 0].item() == pytest.approx(0.0, abs=1e-12)  # collinear segment
    assert torch.isnan(got[:, 5]).all()
    fin = got[torch.isfinite(got)]
    assert ((fin >= 0) & (fin <= 1)).all()


def test_background_score_equals_one_minus_mean_norm_and_float32() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 30, 5, generator=g)
    lab = torch.randint(0, 3, (2, 30), generator=g)
    got = background_score(f, lab, None, 3)
    assert got.dtype == torch.float32
    u = f / f.norm(dim=-1, keepdim=True)
    for b in range(2):
        for c in range(3):
            mu = u[b, lab[b] == c].mean(0)
            assert got[b, c].item() == pytest.approx(1 - mu.norm().item(), abs=1e-6)


def test_background_score_checks() -> None:
    f = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="n_segments"):
        background_score(f, torch.tensor([[0, 1, 2, 3]]), None, 3)
    with pytest.raises(ValueError, match="labels"):
        background_score(f, torch.zeros(1, 5, dtype=torch.long), None, 3)
    with pytest.raises(ValueError, match="mask"):
        background_score(f, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), 3)
    # no valid patch at all -> all NaN, no error
    out = background_score(f, torch.full((1, 4), -1), None, 2)
    assert torch.isnan(out).all()
