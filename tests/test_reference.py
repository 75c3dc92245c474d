import numpy as np

from benchmarks.reference import (
    eigengap_elbow,
    hungarian_miou_stats,
    k_band,
    pixel_labels,
    reference_clasp,
)


def test_elbow_hand_made_spectrum():
    lam = np.array([30.0, 20.0, 11.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3])
    # points (i, gap_i): (1,10) (2,9) (3,8) (4,0.1) ... (10,0.1); the chord from (1,10) to
    # (10,0.1) passes 6.7 at i=4, so (4, 0.1) is farthest from it: i* = 4, K_opt = 5
    assert eigengap_elbow(lam) == 5


def test_elbow_first_maximum():
    # gaps 1, 0, 0.5, 0, 1: horizontal chord y = 1, distances 0, 1, 0.5, 1, 0 -> tie at
    # i = 2 and i = 4, the first wins: K_opt = 3
    lam = np.array([2.5, 1.5, 1.5, 1.0, 1.0, 0.0])
    assert eigengap_elbow(lam) == 3


def test_k_band():
    assert k_band(4, 100) == [2, 3, 4, 5, 6]
    assert k_band(2, 100) == [2, 3]  # floor(1) = 1 skipped
    assert k_band(13, 100) == list(range(6, 21))
    assert k_band(6, 5) == [3, 4]  # K <= n - 1


def test_reference_recovers_three_blobs():
    rng = np.random.default_rng(0)
    h, w, D = 12, 12, 16
    centers = rng.normal(size=(3, D)) * 5
    truth = np.zeros((h, w), int)
    truth[:, 4:8] = 1
    truth[:, 8:] = 2
    feats = centers[truth] + 0.1 * rng.normal(size=(h, w, D))
    res = reference_clasp(feats)
    assert res.k == 3
    assert res.eigenvalues.shape == (h * w,) and np.all(np.diff(res.eigenvalues) <= 1e-9)
    # labels equal the truth up to a permutation
    pairs = set(zip(truth.ravel().tolist(), res.labels.ravel().tolist()))
    assert len(pairs) == 3
    assert set(res.scores) == set(k_band(res.k_opt, h * w))


def test_pixel_labels_nearest():
    lab = np.array([[0, 1], [2, 3]])
    up = pixel_labels(lab, 4, 6)
    assert up.shape == (4, 6)
    assert (up[:2, :3] == 0).all() and (up[2:, 3:] == 3).all()


def test_hungarian_stats():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[5, 5, 7, 7], [5, 7, 7, 9]])  # cluster 5 -> class 0, 7 -> class 1
    st = hungarian_miou_stats(pred, gt, num_classes=3, ignore=255)
    assert st["total"] == 7 and st["correct"] == 6
    assert st["tp"].tolist() == [3, 3, 0]
    assert st["fp"].tolist() == [0, 1, 0]
    assert st["fn"].tolist() == [1, 0, 0]


def test_pydensecrf_refine_runs():
    from benchmarks.reference import pydensecrf_refine

    rng = np.random.default_rng(0)
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 255
    lab = (np.arange(30)[None, :].repeat(20, 0) >= 15).astype(int)
    noisy = lab.copy()
    flip = rng.random(lab.shape) < 0.1
    noisy[flip] = 1 - noisy[flip]
    out = pydensecrf_refine(img, noisy, 2)
    assert out.shape == lab.shape
    assert (out == lab).mean() > (noisy == lab).mean()
