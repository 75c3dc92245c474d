"""Tests for clasp_torch.crf_resolution: the CRF at a bounded working resolution, the batch planner.

References: ``crf_refine_labels`` itself (images under the cap, bit for bit), pydensecrf at the
same working resolution with the resampling done by ``F.interpolate`` (images over the cap), and
``F.interpolate`` for each resampling helper.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clasp_torch import CLASP
from clasp_torch.crf import crf_refine_labels, dense_crf, unary_from_labels
from clasp_torch.crf_resolution import (
    DEFAULT_CRF_MAX_PIXELS,
    MIN_SXY,
    chunk_cost,
    crf_refine_labels_bounded,
    crf_working_size,
    downscale_labels,
    plan_crf_batches,
    resize_image,
    upsample_labels_nearest,
    upsample_marginals_argmax,
)
from clasp_torch.pipeline import pad_images
from tests.conftest import PatchMeanBackbone, load_rgb, toy_image

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGES = [("000000010092.jpg", (240, 360)), ("000000011615.jpg", (330, 250))]  # crops of 640x426, 480x640


def _coarse_labels(coco_dir, name: str, crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A crop of a real photo and blocky labels from its ground truth (16-pixel cells, ids 0..C-1)."""
    from PIL import Image

    img = load_rgb(coco_dir / "images" / name)[:, : crop[0], : crop[1]].contiguous()
    gt = np.asarray(Image.open(coco_dir / "labels" / name.replace(".jpg", ".png")), dtype=np.int64)
    gt = gt[: crop[0], : crop[1]]
    H, W = gt.shape
    cells = gt[8::16, 8::16]
    blocky = np.repeat(np.repeat(cells, 16, 0), 16, 1)[:H, :W]
    blocky = np.pad(blocky, ((0, H - blocky.shape[0]), (0, W - blocky.shape[1])), mode="edge")
    _, lab = np.unique(blocky, return_inverse=True)
    lab = lab.reshape(H, W)
    return img, torch.from_numpy(lab), int(lab.max()) + 1


@pytest.fixture(scope="module")
def photos(coco_dir):
    return [_coarse_labels(coco_dir, n, crop) for n, crop in IMAGES]


def _batch(photos):
    imgs, mask = pad_images([p[0] for p in photos])
    labs = torch.full(mask.shape, -1, dtype=torch.long)
    for i, (_, lab, _) in enumerate(photos):
        labs[i, : lab.shape[0], : lab.shape[1]] = lab
    return imgs, labs, torch.tensor([p[2] for p in photos]), mask


# ------------------------------------------------------------------- under the cap: unchanged
def test_under_cap_is_crf_refine_labels_bit_for_bit(photos) -> None:
    imgs, labs, n, mask = _batch(photos)
    C = int(n.max())
    lm = torch.arange(C).view(1, C) < n.view(-1, 1)
    ref = crf_refine_labels(imgs, labs.clamp_min(0), C, 0.8, mask=mask, label_mask=lm)
    assert max(p[0].shape[1] * p[0].shape[2] for p in photos) <= DEFAULT_CRF_MAX_PIXELS
    assert torch.equal(crf_refine_labels_bounded(imgs, labs, n, 0.8, mask), ref)
    # the same images refined in two chunks (a small budget), and each alone: the same labels
    assert torch.equal(crf_refine_labels_bounded(imgs, labs, n, 0.8, mask, batch_pixels=1), ref)
    for i, (img, lab, c) in enumerate(photos):
        one = crf_refine_labels_bounded(img[None], lab[None], c)
        assert torch.equal(one[0], ref[i, : lab.shape[0], : lab.shape[1]])


def test_pipeline_refiner_uses_the_bounded_crf() -> None:
    """CLASP's CRF equals crf_refine_labels on its coarse labels (default cap: nothing changes)."""
    imgs = [toy_image(96, 128, 0), toy_image(80, 120, 1)]
    model = CLASP(PatchMeanBackbone())
    out = model(imgs)
    padded, mask = pad_images(imgs)
    C = max(int(out.k.max()), 2)
    lm = torch.arange(C).view(1, C) < out.k.view(-1, 1)
    ref = crf_refine_labels(padded, out.coarse_labels.clamp_min(0), C, 0.8, mask=mask, label_mask=lm)
    assert torch.equal(out.labels, ref)
    small = CLASP(PatchMeanBackbone(), crf_max_pixels=64 * 96, crf_batch_pixels=1)(imgs)
    assert small.labels.shape == out.labels.shape
    for i, im in enumerate(imgs):
        assert small.label_map(i).shape == im.shape[1:] and int(small.label_map(i).min()) >= 0
    assert bool((small.labels[~mask] == -1).all())


# -------------------------------------------------------------------- over the cap: pydensecrf
@pytest.mark.parametrize("upsample,scaled", [("marginals", True), ("nearest", True), ("marginals", False)])
def test_over_cap_matches_pydensecrf_at_working_resolution(photos, upsample, scaled) -> None:
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is needed for the reference")
    from benchmarks.reference import pydensecrf_q

    img, lab, C = photos[0]
    H, W = lab.shape
    cap = H * W // 4
    h, w = crf_working_size(H, W, cap)
    # reference: resample with F.interpolate, pydensecrf at (h, w), bring back with F.interpolate
    small = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
    small = small.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    lab_s = F.interpolate(lab[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long().numpy()
    s = math.sqrt(h * w / (H * W)) if scaled else 1.0  # bandwidths follow the downscale
    Q = torch.from_numpy(pydensecrf_q(small, lab_s, C, sxy_g=max(4 * s, MIN_SXY), sxy_b=max(80 * s, MIN_SXY)))
    if upsample == "marginals":
        ref = F.interpolate(Q[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
    else:
        ref = F.interpolate(Q.argmax(0)[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0].long()
    out = crf_refine_labels_bounded(img[None], lab[None], C, max_pixels=cap, upsample=upsample, scale_bandwidths=scaled)
    assert out.shape == (1, H, W)
    agree = float((out[0] == ref).double().mean())
    assert agree >= 0.999, agree
    assert float((out[0] == crf_refine_labels(img[None], lab[None], C)[0]).double().mean()) > 0.9


def test_output_keeps_each_input_size_in_a_ragged_batch(photos) -> None:
    imgs, labs, n, mask = _batch(photos)
    sizes = [tuple(p[1].shape) for p in photos]
    cap = sizes[0][0] * sizes[0][1] // 3  # both images over the cap
    for bp in (1, 10**9):  # one chunk per image, or one for both
        out = crf_refine_labels_bounded(imgs, labs, n, 0.8, mask, max_pixels=cap, batch_pixels=bp)
        assert out.shape == labs.shape and out.dtype == torch.long
        assert bool((out[~mask] == -1).all())
        for i, (H, W) in enumerate(sizes):
            part = out[i, :H, :W]
            assert int(part.min()) >= 0 and int(part.max()) < int(n[i])
        if bp == 1:
            first = out
    assert torch.equal(first, out)


# ------------------------------------------------------------------------------ resampling
def test_resampling_helpers_equal_interpolate(photos) -> None:
    img, lab, C = photos[0]
    H, W = lab.shape
    for size in [(200, 300), (H // 3, W // 5), (H, W // 2)]:
        ref = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)[0].round().clamp(0, 255)
        assert torch.equal(resize_image(img, size, band_rows=37), ref.to(torch.uint8))
        ref_l = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        assert torch.equal(downscale_labels(lab, size), ref_l)
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 5, (23, 31), generator=g)
    for size in [(100, 77), (23, 31), (461, 1000)]:
        ref_n = F.interpolate(small[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        assert torch.equal(upsample_labels_nearest(small, size), ref_n)
    # marginals: a real CRF output (flat regions, edges) and random ones (edges everywhere); exact
    # ties between labels could resolve either way (float rounding), real marginals have none
    h, w = H // 4, W // 4
    Qs = [torch.softmax(4 * torch.rand(4, 23, 31, generator=g), 0)]
    Qs.append(dense_crf(resize_image(img, (h, w))[None], unary_from_labels(downscale_labels(lab, (h, w))[None], C))[0])
    for Q in Qs:
        for size in [(H, W), (97, 61), tuple(Q.shape[1:])]:
            ref_m = F.interpolate(Q[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
            out = torch.full(size, -7, dtype=torch.long)
            upsample_marginals_argmax(Q, size, out=out)
            assert torch.equal(out, ref_m)


# -------------------------------------------------------------------------------- planning
def test_working_size() -> None:
    assert crf_working_size(480, 640, DEFAULT_CRF_MAX_PIXELS) == (480, 640)
    assert crf_working_size(512, 778, DEFAULT_CRF_MAX_PIXELS) == (512, 778)  # the largest dev image
    rng = random.Random(0)
    for _ in range(200):
        H, W, cap = rng.randint(1, 9000), rng.randint(1, 9000), rng.randint(1, 2_000_000)
        h, w = crf_working_size(H, W, cap)
        assert 1 <= h <= H and 1 <= w <= W
        if H * W <= cap:
            assert (h, w) == (H, W)
            continue
        assert h * w <= cap
        if min(h, w) >= 10:  # one scale factor for both sides, up to rounding
            assert abs((h / H) / (w / W) - 1) <= 2.5 / min(h, w)


def test_plan_crf_batches_respects_the_budget() -> None:
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 40)
        sizes = [(rng.randint(1, 900), rng.randint(1, 900)) for _ in range(n)]
        labels = [rng.randint(1, 30) for _ in range(n)]
        budget = rng.choice([1, 5e4, 3e5, 2e6, 1e8])
        chunks = plan_crf_batches(sizes, labels, budget)
        assert [i for c in chunks for i in c] == list(range(n))  # every index once, in order
        for c in chunks:
            cost = chunk_cost([sizes[i] for i in c], [labels[i] for i in c])
            assert cost <= budget or len(c) == 1  # an image over the budget is alone
        for a, b in zip(chunks, chunks[1:]):  # greedy: the next image did not fit
            grown = a + [b[0]]
            assert chunk_cost([sizes[i] for i in grown], [labels[i] for i in grown]) > budget
    assert plan_crf_batches([(100, 100), (2000, 2000), (100, 100)], 2, 50_000) == [[0], [1], [2]]
    assert plan_crf_batches([(10, 10)] * 4, 3, 1e9) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="n_labels"):
        plan_crf_batches([(10, 10)] * 2, [2], 1e9)


def test_refiner_calls_the_crf_in_planned_chunks(photos, monkeypatch) -> None:
    import clasp_torch.crf_resolution as cr

    calls = []
    real = cr.dense_crf

    def spy(image, unary, **kw):
        calls.append(tuple(unary.shape))
        return real(image, unary, **kw)

    monkeypatch.setattr(cr, "dense_crf", spy)
    imgs, labs, n, mask = _batch(photos * 2)  # 4 images
    cap = 200 * 150
    budget = 2.5 * cap * (1 + int(n.max()) / 50)
    crf_refine_labels_bounded(imgs, labs, n, 0.8, mask, max_pixels=cap, batch_pixels=budget)
    assert len(calls) >= 2 and sum(c[0] for c in calls) == 4
    for B, C, h, w in calls:
        assert B == 1 or B * h * w * (1 + C / 50) <= budget


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="crf_max_pixels"):
        CLASP(PatchMeanBackbone(), crf_max_pixels=0)
    with pytest.raises(ValueError, match="crf_batch_pixels"):
        CLASP(PatchMeanBackbone(), crf_batch_pixels=0)
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="upsample"):
        crf_refine_labels_bounded(img, torch.zeros(1, 8, 8, dtype=torch.long), 2, upsample="bicubic")
