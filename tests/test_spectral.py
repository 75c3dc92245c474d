"""Spectral core against numpy's full eigh and a literal transcription of the elbow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.reference import eigengap_elbow as np_elbow
from benchmarks.reference import k_band as np_band
from clasp_torch.spectral import (
    affinity_matrix,
    cosine_affinity,
    eigengap_elbow,
    k_band,
    normalize_features,
    spectral_decomposition,
)


def _np_spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fh = f / np.linalg.norm(f, axis=1, keepdims=True)
    w, v = np.linalg.eigh(fh @ fh.T)
    return w[::-1], v[:, ::-1]


def _assert_same_subspaces(u: np.ndarray, v: np.ndarray, w: np.ndarray, tol: float = 1e-5) -> None:
    """Eigenvectors agree up to sign / rotation inside (near-)degenerate eigenvalue clusters."""
    k = u.shape[1]
    i = 0
    while i < k:
        j = i + 1
        while j < k and abs(w[j] - w[j - 1]) < 1e-8 * max(1.0, abs(w[0])):
            j += 1
        pu, pv = u[:, i:j] @ u[:, i:j].T, v[:, i:j] @ v[:, i:j].T
        assert np.abs(pu - pv).max() < tol, f"eigenvector block {i}:{j} differs"
        i = j


@pytest.mark.parametrize("n,d", [(120, 16), (300, 32), (40, 64)])
def test_gram_spectrum_matches_numpy_eigh(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n + d)
    f = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    res = spectral_decomposition(f)
    w, v = _np_spectrum(f[0].numpy())
    got = res.eigenvalues[0].numpy()
    np.testing.assert_allclose(got, np.where(np.arange(n) < min(n, d), w, 0.0), atol=1e-5)
    r = min(n, d)
    _assert_same_subspaces(res.eigenvectors[0, :, :r].numpy(), v[:, :r], w[:r])


def test_gram_equals_full_path_on_real_features(real_features) -> None:
    f = real_features[0].reshape(1, -1, real_features[0].shape[-1])
    gram = spectral_decomposition(f, method="gram")
    full = spectral_decomposition(f, method="full")
    w, v = _np_spectrum(f[0].numpy())
    np.testing.assert_allclose(gram.eigenvalues[0].numpy()[:100], w[:100], atol=1e-5)
    np.testing.assert_allclose(full.eigenvalues[0].numpy(), w, atol=1e-5)
    _assert_same_subspaces(gram.eigenvectors[0, :, :20].numpy(), v[:, :20], w[:20])


def test_ragged_batch_equals_single(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 8, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    b = torch.randn(80, 8, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    f = torch.zeros(2, 80, 8, dtype=dtype, device=device)
    f[0, :50], f[1] = a, b
    mask = torch.zeros(2, 80, dtype=torch.bool, device=device)
    mask[0, :50] = True
    mask[1] = True
    res = spectral_decomposition(f, mask)
    single = spectral_decomposition(a[None])
    np.testing.assert_allclose(res.eigenvalues[0, :50].cpu().numpy(), single.eigenvalues[0].cpu().numpy(), atol=1e-10)
    assert torch.all(res.eigenvalues[0, 50:] == 0)
    assert torch.all(res.eigenvectors[0, 50:] == 0)
    k = eigengap_elbow(res.eigenvalues, res.n)
    assert k[0] == eigengap_elbow(single.eigenvalues)[0]
    assert k[0] == np_elbow(single.eigenvalues[0].cpu().numpy())


def test_elbow_matches_literal_transcription_synthetic() -> None:
    rng = np.random.default_rng(0)
    spectra = []
    for n in [4, 5, 10, 57, 400]:  # n = 3: both points lie on the line (a float tie)
        for _ in range(20):
            lam = np.sort(rng.exponential(1.0, n) ** rng.uniform(0.5, 4))[::-1]
            spectra.append(lam)
    for lam in spectra:
        got = int(eigengap_elbow(torch.from_numpy(lam.copy())[None])[0])
        assert got == np_elbow(lam), lam
    # the same spectra batched with padding
    N = max(len(s) for s in spectra)
    pad = np.zeros((len(spectra), N))
    for i, s in enumerate(spectra):
        pad[i, : len(s)] = s
    n = torch.tensor([len(s) for s in spectra])
    got = eigengap_elbow(torch.from_numpy(pad), n).tolist()
    assert got == [np_elbow(s) for s in spectra]


def test_elbow_matches_literal_transcription_real(real_features) -> None:
    for f in real_features:
        fl = f.reshape(-1, f.shape[-1])
        w, _ = _np_spectrum(fl.numpy())
        res = spectral_decomposition(fl[None])
        assert int(eigengap_elbow(res.eigenvalues, res.n)[0]) == np_elbow(w)


def test_elbow_hand_made() -> None:
    # gaps 6, .5, .3, .2, .1 at i = 1..5; the line from (1, 6) to (5, .1) passes (2, 4.525):
    # point 2 is 4.025 below it, the farthest, so i* = 2 and K_opt = 3.
    lam = torch.tensor([[10.0, 4.0, 3.5, 3.2, 3.0, 2.9]], dtype=torch.float64)
    assert int(eigengap_elbow(lam)[0]) == np_elbow(lam[0].numpy()) == 3


@pytest.mark.parametrize("k_opt", list(range(1, 30)))
def test_k_band_matches_literal(k_opt: int) -> None:
    n = 100
    lo, hi = k_band(torch.tensor([k_opt]), torch.tensor([n]))
    expect = np_band(k_opt, n)
    assert list(range(int(lo), int(hi) + 1)) == expect


from clasp_torch.embedding import SpectralEmbedding  # noqa: E402


def test_k_band_rejects_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta"):
        k_band(torch.tensor([4]), torch.tensor([10]), beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        SpectralEmbedding(beta=0.0)


def test_affinity_is_plain_cosine() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    a = cosine_affinity(f)
    fn = f / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(a, fn @ fn.transpose(1, 2))
    assert (a < 0).any(), "no clipping"


def _np_affinity(f: np.ndarray, kind: str, sigma: float | None = None) -> np.ndarray:
    """The ablation affinities of ``affinity_matrix``'s docstring, from scipy's distances."""
    from scipy.spatial.distance import cdist

    fh = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = 1.0 - cdist(fh, fh, "cosine")
    if kind == "cosine_clipped":
        return np.maximum(cos, 0.0)
    if kind == "gaussian":
        d = cdist(fh, fh, "euclidean")
        if sigma is None:  # median of the n x n distances (lower median, as torch's), diagonal included
            sigma = np.sort(d.ravel())[(d.size - 1) // 2]
        return np.exp(-(d**2) / (2 * sigma**2))
    w = np.maximum(cos, 0.0)  # laplacian: D^-1/2 W D^-1/2 of the clipped cosine
    dinv = 1.0 / np.sqrt(w.sum(1))
    return dinv[:, None] * w * dinv[None, :]


@pytest.mark.parametrize("kind, sigma", [("cosine_clipped", None), ("gaussian", None), ("gaussian", 0.7),
                                         ("laplacian", None)])
def test_ablation_affinities_match_numpy_formulas(kind: str, sigma: float | None) -> None:
    g = torch.Generator().manual_seed(7)
    f = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 29:] = False  # a padded image: its affinity is that of its 29 real rows, zero elsewhere
    a = affinity_matrix(f, mask, kind=kind, sigma=sigma).numpy()
    for b, n in ((0, 40), (1, 29)):
        np.testing.assert_allclose(a[b, :n, :n], _np_affinity(f[b, :n].numpy(), kind, sigma), atol=1e-12)
        assert not a[b, n:].any() and not a[b, :, n:].any()


@pytest.mark.parametrize("kind", ["cosine_clipped", "gaussian", "laplacian"])
def test_full_path_ablations_are_the_eigh_of_the_numpy_affinity(kind: str) -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(1, 60, 6, generator=g, dtype=torch.float64)
    res = spectral_decomposition(f, affinity=kind)
    w, v = np.linalg.eigh(_np_affinity(f[0].numpy(), kind))
    w, v = w[::-1], v[:, ::-1]
    np.testing.assert_allclose(res.eigenvalues[0].numpy(), w, atol=1e-8)
    k = 6
    _assert_same_subspaces(res.eigenvectors[0, :, :k].numpy(), v[:, :k], w[:k])


def test_normalize_rejects_nan() -> None:
    f = torch.ones(1, 4, 3)
    f[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        normalize_features(f)


def test_zero_rows_give_no_nan() -> None:
    f = torch.zeros(1, 10, 4, dtype=torch.float64)
    f[0, :, 0] = 1.0  # uniform image: rank 1
    res = spectral_decomposition(f)
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.eigenvectors).all()
    assert res.eigenvalues[0, 0] == pytest.approx(10.0)
    assert torch.all(res.eigenvalues[0, 1:].abs() < 1e-12)


def test_dtypes(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 70, 12, generator=g).to(device=device, dtype=dtype)
    res = spectral_decomposition(f)
    assert res.eigenvalues.dtype == torch.float64
    assert torch.allclose(res.eigenvalues.sum(-1), torch.full((2,), 70.0, dtype=torch.float64), atol=1e-4)
