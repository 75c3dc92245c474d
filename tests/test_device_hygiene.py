"""No stage relies on the default device.

A factory call without ``device=`` (``torch.arange(n)``, ``torch.zeros(...)``) makes a CPU tensor;
on a GPU run it then meets CUDA tensors and the batch fails. Such bugs are invisible on a CPU-only
machine, so these tests run the public entry points on CPU inputs under ``torch.device("meta")``:
every factory call that forgot its ``device=`` now makes a *meta* tensor, which fails as soon as it
meets a CPU tensor (or has its value read). Each result must also equal the plain CPU run exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from clasp_torch.cluster import kmeans, select_k, silhouette_samples
from clasp_torch.crf import dense_crf, unary_from_labels
from clasp_torch.pipeline import CLASP
from clasp_torch.proposals import region_proposals
from clasp_torch.spectral import eigengap_elbow, k_band, spectral_decomposition
from tests.conftest import PatchMeanBackbone, toy_image


def _under_meta(fn):  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        return fn()


def test_meta_default_device_catches_a_missing_device_argument() -> None:
    """The harness itself: a forgotten ``device=`` fails under it."""
    x = torch.ones(4)

    def bad() -> Tensor:
        return x + torch.arange(4)

    with pytest.raises((RuntimeError, NotImplementedError)):
        _under_meta(bad)
    assert torch.equal(_under_meta(lambda: x + torch.arange(4, device=x.device)), x + torch.arange(4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"refiner": "crf"},
        {"refiner": None, "fixed_k": 3},
        {"refiner": None, "k_selector": "entropy"},
    ],
)
def test_pipeline_never_uses_the_default_device(kwargs: dict) -> None:
    model = CLASP(PatchMeanBackbone(), n_init=3, **kwargs)
    imgs = [toy_image(64, 96, 0), toy_image(48, 72, 1), toy_image(56, 56, 2)]
    ref = model(imgs)
    out = _under_meta(lambda: model(imgs))
    assert out.labels.device.type == "cpu"
    assert torch.equal(out.labels, ref.labels)
    assert torch.equal(out.k, ref.k)
    assert torch.equal(out.k_opt, ref.k_opt)
    props = _under_meta(lambda: region_proposals(out))
    ref_props = region_proposals(ref)
    assert torch.equal(props.masks, ref_props.masks)
    assert torch.equal(props.boxes, ref_props.boxes)


def test_stage_functions_never_use_the_default_device() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 40, 5, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    k = torch.tensor([3, 2])
    img = toy_image(24, 32, 3)[None]
    lab = (torch.arange(24 * 32).view(1, 24, 32) // 300).clamp_max(2)

    def run() -> tuple[Tensor, ...]:
        spec = spectral_decomposition(feats, mask)
        k_opt = eigengap_elbow(spec.eigenvalues, spec.n)
        lo, hi = k_band(k_opt, spec.n)
        sel = select_k(spec.eigenvectors, mask, lo.clamp_max(3), hi.clamp_max(4), n_init=2)
        km = kmeans(feats, k, mask, n_init=2)
        sil = silhouette_samples(feats, km.labels, 3, mask)
        q = dense_crf(img, unary_from_labels(lab, 3), n_iter=3)
        return (k_opt, sel.labels, sel.k, km.labels, km.inertia, sil, q)

    ref = run()
    out = _under_meta(run)
    for a, b in zip(out, ref):
        assert a.device.type == "cpu"
        assert torch.equal(a, b)


def test_dinov2_and_lightning_predict_step_never_use_the_default_device() -> None:
    pytest.importorskip("timm")
    from clasp_torch.lightning import CLASPPredictor

    torch.manual_seed(0)
    model = CLASP("dinov2_vits14_reg", pretrained=False, n_init=2).eval()  # random weights, real architecture
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 255, (3, 140, 182), dtype=torch.uint8, generator=g),
            torch.randint(0, 255, (3, 112, 112), dtype=torch.uint8, generator=g)]
    predictor = CLASPPredictor(model)
    batch = {"image": imgs, "path": ["a.jpg", "b.jpg"], "index": torch.tensor([0, 1])}
    ref = predictor.predict_step(batch, 0)
    out = _under_meta(lambda: predictor.predict_step(batch, 0))
    assert [r.get("error") for r in out] == [None, None]
    for a, b in zip(out, ref):
        assert torch.equal(a["labels"], b["labels"])
