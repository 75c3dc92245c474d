"""Registry of named backbones (in the style of timm's ``_registry.py`` / ``create_model``).

A backbone is added by decorating one constructor function with :func:`register_backbone`; the
function takes ``weights=`` and ``pretrained=`` (and any keyword arguments of its own) and returns
a :class:`~clasp_torch.backbones.base.Backbone`. Names and aliases are matched case-insensitively.
:func:`available_backbones` lists the registered names in registration order.

Example:
    >>> from torch import nn
    >>> from clasp_torch.backbones.base import ModuleBackbone
    >>> @register_backbone("toy_patch8", aliases=("toy",))
    ... def toy_patch8(weights=None, pretrained=True, dim=4):
    ...     return ModuleBackbone(nn.Identity(), patch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=dim)
    >>> resolve_backbone_name("TOY")
    'toy_patch8'
    >>> backbone_entrypoint("toy")(dim=7).feature_dim
    7
    >>> unregister_backbone("toy_patch8")
    >>> resolve_backbone_name("toy") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from .base import Backbone

__all__ = [
    "register_backbone",
    "unregister_backbone",
    "available_backbones",
    "resolve_backbone_name",
    "backbone_entrypoint",
]

F = TypeVar("F", bound=Callable[..., Backbone])

_ENTRYPOINTS: dict[str, Callable[..., Backbone]] = {}  # registered name -> constructor
_NAMES: dict[str, str] = {}  # lower-case name or alias -> registered name


def register_backbone(name: str | None = None, *, aliases: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorator: register a backbone constructor under ``name`` (default: the function's name).

    Args:
        name: the canonical name, listed by :func:`available_backbones`.
        aliases: other names :func:`get_backbone <clasp_torch.backbones.get_backbone>` accepts.

    Raises:
        ValueError: the name or an alias is taken already.
    """

    def decorate(fn: F) -> F:
        canonical = (name or fn.__name__).lower()
        keys = [canonical, *(a.lower() for a in aliases)]
        taken = [k for k in keys if k in _NAMES]
        if taken:
            raise ValueError(f"backbone name(s) {taken} already registered (for {[_NAMES[k] for k in taken]})")
        _ENTRYPOINTS[canonical] = fn
        for key in keys:
            _NAMES[key] = canonical
        return fn

    return decorate


def unregister_backbone(name: str) -> None:
    """Remove a registered backbone and its aliases (tests, plug-ins).

    Raises:
        KeyError: ``name`` is not registered.
    """
    canonical = resolve_backbone_name(name)
    if canonical is None:
        raise KeyError(name)
    del _ENTRYPOINTS[canonical]
    for key in [k for k, v in _NAMES.items() if v == canonical]:
        del _NAMES[key]


def available_backbones() -> list[str]:
    """Canonical names of the registered backbones, in registration order."""
    return list(_ENTRYPOINTS)


def resolve_backbone_name(name: str) -> str | None:
    """The canonical name of ``name`` or of one of its aliases (any case); ``None`` if unknown."""
    return _NAMES.get(str(name).lower())


def backbone_entrypoint(name: str) -> Callable[..., Backbone]:
    """The registered constructor of ``name`` (canonical or alias).

    Raises:
        ValueError: unknown name.
    """
    canonical = resolve_backbone_name(name)
    if canonical is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of {available_backbones()} or pass an nn.Module")
    return _ENTRYPOINTS[canonical]
