import time

import pytest
import torch
from torch import nn

from clasp_torch.backbones import (
    Backbone,
    DINOv2Backbone,
    EfficientNetLite0Backbone,
    ModuleBackbone,
    WeightsUnavailableError,
    available_backbones,
    get_backbone,
    register_backbone,
    resolve_backbone_name,
)
from clasp_torch.backbones import dinov2 as dinov2_mod
from clasp_torch.backbones.dinov2 import to_meta_state_dict


@pytest.fixture(scope="module")
def random_dinov2():
    torch.manual_seed(0)
    return DINOv2Backbone(pretrained=False)


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    monkeypatch.delenv("CLASP_WEIGHTS", raising=False)


def test_dinov2_shapes_any_multiple_of_14(random_dinov2):
    bb = random_dinov2
    assert (bb.patch_size, bb.feature_dim, bb.name) == (14, 384, "dinov2_vits14_reg")
    assert bb.model.num_prefix_tokens == 5
    with torch.inference_mode():
        for H, W in [(28, 42), (70, 14), (56, 56)]:
            out = bb(torch.randn(2, 3, H, W))
            assert out.shape == (2, H // 14, W // 14, 384)
    with pytest.raises(ValueError, match="multiple"):
        bb(torch.randn(1, 3, 30, 42))


def test_dinov2_features_are_normed_patch_tokens(random_dinov2):
    """The features are the last block's patch tokens (5 prefix tokens dropped, row-major grid)
    after the final LayerNorm, written out here from its formula with the model's own affine
    parameters (made non-trivial so that a dropped, doubled or misplaced norm shows)."""
    bb = random_dinov2
    g = torch.Generator().manual_seed(5)
    norm = bb.model.norm
    saved = norm.weight.detach().clone(), norm.bias.detach().clone()
    captured = []
    hook = bb.model.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(384, generator=g))
            norm.bias.copy_(0.3 * torch.randn(384, generator=g))
            x = torch.randn(2, 3, 28, 42, generator=g)
            out = bb(x)
        w, b = norm.weight.detach().double(), norm.bias.detach().double()
    finally:
        hook.remove()
        with torch.no_grad():
            norm.weight.copy_(saved[0])
            norm.bias.copy_(saved[1])
    (tokens,) = captured
    assert tokens.shape == (2, 5 + 2 * 3, 384)
    t = tokens[:, 5:].double()
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    ref = (t - mu) / torch.sqrt(var + norm.eps) * w + b
    assert out.shape == (2, 2, 3, 384)
    torch.testing.assert_close(out.double(), ref.reshape(2, 2, 3, 384), rtol=1e-5, atol=1e-5)


def test_dinov2_weights_timm_and_meta_layouts(random_dinov2, tmp_path):
    torch.manual_seed(1)
    for p in random_dinov2.parameters():  # make every tensor non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    timm_sd = {k: v.clone() for k, v in random_dinov2.model.state_dict().items()}
    meta_sd = to_meta_state_dict(timm_sd, cls_pos=0.1 * torch.randn(1, 384))
    assert {"register_tokens", "mask_token", "cls_token", "blocks.0.ls1.gamma"} <= set(meta_sd)
    assert meta_sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(timm_sd, tmp_path / "timm.pth")
    torch.save(meta_sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    x = torch.randn(1, 3, 42, 56)
    with torch.inference_mode():
        ref = random_dinov2(x)
        a = get_backbone("dinov2_vits14_reg", weights=str(tmp_path / "timm.pth"))(x)
        b = get_backbone("dinov2_vits14_reg", weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))(x)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-5)


def test_dinov2_weights_from_env(random_dinov2, tmp_path, monkeypatch):
    torch.save(random_dinov2.model.state_dict(), tmp_path / "w.pth")
    monkeypatch.setenv("CLASP_WEIGHTS", str(tmp_path / "w.pth"))
    bb = get_backbone("dinov2_vits14_reg")
    x = torch.randn(1, 3, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), random_dinov2(x))


def test_dinov2_missing_file_raises(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="CLASP_WEIGHTS"):
        get_backbone("dinov2_vits14_reg", weights=str(tmp_path / "nope.pth"))


def test_dinov2_offline_raises_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dinov2_mod, "_cached_hub_file", lambda: None)

    def hub_fails(*args, **kwargs):
        raise OSError("simulated: no network")

    monkeypatch.setattr("timm.models._builder.load_pretrained", hub_fails)  # where timm's download happens
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        get_backbone("dinov2_vits14_reg")
    assert time.perf_counter() - t < 20
    msg = str(info.value)
    assert "--weights" in msg and "CLASP_WEIGHTS" in msg and "efficientnet_lite0" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, RuntimeError)


def test_dinov2_hub_error_is_wrapped(monkeypatch):
    # hub "reachable" but the download fails: the error is wrapped without chaining
    monkeypatch.setattr(dinov2_mod, "_hub_reachable", lambda timeout=3.0: True)

    def hub_fails(*args, **kwargs):
        raise OSError("simulated download failure")

    monkeypatch.setattr("timm.models._builder.load_pretrained", hub_fails)  # where timm's download happens
    with pytest.raises(WeightsUnavailableError, match="simulated download failure") as info:
        DINOv2Backbone()
    assert info.value.__cause__ is None


# ------------------------------------------------------------------------ EfficientNet


@pytest.fixture(scope="module")
def effnet_classifier():
    from clasp_torch.backbones.efficientnet import efficientnet_lite0_classifier

    return efficientnet_lite0_classifier()


def _classify(model, img_hwc):
    import torch.nn.functional as F

    x = torch.from_numpy(img_hwc).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        return model(x).softmax(-1)[0].topk(5).indices.tolist()


def test_effnet_imagenet_weights_classify(effnet_classifier):
    from skimage import data as skdata

    top_cat = _classify(effnet_classifier, skdata.chelsea())
    assert top_cat[0] in range(281, 286)
    assert sum(c in range(281, 286) for c in top_cat) >= 2
    top_coffee = _classify(effnet_classifier, skdata.coffee())
    assert top_coffee[0] in (504, 967, 968)


def test_effnet_backbone_matches_classifier_trunk(effnet_classifier):
    bb = get_backbone("efficientnet_lite0")
    assert isinstance(bb, EfficientNetLite0Backbone)
    assert (bb.patch_size, bb.mean, bb.std, bb.name) == (16, (0.5,) * 3, (0.5,) * 3, "efficientnet_lite0")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        out = bb(x)
        y = effnet_classifier.bn1(effnet_classifier.conv_stem(x))
        flat = [b for s in effnet_classifier.blocks for b in s]
        for blk in flat[: bb.layer + 1]:
            y = blk(y)
    assert out.shape == (1, 4, 6, bb.feature_dim)
    torch.testing.assert_close(out, y.permute(0, 2, 3, 1))


def test_effnet_layers_and_random_init():
    torch.manual_seed(0)
    bb = EfficientNetLite0Backbone(layer="blocks.3.2", pretrained=False)
    assert bb.layer == 7 and bb.feature_dim == 80
    with torch.inference_mode():
        assert bb(torch.randn(1, 3, 32, 48)).shape == (1, 2, 3, 80)
    with pytest.raises(ValueError, match="stride-16"):
        EfficientNetLite0Backbone(layer=12, pretrained=False)


# ------------------------------------------------------------------------ user modules


class _Grid(nn.Module):
    def __init__(self, p=8, d=5):
        super().__init__()
        self.conv = nn.Conv2d(3, d, p, stride=p)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


def test_user_module_with_args_and_attributes():
    bb = get_backbone(_Grid(), patch_size=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert isinstance(bb, Backbone) and bb.patch_size == 8
    assert bb(torch.randn(1, 3, 16, 24)).shape == (1, 2, 3, 5)
    assert bb.feature_dim == 5
    m = _Grid()
    m.patch_size, m.mean, m.std = 8, (0.5,) * 3, (0.5,) * 3
    assert get_backbone(m).patch_size == 8
    assert get_backbone(bb) is bb


def test_user_module_missing_attributes():
    with pytest.raises(ValueError, match="patch_size.*mean.*std"):
        get_backbone(_Grid())


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("resnet9000")


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", available_backbones())
def test_every_registered_backbone_builds_and_runs(name):
    torch.manual_seed(0)
    bb = get_backbone(name, pretrained=False)
    assert isinstance(bb, Backbone) and bb.name == name
    p = bb.patch_size
    assert isinstance(p, int) and p > 0 and bb.feature_dim > 0
    assert len(bb.mean) == len(bb.std) == 3 and all(s > 0 for s in bb.std)
    H, W = 2 * p, 3 * p
    with torch.inference_mode():
        out = bb(bb.normalize(torch.rand(2, 3, H, W)))
    assert out.shape == (2, H // p, W // p, bb.feature_dim)
    assert torch.isfinite(out).all()


def test_registry_names_aliases_and_kwargs():
    assert available_backbones() == ["dinov2_vits14_reg", "efficientnet_lite0"]
    pairs = [("dinov2", "dinov2_vits14_reg"), ("DINOv2_ViTS14_Reg4", "dinov2_vits14_reg"),
             ("efficientnet-lite0", "efficientnet_lite0"), ("EfficientNet_Lite0", "efficientnet_lite0")]
    for alias, canonical in pairs:
        assert resolve_backbone_name(alias) == canonical
    bb = get_backbone("efficientnet-lite0", pretrained=False, layer="blocks.4.2")  # kwargs reach the constructor
    assert isinstance(bb, EfficientNetLite0Backbone) and bb.layer == 10 and bb.feature_dim == 112
    with pytest.raises(TypeError, match="unexpected keyword"):
        get_backbone("efficientnet_lite0", pretrained=False, depth=3)


def test_register_backbone_adds_one_name():
    from clasp_torch.backbones.registry import unregister_backbone

    @register_backbone("grid8", aliases=("grid-8",))
    def grid8(weights=None, pretrained=True, d=5):
        return ModuleBackbone(_Grid(8, d), patch_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, feature_dim=d, name="grid8")

    try:
        assert available_backbones()[-1] == "grid8"
        bb = get_backbone("GRID-8", d=3)
        assert bb.feature_dim == 3 and bb(torch.randn(1, 3, 16, 8)).shape == (1, 2, 1, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("efficientnet_lite0")(grid8)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("other", aliases=("grid8",))(grid8)
    finally:
        unregister_backbone("grid8")
    assert "grid8" not in available_backbones() and resolve_backbone_name("grid-8") is None
    with pytest.raises(ValueError, match="unknown backbone 'grid8'"):
        get_backbone("grid8")
