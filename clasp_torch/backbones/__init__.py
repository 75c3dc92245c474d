"""Feature backbones: ``get_backbone(name_or_module, **kwargs)`` -> :class:`Backbone`.

Named backbones come from the registry (:mod:`clasp_torch.backbones.registry`): each is one
constructor function decorated with :func:`register_backbone` in its own module (``dinov2``,
``efficientnet``); :func:`get_backbone` looks the name (or an alias, any case) up and forwards
its keyword arguments to that constructor, like timm's ``create_model``.

Example:
    >>> import torch
    >>> available_backbones()
    ['dinov2_vits14_reg', 'efficientnet_lite0']
    >>> bb = get_backbone("efficientnet-lite0", pretrained=False, layer=10)  # random weights, offline
    >>> bb.name, bb.patch_size, bb.feature_dim
    ('efficientnet_lite0', 16, 112)
    >>> bb(torch.zeros(1, 3, 32, 48)).shape
    torch.Size([1, 2, 3, 112])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import Backbone, InvalidWeightsError, ModuleBackbone, WeightsUnavailableError, check_input
from .dinov2 import DINOv2Backbone
from .efficientnet import EfficientNetLite0Backbone
from .registry import available_backbones, backbone_entrypoint, register_backbone, resolve_backbone_name

__all__ = [
    "Backbone",
    "ModuleBackbone",
    "WeightsUnavailableError",
    "InvalidWeightsError",
    "DINOv2Backbone",
    "EfficientNetLite0Backbone",
    "get_backbone",
    "available_backbones",
    "register_backbone",
    "resolve_backbone_name",
    "DEFAULT_BACKBONE",
    "check_input",
]

DEFAULT_BACKBONE = "dinov2_vits14_reg"


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
    **kwargs: Any,
) -> Backbone:
    """Build a registered backbone by name, or wrap a user module.

    Args:
        name_or_module: a name of :func:`available_backbones` or an alias (``"dinov2_vits14_reg"``,
            the default, ``"efficientnet_lite0"``), a :class:`Backbone` (returned as is), or any
            ``nn.Module`` mapping normalised ``(B, 3, H, W)`` to ``(B, H/p, W/p, D)``; for a plain
            module ``patch_size``, ``mean``, ``std`` (and optionally ``feature_dim``, ``name``) come
            from its attributes or these keyword arguments.
        weights: local weights file (see the backbone classes).
        pretrained: ``False`` for random weights (timing / tests).
        **kwargs: passed on to the registered constructor (e.g. ``layer=`` of
            ``efficientnet_lite0``).

    Raises:
        WeightsUnavailableError: pretrained weights cannot be obtained.
        ValueError: unknown name, or a module lacking patch_size/mean/std.
    """
    if isinstance(name_or_module, Backbone):
        return name_or_module
    if isinstance(name_or_module, nn.Module):
        return ModuleBackbone(name_or_module, patch_size=patch_size, mean=mean, std=std,
                              feature_dim=feature_dim, name=name)
    return backbone_entrypoint(name_or_module)(weights=weights, pretrained=pretrained, **kwargs)
