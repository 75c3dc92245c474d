"""Instance proposals: components vs scipy.ndimage, holes vs binary_fill_holes, exact IoUs after
de-duplication, batch == single, COCO export round trip, ``clasp proposals`` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.ops import masks_to_boxes

from clasp_torch.components import component_adjacency, enclosed, label_components, map_groups, merge_small
from clasp_torch.instances import DEFAULT_IOU_THRESHOLD, InstanceProposals, instance_proposals
from clasp_torch.pipeline import CLASPOutput, upsample_labels
from clasp_torch.sparse import group_pairs, join

STRUCT = {4: ndimage.generate_binary_structure(2, 1), 8: np.ones((3, 3), dtype=bool)}


def blobs(shape: tuple[int, ...], k: int, seed: int, smooth: int = 3) -> torch.Tensor:
    """Random blobby label maps ``(..., H, W)`` with labels ``0..k-1`` (smoothed noise, argmax)."""
    g = torch.Generator().manual_seed(seed)
    *lead, H, W = shape
    n = int(np.prod(lead)) if lead else 1
    x = torch.rand(n, k, H, W, generator=g)
    for _ in range(smooth):
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return x.argmax(1).view(*lead, H, W)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings of the same pixels define the same partition (a bijection of ids)."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(set(a.ravel().tolist())) == len(set(b.ravel().tolist()))


# ----------------------------------------------------------------------------------- components
@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_equal_scipy_label(connectivity: int) -> None:
    labels = blobs((3, 37, 53), 4, seed=connectivity, smooth=1)
    labels[1, :, 40:] = -1  # padding / unlabelled cells belong to no component
    labels[2, 5:9, 5:30] = -1
    comp, n = label_components(labels, connectivity)
    for b in range(3):
        lab, c = labels[b].numpy(), comp[b].numpy()
        assert ((c >= 0) == (lab >= 0)).all()
        total = 0
        for s in np.unique(lab[lab >= 0]):
            ref, nr = ndimage.label(lab == s, STRUCT[connectivity])
            m = lab == s
            assert same_partition(ref[m], c[m])
            assert len(np.unique(c[m])) == nr
            total += nr
        assert total == int(n[b]) and c.max() == total - 1
        firsts = [np.flatnonzero(c.ravel() == i)[0] for i in range(total)]  # raster order of first pixels
        assert firsts == sorted(firsts)


def scipy_components(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """``label_components``'s exact ids by scipy: every label's ``ndimage.label`` components, numbered
    per image in raster order of their first pixel (``-1`` on negative labels)."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    for b, lab in enumerate(labels):
        comps = []
        for s in np.unique(lab[lab >= 0]):
            ref, nr = ndimage.label(lab == s, STRUCT[connectivity])
            comps += [ref == i for i in range(1, nr + 1)]
        comps.sort(key=lambda m: int(np.flatnonzero(m.ravel())[0]))
        for i, m in enumerate(comps):
            out[b][m] = i
    return out


@pytest.mark.parametrize("connectivity", [4, 8])
def test_kornia_backend_equals_torch_and_scipy_ids(connectivity: int) -> None:
    g = torch.Generator().manual_seed(connectivity)
    maps = [torch.randint(-2, 5, (3, 17, 23), generator=g) * 7,  # noise: many diagonal-only contacts
            blobs((2, 31, 40), 6, seed=5, smooth=1) - 1,  # blobs, label -1 as background
            torch.full((2, 5, 6), -3), torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.long)]
    for lab in maps:
        ref = scipy_components(lab.numpy(), connectivity)
        n_ref = [int(r.max(initial=-1)) + 1 for r in ref]
        for backend in ("torch", "kornia"):
            comp, n = label_components(lab, connectivity, backend)
            assert np.array_equal(comp.numpy(), ref), (backend, tuple(lab.shape))
            assert n.tolist() == n_ref
    with pytest.raises(ValueError, match="backend"):
        label_components(maps[0], connectivity, "opencv")


def test_kornia_backend_on_real_crf_label_maps(coco_dir) -> None:
    """The chosen K's CRF labels and the band's CRF maps of a COCO dev image (downscaled for speed)."""
    from clasp_torch.band import refine_band_labels
    from clasp_torch.pipeline import CLASP
    from tests.conftest import load_rgb

    img = load_rgb(sorted((coco_dir / "images").glob("*.jpg"))[0])
    img = F.interpolate(img[None].float(), size=(120, 160), mode="bilinear", antialias=True)[0].round().byte()
    model = CLASP("efficientnet_lite0", keep_band_labels=True)
    out = model([img])
    band_labels = refine_band_labels([img], out)
    band = band_labels[0][0][band_labels[0][0].flatten(1).amax(1) >= 0]  # the K of the image's band
    assert len(band) > 3 and out.labels.max() > 0
    for lab, conns in ((out.labels, (4, 8)), (band, (8,))):
        for c in conns:
            ref = scipy_components(lab.numpy(), c)
            for backend in ("torch", "kornia"):
                assert np.array_equal(label_components(lab, c, backend)[0].numpy(), ref), (backend, c)
    torch_p = instance_proposals(out, band_labels=band_labels, max_proposals=None)
    kornia_p = instance_proposals(out, band_labels=band_labels, max_proposals=None, components_backend="kornia")
    assert torch.equal(torch_p.masks, kornia_p.masks) and torch.equal(torch_p.scores, kornia_p.scores)


def test_adjacency_merge_and_holes() -> None:
    lab = torch.zeros(1, 12, 12, dtype=torch.long)
    lab[0, 3:9, 3:9] = 1  # a ring of 1 around a hole of 2, holding a speck of 3
    lab[0, 4:8, 4:8] = 2
    lab[0, 5, 5] = 3
    lab[0, 0, 11] = 4  # a one-pixel fragment in the corner
    comp, n = label_components(lab, 8)
    G = int(n[0])
    adj = component_adjacency(comp, G, 4)
    ref = np.zeros((G, G), dtype=int)  # brute force: edge-neighbour pairs across components
    c = comp[0].numpy()
    for dy, dx in ((0, 1), (1, 0)):
        a, b = c[: 12 - dy, : 12 - dx], c[dy:, dx:]
        for u, v in zip(a.ravel(), b.ravel()):
            if u != v:
                ref[u, v] += 1
                ref[v, u] += 1
    assert (adj[0].numpy() == ref).all()
    area = torch.bincount(comp.flatten(), minlength=G).view(1, G)
    exists = torch.ones(1, G, dtype=torch.bool)
    parent = merge_small(area, adj, exists, min_area=2)
    speck, corner, bg = int(comp[0, 5, 5]), int(comp[0, 0, 11]), int(comp[0, 0, 0])
    assert int(parent[0, speck]) == int(comp[0, 5, 6]) and int(parent[0, corner]) == bg
    assert all(int(parent[0, i]) == i for i in range(G) if i not in (speck, corner))
    on_border = torch.tensor([[bool((c == i)[[0, -1]].any() or (c == i)[:, [0, -1]].any()) for i in range(G)]])
    holes = enclosed(component_adjacency(comp, G, 8), on_border, exists)
    for i in range(G):  # region i with its holes == scipy's binary_fill_holes of its mask
        filled = (c == i) | np.isin(c, np.flatnonzero(holes[0, i].numpy()))
        assert (filled == ndimage.binary_fill_holes(c == i, STRUCT[8])).all()


def test_sparse_pairs_and_join_against_loops() -> None:
    key = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(3))
    i, j = group_pairs(key)
    ref = {(a, b) for a in range(40) for b in range(40) if a != b and key[a] == key[b]}
    assert set(zip(i.tolist(), j.tolist())) == ref and len(i) == len(ref)
    left, right = key[:15], key[15:]
    i, j = join(left, right)
    assert set(zip(i.tolist(), j.tolist())) == {(a, b) for a in range(15) for b in range(25) if left[a] == right[b]}


# ----------------------------------------------------------------------------------- proposals
def fake_output(
    seed: int, size: tuple[int, int], grid: tuple[int, int], k_values: list[int], D: int = 6
) -> CLASPOutput:
    """A CLASPOutput of one image with blobby labels at pixel and patch level (no backbone)."""
    H, W = size
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    Kc = len(k_values)
    band = torch.stack([blobs((h, w), k, seed * 10 + i, smooth=1) for i, k in enumerate(k_values)]).unsqueeze(0)
    j = 1 if Kc > 1 else 0
    patch_labels = band[:, j]
    labels = blobs((1, H, W), k_values[j], seed + 99, smooth=4)
    return CLASPOutput(
        labels=labels, patch_labels=patch_labels, k_opt=torch.tensor([k_values[j]]), k=torch.tensor([k_values[j]]),
        eigenvalues=torch.zeros(1, h * w), k_values=torch.tensor(k_values), silhouette=torch.rand(1, Kc, generator=g),
        image_mask=torch.ones(1, H, W, dtype=torch.bool), patch_mask=torch.ones(1, h, w, dtype=torch.bool),
        image_sizes=torch.tensor([[H, W]]), grid_sizes=torch.tensor([[h, w]]),
        features=torch.randn(1, h, w, D, generator=g), band_patch_labels=band,
        coarse_labels=upsample_labels(patch_labels, torch.tensor([[h, w]]), torch.tensor([[H, W]])),
    )


def pad_batch(outs: list[CLASPOutput]) -> CLASPOutput:
    """The batch of single-image outputs, padded as CLASP pads a ragged batch."""
    Hm = max(o.labels.shape[1] for o in outs)
    Wm = max(o.labels.shape[2] for o in outs)
    hm = max(o.patch_labels.shape[1] for o in outs)
    wm = max(o.patch_labels.shape[2] for o in outs)

    def pad(x: torch.Tensor, hw: tuple[int, int], value: float) -> torch.Tensor:
        return F.pad(x, (0, hw[1] - x.shape[-1], 0, hw[0] - x.shape[-2]), value=value)

    return CLASPOutput(
        labels=torch.cat([pad(o.labels, (Hm, Wm), -1) for o in outs]),
        patch_labels=torch.cat([pad(o.patch_labels, (hm, wm), -1) for o in outs]),
        k_opt=torch.cat([o.k_opt for o in outs]), k=torch.cat([o.k for o in outs]),
        eigenvalues=torch.zeros(len(outs), 1),
        k_values=outs[0].k_values, silhouette=torch.cat([o.silhouette for o in outs]),
        image_mask=torch.cat([pad(o.image_mask, (Hm, Wm), False) for o in outs]),
        patch_mask=torch.cat([pad(o.patch_mask, (hm, wm), False) for o in outs]),
        image_sizes=torch.cat([o.image_sizes for o in outs]), grid_sizes=torch.cat([o.grid_sizes for o in outs]),
        features=torch.cat([pad(o.features.permute(0, 3, 1, 2), (hm, wm), 0).permute(0, 2, 3, 1) for o in outs]),
        coarse_labels=torch.cat([pad(o.coarse_labels, (Hm, Wm), -1) for o in outs]),
        band_patch_labels=torch.cat([pad(o.band_patch_labels, (hm, wm), -1) for o in outs]),
    )


@pytest.fixture(scope="module")
def outs() -> list[CLASPOutput]:
    return [fake_output(1, (75, 101), (9, 12), [3, 4, 5]), fake_output(2, (64, 80), (8, 10), [3, 4, 5])]


def _exact_iou(masks: torch.Tensor) -> torch.Tensor:
    m = masks.flatten(1).double()
    inter = m @ m.T
    a = m.sum(1)
    return inter / (a[:, None] + a[None] - inter)


@pytest.mark.parametrize("options", [{}, {"fill_holes": True, "iou_threshold": 0.5}, {"small": "drop", "min_area": 40}])
def test_after_dedup_no_two_proposals_exceed_the_threshold(outs, options) -> None:
    props = instance_proposals(pad_batch(outs), max_proposals=None, **options)
    thr = options.get("iou_threshold", DEFAULT_IOU_THRESHOLD)
    min_area = options.get("min_area", 64)
    for b in range(2):
        d = props.image(b)
        m = d["masks"]
        assert len(m) > 5
        iou = _exact_iou(m).fill_diagonal_(0)
        assert float(iou.max()) <= thr
        assert torch.equal(m.flatten(1).sum(1), d["areas"]) and (d["areas"] >= min_area).all()
        assert torch.equal(masks_to_boxes(m), d["boxes"])
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert not props.masks[b, :, int(props.image_sizes[b, 0]):].any()


def test_single_map_components_equal_scipy(outs) -> None:
    """Without the band and with small fragments dropped: exactly scipy's components >= min_area."""
    o = outs[0]
    props = instance_proposals(o, hierarchy=False, small="drop", min_area=30, iou_threshold=1.0, max_proposals=None)
    lab = o.labels[0].numpy()
    ref = [r for s in np.unique(lab) for r in _components(lab == s) if r.sum() >= 30]
    got = props.image(0)["masks"].numpy()
    assert len(got) == len(ref)
    assert {m.tobytes() for m in got} == {m.tobytes() for m in ref}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    c, n = ndimage.label(mask, STRUCT[8])
    return [c == i for i in range(1, n + 1)]


def test_band_components_on_the_grid_equal_pixel_components(outs) -> None:
    """Patch-map regions are labelled on the patch grid: the same masks as the components of the
    nearest-upsampled band labels at pixel level."""
    o = outs[0]
    props = instance_proposals(o, use_pixel_labels=False, small="drop", min_area=1, iou_threshold=1.0,
                               max_proposals=None)
    band = upsample_labels(o.band_patch_labels[0], o.grid_sizes.repeat(3, 1), o.image_sizes.repeat(3, 1)).numpy()
    ref = {m.tobytes() for lab in band for s in np.unique(lab) for m in _components(lab == s)}
    got = {m.tobytes() for m in props.image(0)["masks"].numpy()}
    assert got == ref  # identical masks of different K are one proposal


def test_batch_equals_single(outs) -> None:
    batch = instance_proposals(pad_batch(outs), max_proposals=40)
    for b, o in enumerate(outs):
        single = instance_proposals(o, max_proposals=40)
        d, s = batch.image(b), single.image(0)
        for key in ("masks", "boxes", "areas", "k", "refined", "patch_counts"):
            assert torch.equal(d[key], s[key]), key
        torch.testing.assert_close(d["scores"], s["scores"])
        torch.testing.assert_close(d["embeddings"], s["embeddings"])


def test_errors_and_layer(outs) -> None:
    o = outs[0]
    with pytest.raises(ValueError, match="keep_band_labels"):
        instance_proposals(CLASPOutput(**{**o.__dict__, "band_patch_labels": None}))
    with pytest.raises(ValueError, match="small"):
        instance_proposals(o, small="grow")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown cue"):
        instance_proposals(o, score_weights={"colour": 1.0})
    p = instance_proposals(o, max_proposals=3)
    assert isinstance(p, InstanceProposals) and p.num_slots == 3 and p.valid.all()
    assert map_groups(o.labels, torch.ones_like(o.labels), torch.zeros_like(o.labels), 0).valid.any()


# ----------------------------------------------------------------------------------- COCO export
def test_coco_dataset_loads_and_masks_round_trip(outs, tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mu
    from pycocotools.coco import COCO

    from clasp_torch.coco import image_ids, proposal_annotations, write_coco_dataset

    props = instance_proposals(pad_batch(outs), max_proposals=30)
    ids = image_ids(["a/000000000139.jpg", "b/photo.png"])
    assert ids == [139, 140]
    anns = proposal_annotations(props, ids)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": int(s[0]), "width": int(s[1])}
              for i, s in zip(ids, props.image_sizes.tolist())]
    path = tmp_path / "proposals.json"
    assert write_coco_dataset(path, images, iter(anns)) == len(anns)
    coco = COCO(str(path))
    assert coco.getCatIds() == [1] and sorted(coco.getImgIds()) == ids
    assert [a["id"] for a in coco.dataset["annotations"]] == list(range(1, len(anns) + 1))
    for b, image_id in enumerate(ids):
        d = props.image(b)
        got = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(got) == len(d["masks"])
        for a, m, s in zip(got, d["masks"], d["scores"]):
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 and a["category_id"] == 1
            assert np.array_equal(coco.annToMask(a).astype(bool), m.numpy())  # exact round trip
            rle = coco.annToRLE(a)
            assert a["area"] == int(mu.area(rle)) and np.allclose(a["bbox"], mu.toBbox(rle))
            assert a["score"] == pytest.approx(float(s), abs=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write: no temporary left


def test_clasp_proposals_end_to_end(tmp_path: Path, capsys) -> None:
    pytest.importorskip("pycocotools")
    from PIL import Image
    from pycocotools.coco import COCO

    from clasp_torch.cli import main
    from tests.conftest import photo

    d = tmp_path / "in"
    d.mkdir()
    photo(0).save(d / "000123.jpg")
    photo(1).save(d / "cat.jpg")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o" / "proposals.json"
    rc = main(["proposals", str(d), "--out", str(out), "--backbone", "efficientnet_lite0", "--device", "cpu",
               "--max-per-image", "7", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.jpg" in err and "Traceback" not in err  # one input failed, the others are written
    coco = COCO(str(out))
    imgs = {im["file_name"]: im for im in coco.dataset["images"]}
    assert set(imgs) == {"000123.jpg", "cat.jpg"} and imgs["000123.jpg"]["id"] == 123 and imgs["cat.jpg"]["id"] == 124
    w, h = Image.open(d / "cat.jpg").size
    assert (imgs["cat.jpg"]["width"], imgs["cat.jpg"]["height"]) == (w, h)
    for im in imgs.values():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        assert 1 <= len(anns) <= 7
        scores = [a["score"] for a in anns]
        assert scores == sorted(scores, reverse=True)
        assert all(coco.annToMask(a).shape == (im["height"], im["width"]) for a in anns)
    assert coco.dataset["categories"] == [{"id": 1, "name": "object"}]
    assert not list(out.parent.glob(".*"))  # no part files or temporaries left


def test_clasp_proposals_shards_lists_and_flags(tmp_path: Path, capsys) -> None:
    """A .tar shard (with a corrupt member) and an @LIST input; --no-crf, --min-area, --preset,
    --weights, --batch-size, --components-backend; the progress bar; batch size 2 with the torch
    components writes what batch size 1 with kornia's writes."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    from clasp_torch.backbones.efficientnet import _packaged_weights_path
    from clasp_torch.cli import main
    from tests.conftest import photo
    from tests.test_user_errors import _jpeg, _tar

    shard = tmp_path / "s0.tar"
    _tar(shard, {"a.jpg": _jpeg(0), "bad.jpg": b"\xff\xd8 corrupt", "000042.jpg": _jpeg(1)})
    photo(2).save(tmp_path / "dog.jpg")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'dog.jpg'}\n")
    common = [str(shard), f"@{tmp_path / 'list.txt'}", "--backbone", "efficientnet_lite0", "--device", "cpu",
              "--weights", _packaged_weights_path(), "--no-crf", "--min-area", "300", "--preset", "fast",
              "--max-per-image", "5"]
    runs = {}
    for bs in (2, 1):
        out = tmp_path / f"bs{bs}" / "proposals.json"
        extra = ["--quiet", "--components-backend", "kornia"] if bs == 1 else []
        rc = main(["proposals", *common, "--out", str(out), "--batch-size", str(bs), *extra])
        captured = capsys.readouterr()
        assert rc == 1 and "bad" in captured.err and "Traceback" not in captured.err
        if bs == 2:
            assert "Predicting" in captured.out + captured.err  # the progress bar (off with --quiet)
        else:
            assert "Predicting" not in captured.out + captured.err
        coco = COCO(str(out))
        assert coco.dataset["info"]["crf"] is False and coco.dataset["info"]["min_area"] == 300
        runs[bs] = coco.dataset
        imgs = {Path(im["file_name"]).name: im for im in coco.dataset["images"]}
        assert set(imgs) == {"s0.tar:a", "s0.tar:000042", "dog.jpg"}
        assert imgs["s0.tar:000042"]["id"] == 42 and {imgs["s0.tar:a"]["id"], imgs["dog.jpg"]["id"]} == {43, 44}
        for im in imgs.values():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
            assert 1 <= len(anns) <= 5 and all(a["area"] >= 300 for a in anns)
        assert not list(out.parent.glob(".*"))
    assert runs[1]["images"] == runs[2]["images"] and runs[1]["annotations"] == runs[2]["annotations"]


def test_clasp_proposals_bad_weights_and_atomic_write(tmp_path: Path, capsys) -> None:
    """--weights reaches the model (a missing file: one clean error); a failed write keeps the old file."""
    pytest.importorskip("pycocotools")
    from clasp_torch.cli import main
    from clasp_torch.coco import write_coco_dataset
    from tests.conftest import photo

    photo(0).save(tmp_path / "a.jpg")
    out = tmp_path / "proposals.json"
    rc = main(["proposals", str(tmp_path / "a.jpg"), "--out", str(out), "--backbone", "efficientnet_lite0",
               "--weights", str(tmp_path / "missing.pth"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pth" in err and "Traceback" not in err and not out.exists()
    out.write_text('{"old": true}')

    def failing():
        yield {"id": 1, "image_id": 1, "category_id": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_coco_dataset(out, [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2}], failing())
    assert out.read_text() == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", out.name]
