"""Tests for clasp_torch.metrics against independent numpy / brute-force / torchmetrics references."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from clasp_torch.metrics import (
    SegmentationStats,
    UnsupervisedSegmentationMetric,
    confusion_histogram,
    dataset_stats,
    hungarian_match,
    hungarian_segmentation_stats,
    iou_per_class,
    per_image_stats,
    scores_from_stats,
    unsupervised_segmentation_scores,
)

IGNORE = -1

# --------------------------------------------------------------------------------------------
# Independent numpy reference (no scipy, no torch): brute force over all assignments
# --------------------------------------------------------------------------------------------


def _bf_optimal_mappings(overlap: np.ndarray) -> tuple[int, set[frozenset[tuple[int, int]]]]:
    """All maximum-overlap one-to-one assignments of rows to columns (positive pairs only)."""
    n_r, n_c = overlap.shape
    best, found = -1, set()
    if n_r == 0 or n_c == 0:
        return 0, {frozenset()}
    if n_r <= n_c:
        candidates = (list(zip(range(n_r), cols)) for cols in itertools.permutations(range(n_c), n_r))
    else:
        candidates = (list(zip(rows, range(n_c))) for rows in itertools.permutations(range(n_r), n_c))
    for pairs in candidates:
        score = sum(int(overlap[r, c]) for r, c in pairs)
        positive = frozenset((r, c) for r, c in pairs if overlap[r, c] > 0)
        if score > best:
            best, found = score, {positive}
        elif score == best:
            found.add(positive)
    return best, found


def _np_stats_from_mapping(pred: np.ndarray, target: np.ndarray, mapping: dict[int, int], num_classes: int):
    """Pixel-by-pixel counting with an explicit python dict (the reference definition)."""
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    fn = np.zeros(num_classes, np.int64)
    correct = total = 0
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t == IGNORE:
            continue
        total += 1
        q = mapping.get(p) if p >= 0 else None
        if q == t:
            tp[t] += 1
            correct += 1
        else:
            fn[t] += 1
            if q is not None:
                fp[q] += 1
    return tp, fp, fn, correct, total


def _np_image_overlap(pred: np.ndarray, target: np.ndarray):
    valid = target != IGNORE
    p, t = pred[valid], target[valid]
    clusters = sorted({int(x) for x in p if x >= 0})
    classes = sorted({int(x) for x in t})
    overlap = np.array([[np.sum((p == c) & (t == k)) for k in classes] for c in clusters], dtype=np.int64)
    return clusters, classes, overlap.reshape(len(clusters), len(classes))


def _np_scores(tp, fp, fn, correct, total) -> tuple[float, float]:
    present = (tp + fn) > 0
    iou = tp[present] / (tp + fp + fn)[present]
    return float(iou.mean()), correct / total


def _random_case(
    rng: np.random.Generator, h: int, w: int, n_classes_img: int, n_clusters: int, num_classes: int
):
    classes = rng.choice(num_classes, size=n_classes_img, replace=False)
    target = classes[rng.integers(0, n_classes_img, (h, w))]
    target[rng.random((h, w)) < 0.15] = IGNORE
    # predictions correlated with the target so matchings are non-trivial
    base = rng.permutation(max(n_clusters, num_classes))[:num_classes]
    pred = np.where(target >= 0, base[np.clip(target, 0, None)] % n_clusters, 0)
    noise = rng.random((h, w)) < 0.35
    pred[noise] = rng.integers(0, n_clusters, int(noise.sum()))
    cluster_ids = rng.choice(1000, size=n_clusters, replace=False)  # arbitrary, sparse ids
    return cluster_ids[pred], target


# --------------------------------------------------------------------------------------------
# Per-image matching vs brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_per_image_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = 7
    h, w = rng.integers(3, 12, 2)
    case = _random_case(rng, int(h), int(w), int(rng.integers(1, 6)), int(rng.integers(1, 7)), num_classes)
    pred, target = case
    clusters, classes, overlap = _np_image_overlap(pred, target)
    best, optimal = _bf_optimal_mappings(overlap)

    mapping = hungarian_match(torch.from_numpy(pred), torch.from_numpy(target), num_classes)
    # the returned matching is one of the optimal ones, expressed in original ids
    as_pairs = frozenset((clusters.index(c), classes.index(k)) for c, k in mapping.items())
    assert as_pairs in optimal
    assert sum(int(overlap[r, c]) for r, c in as_pairs) == best
    if len(optimal) == 1:
        (only,) = optimal
        assert mapping == {clusters[r]: classes[c] for r, c in only}

    stats = per_image_stats(torch.from_numpy(pred), torch.from_numpy(target), num_classes)
    ref = _np_stats_from_mapping(pred, target, mapping, num_classes)
    for got, exp in zip(stats, ref):
        assert got.tolist() == np.asarray(exp).tolist()
    # every optimal matching gives the same number of correct pixels
    assert int(stats.correct) == best


def test_dataset_level_scores_vs_numpy() -> None:
    """mIoU / pixel accuracy over 12 images against README's protocol written with numpy and
    scipy's ``linear_sum_assignment`` (``tests.conftest.per_image_matching_scores``), on images
    whose optimal matching is unique (checked by brute force), so that no tie can make two
    correct implementations differ."""
    from tests.conftest import per_image_matching_scores

    rng = np.random.default_rng(123)
    num_classes = 6
    preds, targets = [], []
    while len(preds) < 12:
        h, w = rng.integers(4, 14, 2)
        p, t = _random_case(
            rng, int(h), int(w), int(rng.integers(1, 5)), int(rng.integers(1, 6)), num_classes
        )
        if len(_bf_optimal_mappings(_np_image_overlap(p, t)[2])[1]) != 1:
            continue
        preds.append(torch.from_numpy(p))
        targets.append(torch.from_numpy(t))
    miou, acc = per_image_matching_scores([(p.numpy(), t.numpy()) for p, t in zip(preds, targets)], (IGNORE,))
    scores = unsupervised_segmentation_scores(preds, targets, num_classes)
    assert set(scores) == {"miou", "pixel_accuracy"}
    assert 100 * float(scores["miou"]) == pytest.approx(miou, abs=1e-4)
    assert 100 * float(scores["pixel_accuracy"]) == pytest.approx(acc, abs=1e-4)


# --------------------------------------------------------------------------------------------
# Hand-made cases
# --------------------------------------------------------------------------------------------


def test_relabelled_perfect_prediction() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 1, IGNORE]])
    pred = torch.tensor([[7, 7, 3, 3], [42, 42, 3, 99]])
    assert hungarian_match(pred, target, 3) == {7: 0, 3: 1, 42: 2}
    s = per_image_stats(pred, target, 3)
    assert s.tp.tolist() == [2, 3, 2] and s.fp.tolist() == [0, 0, 0] and s.fn.tolist() == [0, 0, 0]
    assert int(s.correct) == int(s.total) == 7
    scores = unsupervised_segmentation_scores(pred, target, 3)
    assert float(scores["miou"]) == 1.0 and float(scores["pixel_accuracy"]) == 1.0


def test_more_clusters_than_classes_unmatched_are_fn_only() -> None:
    target = torch.zeros(1, 10, dtype=torch.long)
    pred = torch.tensor([[5] * 6 + [8] * 4])
    assert hungarian_match(pred, target, 2) == {5: 0}
    s = per_image_stats(pred, target, 2)
    assert s.tp.tolist() == [6, 0] and s.fp.tolist() == [0, 0] and s.fn.tolist() == [4, 0]
    scores = unsupervised_segmentation_scores(pred, target, 2)
    assert float(scores["miou"]) == pytest.approx(0.6)  # class 1 absent: not averaged
    assert float(scores["pixel_accuracy"]) == pytest.approx(0.6)


def test_zero_overlap_pairs_are_not_matched() -> None:
    # overlap [[10, 5], [3, 0]]: the optimum A->0 forces B->1 with zero overlap; B stays unmatched
    target = torch.tensor([[0] * 10 + [1] * 5 + [0] * 3])
    pred = torch.tensor([[1] * 15 + [2] * 3])
    assert hungarian_match(pred, target, 2) == {1: 0}
    s = per_image_stats(pred, target, 2)
    assert s.tp.tolist() == [10, 0] and s.fp.tolist() == [5, 0] and s.fn.tolist() == [3, 5]
    assert int(s.correct) == 10 and int(s.total) == 18


def test_absent_classes_and_ignore_pixels() -> None:
    num_classes = 10
    target = torch.tensor([[3, 3, 3, 7], [7, 7, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 5]])
    s = per_image_stats(pred, target, num_classes)
    assert s.tp.tolist()[3] == 2 and s.tp.tolist()[7] == 3
    assert s.fp.tolist()[7] == 1 and s.fn.tolist()[3] == 1 and int(s.total) == 6
    iou = iou_per_class(s.tp, s.fp, s.fn)
    assert torch.isnan(iou[[0, 1, 2, 4, 5, 6, 8, 9]]).all()
    assert iou[3].item() == pytest.approx(2 / 3) and iou[7].item() == pytest.approx(3 / 4)
    scores = scores_from_stats(s)
    assert float(scores["miou"]) == pytest.approx((2 / 3 + 3 / 4) / 2)
    # predictions on ignored pixels never matter
    pred2 = pred.clone()
    pred2[1, 2:] = torch.tensor([123, 3])
    assert all(torch.equal(a, b) for a, b in zip(per_image_stats(pred2, target, num_classes), s))


def test_classes_absent_from_image_cannot_be_matched() -> None:
    # cluster 4 perfectly covers class 2 of image 1; in image 2 class 2 is absent
    t1, p1 = torch.tensor([[2, 2, 0]]), torch.tensor([[4, 4, 1]])
    t2, p2 = torch.tensor([[0, 0, 0]]), torch.tensor([[4, 1, 1]])
    assert hungarian_match(p2, t2, 3) == {1: 0}
    m = UnsupervisedSegmentationMetric(3)
    m.update([p1, p2], [t1, t2])
    assert m.tp.tolist() == [3, 0, 2] and m.fp.tolist() == [0, 0, 0] and m.fn.tolist() == [1, 0, 0]


def test_negative_prediction_means_no_prediction() -> None:
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[-1, 3, 4, -5]])
    s = per_image_stats(pred, target, 2)
    assert s.tp.tolist() == [1, 1] and s.fp.tolist() == [0, 0] and s.fn.tolist() == [1, 1]
    m = UnsupervisedSegmentationMetric(2, matching="dataset", n_clusters=5)
    m.update(pred, target)
    st = m.stats()
    assert st.tp.tolist() == [1, 1] and st.fp.tolist() == [0, 0] and st.fn.tolist() == [1, 1]
    scores = m.compute()
    assert float(scores["pixel_accuracy"]) == pytest.approx(0.5) and float(scores["miou"]) == pytest.approx(
        0.5
    )


def test_empty_and_all_ignored() -> None:
    target = torch.full((3, 3), IGNORE)
    s = per_image_stats(torch.zeros(3, 3, dtype=torch.long), target, 4)
    assert int(s.total) == 0 and int(s.tp.sum()) == 0
    scores = unsupervised_segmentation_scores(torch.zeros(3, 3, dtype=torch.long), target, 4)
    assert torch.isnan(scores["miou"]) and torch.isnan(scores["pixel_accuracy"])
    m = UnsupervisedSegmentationMetric(4)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(m.compute()["miou"])


def test_alias_and_numpy_inputs() -> None:
    assert hungarian_segmentation_stats is per_image_stats
    t = np.array([[0, 1], [1, IGNORE]])
    p = np.array([[9, 8], [8, 8]], dtype=np.int32)
    assert hungarian_match(p, t, 2) == {9: 0, 8: 1}
    assert isinstance(per_image_stats(p, t, 2), SegmentationStats)


def test_input_validation() -> None:
    t = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="integer"):
        per_image_stats(torch.zeros(2, 2), t, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        per_image_stats(torch.zeros(2, 3, dtype=torch.long), t, 2)
    with pytest.raises(ValueError, match="target values"):
        per_image_stats(t, torch.full((2, 2), 5), 2)
    with pytest.raises(ValueError, match="target values"):
        per_image_stats(t, torch.full((2, 2), -3), 2)
    with pytest.raises(ValueError, match="n_clusters"):
        UnsupervisedSegmentationMetric(3, matching="dataset")
    with pytest.raises(ValueError, match="matching"):
        UnsupervisedSegmentationMetric(3, matching="global")  # type: ignore[arg-type]
    m = UnsupervisedSegmentationMetric(3, matching="dataset", n_clusters=2)
    with pytest.raises(ValueError, match="n_clusters"):
        m.update(torch.full((2, 2), 2), t)
    with pytest.raises(ValueError, match="predictions"):
        UnsupervisedSegmentationMetric(3).update([t, t], [t])
    with pytest.raises(ValueError):
        UnsupervisedSegmentationMetric(3).update(torch.zeros(1, 1, 2, 2, dtype=torch.long), t)


# --------------------------------------------------------------------------------------------
# torchmetrics cross-checks (identity matching)
# --------------------------------------------------------------------------------------------


def _noisy_copies(seed: int, n: int, num_classes: int):
    """Targets of varying size and a prediction = target with 10% of pixels swapped to another
    class *present in the same image* (so the optimal matching is the identity)."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n):
        h, w = (int(x) for x in rng.integers(10, 30, 2))
        classes = rng.choice(num_classes, size=int(rng.integers(1, 5)), replace=False)
        t = classes[rng.integers(0, len(classes), (h, w))]
        p = t.copy()
        flip = rng.random((h, w)) < 0.1
        p[flip] = classes[rng.integers(0, len(classes), int(flip.sum()))]
        t[rng.random((h, w)) < 0.1] = IGNORE
        preds.append(torch.from_numpy(p))
        targets.append(torch.from_numpy(t))
    return preds, targets


def test_identity_matching_equals_torchmetrics_jaccard_and_accuracy() -> None:
    num_classes = 8
    preds, targets = _noisy_copies(7, 10, num_classes)
    jac_none = MulticlassJaccardIndex(num_classes, average=None, ignore_index=IGNORE)
    jac_macro = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE)
    acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE)
    ours = UnsupervisedSegmentationMetric(num_classes)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))  # relabel clusters
    for p, t in zip(preds, targets):
        present = set(t[t >= 0].unique().tolist())
        mapping = hungarian_match(perm[p], t, num_classes)
        assert mapping == {int(perm[k]): k for k in present}  # identity up to the relabelling
        for m in (jac_none, jac_macro, acc):
            m.update(p.flatten(), t.flatten())
        ours.update(perm[p], t)
    present = (ours.tp + ours.fn) > 0
    torch.testing.assert_close(
        ours.iou_per_class()[present], jac_none.compute()[present].double(), atol=1e-6, rtol=0
    )
    scores = ours.compute()
    assert float(scores["miou"]) == pytest.approx(float(jac_macro.compute()), abs=1e-6)
    assert float(scores["pixel_accuracy"]) == pytest.approx(float(acc.compute()), abs=1e-6)


def test_batch_tensor_equals_list_and_single_maps() -> None:
    rng = np.random.default_rng(3)
    p = torch.from_numpy(rng.integers(0, 5, (4, 9, 11)))
    t = torch.from_numpy(rng.integers(-1, 4, (4, 9, 11)))
    a, b, c = (UnsupervisedSegmentationMetric(4) for _ in range(3))
    a.update(p, t)
    b.update(list(p), list(t))
    for i in range(4):
        c.update(p[i], t[i])
    for m in (b, c):
        assert all(torch.equal(getattr(a, k), getattr(m, k)) for k in ("tp", "fp", "fn", "correct", "total"))
    assert int(a.n_images) == 4


# --------------------------------------------------------------------------------------------
# Dataset (STEGO) protocol
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_clusters", "num_classes"), [(4, 4), (6, 4), (3, 5)])
def test_dataset_matching_vs_brute_force(n_clusters: int, num_classes: int) -> None:
    rng = np.random.default_rng(n_clusters * 10 + num_classes)
    preds, targets = [], []
    hist = np.zeros((n_clusters, num_classes), np.int64)
    for _ in range(6):
        h, w = (int(x) for x in rng.integers(5, 15, 2))
        t = rng.integers(-1, num_classes, (h, w))
        p = np.where(
            rng.random((h, w)) < 0.6, np.clip(t, 0, None) % n_clusters, rng.integers(0, n_clusters, (h, w))
        )
        for pi, ti in zip(p.ravel(), t.ravel()):
            if ti >= 0:
                hist[pi, ti] += 1
        preds.append(torch.from_numpy(p))
        targets.append(torch.from_numpy(t))
    best, optimal = _bf_optimal_mappings(hist)
    m = UnsupervisedSegmentationMetric(num_classes, matching="dataset", n_clusters=n_clusters)
    m.update(preds[:3], targets[:3])
    m.update(preds[3:], targets[3:])
    assert m.confusion.tolist() == hist.tolist()
    c2k = m.cluster_to_class()
    pairs = frozenset((c, int(k)) for c, k in enumerate(c2k.tolist()) if k >= 0)
    assert pairs in optimal
    mapping = dict(pairs)
    tot = [np.zeros(num_classes, np.int64) for _ in range(3)] + [0, 0]
    for p, t in zip(preds, targets):
        for i, v in enumerate(_np_stats_from_mapping(p.numpy(), t.numpy(), mapping, num_classes)):
            tot[i] = tot[i] + v
    assert int(tot[3]) == best
    s = m.stats()
    for got, exp in zip(s, tot):
        assert got.tolist() == np.asarray(exp).tolist()
    miou, acc = _np_scores(*tot)
    scores = m.compute()
    assert float(scores["miou"]) == pytest.approx(miou, abs=1e-6)
    assert float(scores["pixel_accuracy"]) == pytest.approx(acc, abs=1e-6)
    assert torch.equal(dataset_stats(torch.from_numpy(hist)).tp, s.tp)


def test_dataset_protocol_equals_stego_formula_when_square() -> None:
    """n_clusters == num_classes, all matched overlaps positive: STEGO's histogram formula."""
    rng = np.random.default_rng(11)
    k = 5
    t = rng.integers(-1, k, (40, 40))
    p = np.where(rng.random((40, 40)) < 0.7, (np.clip(t, 0, None) + 2) % k, rng.integers(0, k, (40, 40)))
    hist = np.zeros((k, k), np.int64)  # cluster x class counts of the labelled pixels
    np.add.at(hist, (p[t >= 0], t[t >= 0]), 1)
    assert confusion_histogram(torch.from_numpy(p), torch.from_numpy(t), k, k).numpy().tolist() == hist.tolist()
    best = max(itertools.permutations(range(k)), key=lambda perm: sum(hist[perm[c], c] for c in range(k)))
    matched = hist[list(best), :]  # row c = cluster matched to class c
    tp = np.diag(matched)
    assert (tp > 0).all()
    iou = tp / (matched.sum(0) + matched.sum(1) - tp)
    stego_miou, stego_acc = float(np.nanmean(iou)), float(tp.sum() / matched.sum())
    scores = unsupervised_segmentation_scores(
        torch.from_numpy(p), torch.from_numpy(t), k, "dataset", n_clusters=k
    )
    assert float(scores["miou"]) == pytest.approx(stego_miou, abs=1e-6)
    assert float(scores["pixel_accuracy"]) == pytest.approx(stego_acc, abs=1e-6)


def test_per_image_vs_dataset_protocols_differ_as_documented() -> None:
    # cluster 0 is "class 0" in image 1 and "class 1" in image 2
    t1, p1 = torch.tensor([[0, 0, 1]]), torch.tensor([[0, 0, 1]])
    t2, p2 = torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0, 1]])
    per_image = unsupervised_segmentation_scores([p1, p2], [t1, t2], 2)
    assert float(per_image["miou"]) == 1.0
    dataset = unsupervised_segmentation_scores([p1, p2], [t1, t2], 2, "dataset", n_clusters=2)
    assert float(dataset["pixel_accuracy"]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Distributed-style reduction
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
@pytest.mark.parametrize("matching", ["per_image", "dataset"])
def test_merge_state_equals_single_pass(matching: str) -> None:
    rng = np.random.default_rng(5)
    preds = [torch.from_numpy(rng.integers(0, 6, tuple(rng.integers(4, 12, 2)))) for _ in range(10)]
    targets = [torch.from_numpy(rng.integers(-1, 5, tuple(p.shape))) for p in preds]
    kw = {"matching": matching, "n_clusters": 6}
    full = UnsupervisedSegmentationMetric(5, **kw)
    full.update(preds, targets)
    rank0, rank1 = UnsupervisedSegmentationMetric(5, **kw), UnsupervisedSegmentationMetric(5, **kw)
    rank0.update(preds[::2], targets[::2])
    rank1.update(preds[1::2], targets[1::2])
    # (a) torchmetrics' own merge (what DDP's dist_reduce_fx="sum" does across ranks)
    rank0.merge_state(rank1)
    for name in full.metric_state:
        assert torch.equal(full.metric_state[name], rank0.metric_state[name]), name
    assert int(rank0.n_images) == 10
    full_scores, merged_scores = full.compute(), rank0.compute()
    assert all(torch.equal(full_scores[k], merged_scores[k]) for k in full_scores)
    # (b) plain state summing
    manual = UnsupervisedSegmentationMetric(5, **kw)
    halves = [UnsupervisedSegmentationMetric(5, **kw) for _ in range(2)]
    halves[0].update(preds[:5], targets[:5])
    halves[1].update(preds[5:], targets[5:])
    for name in manual.metric_state:
        setattr(manual, name, getattr(halves[0], name) + getattr(halves[1], name))
    assert all(torch.equal(full_scores[k], manual.compute()[k]) for k in full_scores)


def test_states_are_sum_reduced_and_reset() -> None:
    m = UnsupervisedSegmentationMetric(3, matching="dataset", n_clusters=4)
    assert set(m._reductions) >= {"tp", "fp", "fn", "correct", "total", "n_images", "confusion"}
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert int(m.total) == 2
    m.reset()
    assert int(m.total) == 0 and int(m.confusion.sum()) == 0


# --------------------------------------------------------------------------------------------
# Real labels (skip when the shared data is absent)
# --------------------------------------------------------------------------------------------

DATA_DIR = Path(os.environ.get("CLASP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.skipif(
    not (DATA_DIR / "ade20k-val-dev").is_dir(), reason=f"real ADE20K dev data not found at {DATA_DIR}"
)
def test_real_labels_relabelled_score_perfectly() -> None:
    from clasp_torch.data import SegmentationDataset

    ds = SegmentationDataset(DATA_DIR / "ade20k-val-dev", "ade20k", limit=3)
    perm = torch.randperm(ds.num_classes, generator=torch.Generator().manual_seed(0))
    m = UnsupervisedSegmentationMetric(ds.num_classes)
    for i in range(len(ds)):
        lab = ds.load_label(i)
        pred = torch.where(lab >= 0, perm[lab.clamp_min(0)], torch.tensor(7))
        m.update(pred, lab)
    scores = m.compute()
    assert float(scores["miou"]) == 1.0 and float(scores["pixel_accuracy"]) == 1.0


# --------------------------------------------------------------------------------------------
# Functional and Metric share _update/_compute; DDP reduction of the sum states
# --------------------------------------------------------------------------------------------


def _random_batches(seed: int, n_batches: int, num_classes: int, n_clusters: int):
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(n_batches):
        if b % 2:  # a (B, H, W) batch
            shape = (int(rng.integers(1, 4)), *(int(x) for x in rng.integers(3, 12, 2)))
            batches.append((torch.from_numpy(rng.integers(-1, n_clusters, shape)),
                            torch.from_numpy(rng.integers(-1, num_classes, shape))))
        else:  # a list of differently sized maps
            shapes = [tuple(int(x) for x in rng.integers(2, 14, 2)) for _ in range(int(rng.integers(1, 4)))]
            batches.append(([torch.from_numpy(rng.integers(-1, n_clusters, s)) for s in shapes],
                            [torch.from_numpy(rng.integers(-1, num_classes, s)) for s in shapes]))
    return batches


def _flat_maps(batches):
    preds, targets = [], []
    for p, t in batches:
        preds += list(p)
        targets += list(t)
    return preds, targets


@pytest.mark.parametrize("matching", ["per_image", "dataset"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_functional_equals_metric_over_batches(matching: str, seed: int) -> None:
    batches = _random_batches(seed, 5, num_classes=5, n_clusters=7)
    metric = UnsupervisedSegmentationMetric(5, matching=matching, n_clusters=7)
    for p, t in batches:
        metric.update(p, t)
    preds, targets = _flat_maps(batches)
    functional = unsupervised_segmentation_scores(preds, targets, 5, matching, n_clusters=7)
    computed = metric.compute()
    assert set(functional) == set(computed) == {"miou", "pixel_accuracy"}
    for k in functional:
        assert functional[k].dtype == computed[k].dtype == torch.float32
        assert torch.equal(functional[k], computed[k]), k
    assert int(metric.n_images) == len(preds)


@pytest.mark.parametrize("matching", ["per_image", "dataset"])
def test_ddp_sum_reduction_of_two_ranks_equals_one_pass(matching: str) -> None:
    """Two "ranks" each update on half the batches; rank 0's ``compute`` gathers both ranks'
    states through ``dist_sync_fn`` (what ``torch.distributed.all_gather`` hands torchmetrics)
    and sums them (``dist_reduce_fx="sum"``): the result is the single-process one."""
    batches = _random_batches(7, 6, num_classes=4, n_clusters=6)
    kw = {"matching": matching, "n_clusters": 6}
    single = UnsupervisedSegmentationMetric(4, **kw)
    for p, t in batches:
        single.update(p, t)
    rank1 = UnsupervisedSegmentationMetric(4, **kw)
    for p, t in batches[1::2]:
        rank1.update(p, t)

    def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        (name,) = [n for n, v in rank0.metric_state.items() if v is tensor]
        return [tensor.clone(), rank1.metric_state[name].clone()]

    rank0 = UnsupervisedSegmentationMetric(4, **kw, dist_sync_fn=all_gather, distributed_available_fn=lambda: True)
    for p, t in batches[::2]:
        rank0.update(p, t)
    local = {k: v.clone() for k, v in rank0.metric_state.items()}
    synced, expected = rank0.compute(), single.compute()
    assert all(torch.equal(synced[k], expected[k]) for k in expected)
    assert all(torch.equal(local[k], v) for k, v in rank0.metric_state.items())  # unsynced again after compute
    with rank0.sync_context(dist_sync_fn=all_gather):
        for name, value in single.metric_state.items():
            assert torch.equal(rank0.metric_state[name], value), name
