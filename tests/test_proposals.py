"""Region proposals: boxes vs masks, embeddings vs a slow loop, batch == single, COCO RLE."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clasp_torch.pipeline import CLASP, CLASPOutput
from clasp_torch.proposals import (
    RegionProposalLayer,
    RegionProposals,
    proposals_from_labels,
    region_proposals,
    to_coco_rle,
)
from clasp_torch.selectors import background_score


def _small(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    return F.interpolate(t, size=size, mode="area")[0].round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    from skimage import data as skd

    return [_small(skd.coffee(), (200, 300)), _small(skd.chelsea(), (176, 264))]


@pytest.fixture(scope="module")
def model() -> CLASP:
    torch.manual_seed(0)
    return CLASP("efficientnet_lite0", refiner=None, n_init=4)


@pytest.fixture(scope="module")
def batch(model: CLASP, images: list[torch.Tensor]) -> tuple[CLASPOutput, RegionProposals]:
    out = model(images)
    return out, region_proposals(out)


def _np_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def test_shapes_and_masks_partition_labels(batch) -> None:
    out, p = batch
    B, H, W = out.labels.shape
    S = p.num_slots
    D = out.features.shape[-1]
    assert len(p) == B == 2
    assert S == max(int(out.k.max()), int(out.labels.max()) + 1)
    assert p.masks.shape == (B, S, H, W) and p.masks.dtype == torch.bool
    assert p.boxes.shape == (B, S, 4) and p.boxes.dtype == torch.float32
    assert p.areas.shape == p.valid.shape == p.patch_counts.shape == p.background.shape == (B, S)
    assert p.embeddings.shape == (B, S, D)
    assert p.image_sizes.tolist() == out.image_sizes.tolist()
    # masks are disjoint and cover exactly the real pixels
    cover = p.masks.sum(1)
    assert (cover <= 1).all()
    assert torch.equal(cover.bool(), out.labels >= 0)
    assert torch.equal(cover.bool(), out.image_mask)
    assert p.valid.sum(1).tolist() == [len(out.label_map(i).unique()) for i in range(B)]


def test_boxes_and_areas_match_masks(batch) -> None:
    _, p = batch
    masks = p.masks.numpy()
    for b in range(masks.shape[0]):
        for s in range(masks.shape[1]):
            m = masks[b, s]
            assert p.areas[b, s].item() == int(m.sum())
            if m.any():
                assert p.valid[b, s]
                assert p.boxes[b, s].tolist() == _np_box(m)
            else:
                assert not p.valid[b, s]
                assert p.boxes[b, s].tolist() == [0.0] * 4


def test_embeddings_and_background_vs_slow_loop(batch) -> None:
    out, p = batch
    feats = out.features.double().numpy()
    pl = out.patch_labels.numpy()
    B, S = p.valid.shape
    for b in range(B):
        h, w = out.grid_sizes[b].tolist()
        for s in range(S):
            rows = [feats[b, y, x] for y in range(h) for x in range(w) if pl[b, y, x] == s]
            assert p.patch_counts[b, s].item() == len(rows)
            if rows:
                np.testing.assert_allclose(p.embeddings[b, s].numpy(), np.mean(rows, 0), rtol=1e-5, atol=1e-5)
                u = [r / np.linalg.norm(r) for r in rows]
                assert p.background[b, s].item() == pytest.approx(1 - np.linalg.norm(np.mean(u, 0)), abs=1e-5)
            else:
                assert (p.embeddings[b, s] == 0).all() and torch.isnan(p.background[b, s])
    # padding of the patch grid never counts
    assert p.patch_counts.sum().item() == int(out.patch_mask.sum())


def test_batch_equals_single(model: CLASP, images: list[torch.Tensor], batch) -> None:
    _, pb = batch
    for i, im in enumerate(images):
        ps = region_proposals(model(im))
        H, W = im.shape[-2:]
        S1 = ps.num_slots
        assert S1 <= pb.num_slots
        assert not pb.valid[i, S1:].any()
        assert torch.equal(pb.masks[i, :S1, :H, :W], ps.masks[0])
        assert not pb.masks[i, :, H:, :].any() and not pb.masks[i, :, :, W:].any()
        assert torch.equal(pb.boxes[i, :S1], ps.boxes[0])
        assert torch.equal(pb.areas[i, :S1], ps.areas[0])
        assert torch.equal(pb.valid[i, :S1], ps.valid[0])
        assert torch.equal(pb.patch_counts[i, :S1], ps.patch_counts[0])
        torch.testing.assert_close(pb.embeddings[i, :S1], ps.embeddings[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pb.background[i, :S1], ps.background[0], rtol=1e-5, atol=1e-5, equal_nan=True)
        # per-image view
        d = ps.image(0)
        assert d["masks"].shape[1:] == (H, W) and len(d["segment_ids"]) == int(ps.valid.sum())


def test_layer_held_and_passed_model(model: CLASP, images: list[torch.Tensor], batch) -> None:
    _, pb = batch
    layer = RegionProposalLayer(model)
    with torch.no_grad():
        p1 = layer(images)
    p2 = RegionProposalLayer()(images, model)
    for p in (p1, p2):
        assert torch.equal(p.masks, pb.masks) and torch.equal(p.boxes, pb.boxes)
        torch.testing.assert_close(p.embeddings, pb.embeddings)
    assert "use_pixel_labels=True" in repr(layer)
    with pytest.raises(ValueError, match="CLASP model"):
        RegionProposalLayer()(images)


def test_refined_labels_vs_coarse_and_empty_slot(model: CLASP, images: list[torch.Tensor]) -> None:
    """A refiner that merges segment 1 into 0: slot 1 keeps patches but loses its pixels."""

    class Merge(torch.nn.Module):
        def forward(self, imgs, labels, n_labels, mask):
            return torch.where(labels == 1, torch.zeros_like(labels), labels)

    m = CLASP(model.backbone, refiner=Merge(), n_init=2, fixed_k=3)  # same (pretrained) backbone
    out = m(images[:1])
    p = region_proposals(out)
    assert not p.valid[0, 1] and p.areas[0, 1] == 0 and p.patch_counts[0, 1] > 0
    assert p.boxes[0, 1].tolist() == [0.0] * 4
    pc = region_proposals(out, use_pixel_labels=False)
    assert pc.valid[0, :3].all()
    assert torch.equal(pc.masks.sum(1).bool(), out.coarse_labels >= 0)
    assert torch.equal(pc.masks[0, 0] | pc.masks[0, 1], p.masks[0, 0])
    assert torch.equal(pc.embeddings, p.embeddings)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 copy keyword
def test_coco_rle_round_trip(batch) -> None:
    """RLEs decode (pycocotools) to the masks; pycocotools' own box and area of each RLE are the
    proposal's box (xyxy, inclusive) and area."""
    import json

    from pycocotools import mask as mask_utils

    out, p = batch
    res = to_coco_rle(p, image_ids=[11, 22])
    assert len(res) == int(p.valid.sum())
    res = json.loads(json.dumps(res))  # JSON serialisable
    for r in res:
        b = [11, 22].index(r["image_id"])
        s = r["segment_id"]
        H, W = out.image_sizes[b].tolist()
        assert r["segmentation"]["size"] == [H, W] and isinstance(r["segmentation"]["counts"], str)
        dec = mask_utils.decode(r["segmentation"])
        assert dec.shape == (H, W)
        np.testing.assert_array_equal(dec.astype(bool), p.masks[b, s, :H, :W].numpy())
        assert r["area"] == p.areas[b, s].item() == int(mask_utils.area(r["segmentation"]))
        x, y, w, h = mask_utils.toBbox(r["segmentation"]).tolist()
        assert p.boxes[b, s].tolist() == [x, y, x + w - 1, y + h - 1]
        assert r["bbox"] == [x, y, w, h]
    with pytest.raises(ValueError, match="image_ids"):
        to_coco_rle(p, image_ids=[1])


def test_coco_rle_missing_pycocotools(batch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        to_coco_rle(batch[1], image_ids=[0, 1])


def _random_core_inputs(seed: int, B: int = 2, H: int = 40, W: int = 56, h: int = 5, w: int = 7, D: int = 6,
                        S: int = 4):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(-1, S, (B, H, W), generator=g)
    pl = torch.randint(-1, S, (B, h, w), generator=g)
    f = torch.randn(B, h, w, D, generator=g)
    return lab, pl, f, pl >= 0, S


def test_core_vs_numpy_on_random_maps() -> None:
    lab, pl, f, pm, S = _random_core_inputs(0)
    masks, boxes, areas, valid, emb, counts, bg = proposals_from_labels(lab, pl, f, pm, S)
    B = lab.shape[0]
    for b in range(B):
        for s in range(S):
            m = (lab[b] == s).numpy()
            assert torch.equal(masks[b, s], torch.from_numpy(m))
            assert boxes[b, s].tolist() == (_np_box(m) if m.any() else [0.0] * 4)
            assert areas[b, s].item() == int(m.sum()) and valid[b, s].item() == bool(m.any())
            sel = (pl[b] == s)
            assert counts[b, s].item() == int(sel.sum())
            if sel.any():
                torch.testing.assert_close(emb[b, s], f[b][sel].mean(0))
    # background cue: 1 - ||mean of the unit feature rows of the segment's patches|| (numpy)
    fn = f.double().numpy()
    for b in range(B):
        for s in range(S):
            rows = fn[b][(pl[b] == s).numpy()]
            if len(rows):
                u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
                assert bg[b, s].item() == pytest.approx(1 - np.linalg.norm(u.mean(0)), abs=1e-6)
            else:
                assert torch.isnan(bg[b, s])
    torch.testing.assert_close(bg, background_score(f.flatten(1, 2), pl.flatten(1), pm.flatten(1), S), equal_nan=True)


def test_compile_aot_eager_fullgraph_matches_eager() -> None:
    """The proposal core traces as one graph (no breaks); cheap backend so the test stays fast."""
    args = _random_core_inputs(1)
    eager = proposals_from_labels(*args)
    torch._dynamo.reset()
    fn = torch.compile(proposals_from_labels, backend="aot_eager", fullgraph=True, dynamic=True)
    got = fn(*args)
    for a, b in zip(eager, got):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CLASP_TEST_INDUCTOR"),
                    reason="inductor compile takes ~45 s on CPU; set CLASP_TEST_INDUCTOR=1")
def test_compile_inductor_matches_eager(batch) -> None:
    out, p = batch
    pc = region_proposals(out, compile=True)
    for name in ("masks", "boxes", "areas", "valid", "patch_counts"):
        assert torch.equal(getattr(pc, name), getattr(p, name))
    torch.testing.assert_close(pc.embeddings, p.embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pc.background, p.background, rtol=1e-5, atol=1e-5, equal_nan=True)
