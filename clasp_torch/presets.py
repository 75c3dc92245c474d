"""Named settings of the clustering and feature-smoothing stages: ``paper``, ``best``, ``fast``.

A preset is a flat dict of settings; :func:`resolve_preset` copies one and applies explicit
overrides, :func:`clasp_kwargs` turns settings into keyword arguments of
:class:`~clasp_torch.CLASP` (the smoothing keys become a
:class:`~clasp_torch.smoothing.FeatureSmoothing` module, or ``None``)::

    CLASP(backbone, **clasp_kwargs(resolve_preset("best", n_init=5)))

Settings keys:

* ``n_init``, ``max_iter``, ``tol``: k-means restarts, iteration cap and tolerance.
* ``smoothing``: ``"none"``, ``"gaussian"``, ``"bilateral"`` or ``"guided"``
  (:mod:`clasp_torch.smoothing`); ``smoothing_sigma``: its scale in patches;
  ``smoothing_sigma_color`` / ``smoothing_eps``: the edge-aware kinds' colour scale / regulariser.

Any other key (``beta``, ``seed``, ...) passes through to ``CLASP`` unchanged.

The values of ``best`` and ``fast`` come from ``python -m benchmarks.ablate`` on the two dev sets
(cocostuff-val-dev, ade20k-val-dev) with the offline backbone ``efficientnet_lite0``, choosing by
the mean over the two sets (``benchmarks/out/ablate.json``, ``benchmarks/RESULTS.md``):

* ``paper``: the paper's pipeline (CLASP's defaults): no smoothing, k-means ``n_init=10``,
  ``max_iter=300``, ``tol=1e-4``.
* ``best``: the best mean patch mIoU with pixel accuracy not below ``paper``'s on either set (and a
  CRF variant better than ``paper``'s): the guided filter of the image (``sigma`` 1, i.e. a 5x5
  patch window, ``eps`` 1e-3) with ``paper``'s k-means. Patch mIoU / pixel accuracy 29.4 / 60.1
  (COCO) and 17.7 / 55.4 (ADE20K) against ``paper``'s 23.5 / 50.8 and 13.8 / 46.6.
* ``fast``: the least patch-variant time (smoothing + spectral + clustering) within 0.3 mIoU of
  ``paper`` on both sets: Gaussian smoothing (``sigma`` 1.25) with one k-means restart of at most
  5 iterations; mIoU 27.4 / 15.7, spectral + clustering 3.3-3.9x faster than ``paper``'s.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .smoothing import FeatureSmoothing

__all__ = ["PRESETS", "SMOOTHING_KEYS", "resolve_preset", "build_smoothing", "clasp_kwargs"]

SMOOTHING_KEYS: tuple[str, ...] = ("smoothing", "smoothing_sigma", "smoothing_sigma_color", "smoothing_eps")
"""Settings keys consumed by :func:`build_smoothing` (never passed to ``CLASP`` as they are)."""

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n_init": 10, "max_iter": 300, "tol": 1e-4, "smoothing": "none"},
    "best": {"n_init": 10, "max_iter": 300, "tol": 1e-4, "smoothing": "guided", "smoothing_sigma": 1.0,
             "smoothing_eps": 0.001},
    "fast": {"n_init": 1, "max_iter": 5, "tol": 1e-4, "smoothing": "gaussian", "smoothing_sigma": 1.25},
}
"""Preset name -> settings (see the module docstring for the keys and how the values were chosen)."""


def resolve_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The settings of preset ``name`` with ``overrides`` applied (an override of ``None`` is
    "not given" and keeps the preset's value, so CLI defaults of ``None`` can be passed as they are).

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: settings that win over the preset's (any ``CLASP`` keyword, or a smoothing key).

    Returns:
        A new dict (the preset itself is never modified).

    Raises:
        ValueError: an unknown preset name (the message lists the names).

    Example:
        >>> resolve_preset("paper", n_init=3, tol=None)["n_init"], resolve_preset("paper")["n_init"]
        (3, 10)
        >>> resolve_preset("papr")
        Traceback (most recent call last):
        ...
        ValueError: unknown preset 'papr'; choose one of: paper, best, fast
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    settings = copy.deepcopy(PRESETS[name])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def build_smoothing(settings: dict[str, Any]) -> nn.Module | None:
    """The :class:`~clasp_torch.smoothing.FeatureSmoothing` stage the settings ask for, or
    ``None`` for ``smoothing`` ``"none"`` or absent (so ``paper`` builds exactly the default CLASP).

    Example:
        >>> build_smoothing({"smoothing": "gaussian", "smoothing_sigma": 1.5})
        FeatureSmoothing(kind='gaussian', sigma=1.5)
        >>> build_smoothing(resolve_preset("paper")) is None
        True
    """
    kind = settings.get("smoothing", "none")
    if kind in (None, "none"):
        return None
    kw: dict[str, Any] = {}
    if settings.get("smoothing_sigma_color") is not None:
        kw["sigma_color"] = settings["smoothing_sigma_color"]
    if settings.get("smoothing_eps") is not None:
        kw["eps"] = settings["smoothing_eps"]
    return FeatureSmoothing(kind, settings.get("smoothing_sigma", 1.0), **kw)


def clasp_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~clasp_torch.CLASP` for ``settings``: every key except the
    smoothing ones, plus ``smoothing=`` :func:`build_smoothing` (``None`` when there is none).

    Example:
        >>> kw = clasp_kwargs(resolve_preset("paper"))
        >>> kw == {"n_init": 10, "max_iter": 300, "tol": 1e-4, "smoothing": None}
        True
    """
    kw = {k: v for k, v in settings.items() if k not in SMOOTHING_KEYS}
    kw["smoothing"] = build_smoothing(settings)
    return kw
