"""Feature backbones: ``get_backbone(name_or_module)`` -> :class:`Backbone`."""

from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from .base import Backbone, InvalidWeightsError, ModuleBackbone, WeightsUnavailableError, check_input
from .dinov2 import DINOv2Backbone
from .efficientnet import EfficientNetLite0Backbone

__all__ = [
    "Backbone",
    "ModuleBackbone",
    "WeightsUnavailableError",
    "InvalidWeightsError",
    "DINOv2Backbone",
    "EfficientNetLite0Backbone",
    "get_backbone",
    "available_backbones",
    "DEFAULT_BACKBONE",
    "check_input",
]

DEFAULT_BACKBONE = "dinov2_vits14_reg"
_ALIASES = {
    "dinov2_vits14_reg": "dinov2_vits14_reg",
    "dinov2_vits14_reg4": "dinov2_vits14_reg",
    "dinov2": "dinov2_vits14_reg",
    "efficientnet_lite0": "efficientnet_lite0",
    "efficientnet-lite0": "efficientnet_lite0",
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`get_backbone`."""
    return ["dinov2_vits14_reg", "efficientnet_lite0"]


def get_backbone(
    name_or_module: str | nn.Module = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    *,
    patch_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    feature_dim: int | None = None,
    name: str | None = None,
) -> Backbone:
    """Build a backbone by name, or wrap a user module.

    Args:
        name_or_module: ``"dinov2_vits14_reg"`` (default), ``"efficientnet_lite0"``, a
            :class:`Backbone` (returned as is), or any ``nn.Module`` mapping normalised
            ``(B, 3, H, W)`` to ``(B, H/p, W/p, D)``; for a plain module ``patch_size``,
            ``mean`` and ``std`` come from its attributes or these keyword arguments.
        weights: local weights file (see the backbone classes).
        pretrained: ``False`` for random weights (timing / tests).

    Raises:
        WeightsUnavailableError: pretrained weights cannot be obtained.
        ValueError: unknown name, or a module lacking patch_size/mean/std.
    """
    if isinstance(name_or_module, Backbone):
        return name_or_module
    if isinstance(name_or_module, nn.Module):
        return ModuleBackbone(name_or_module, patch_size=patch_size, mean=mean, std=std,
                              feature_dim=feature_dim, name=name)
    key = _ALIASES.get(str(name_or_module).lower())
    if key == "dinov2_vits14_reg":
        return DINOv2Backbone(weights=weights, pretrained=pretrained)
    if key == "efficientnet_lite0":
        return EfficientNetLite0Backbone(weights=weights, pretrained=pretrained)
    raise ValueError(f"unknown backbone {name_or_module!r}; choose one of {available_backbones()} or pass an nn.Module")
