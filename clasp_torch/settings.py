"""The settings of a :class:`~clasp_torch.CLASP` model, validated once, as a frozen dataclass.

``CLASP(**kwargs)`` builds a :class:`CLASPSettings` from its keyword arguments and its stages
from the settings; :func:`clasp_torch.presets.resolve_preset` produces the keyword arguments of
a named preset. Every value is checked in ``__post_init__``, so a wrong setting fails at
construction with one line naming it.

Example:
    >>> s = CLASPSettings(n_init=3)
    >>> s.n_init, s.beta
    (3, 0.5)
    >>> CLASPSettings(beta=1.5)
    Traceback (most recent call last):
    ...
    ValueError: beta must lie in (0, 1), got 1.5
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .checks import check_choice, check_float, check_int
from .crf_resolution import DEFAULT_CRF_BATCH_PIXELS, DEFAULT_CRF_MAX_PIXELS
from .preprocess import DEFAULT_MAX_PATCHES

__all__ = ["CLASPSettings", "SMOOTHING_KINDS"]

#: feature-smoothing kinds (:mod:`clasp_torch.smoothing`)
SMOOTHING_KINDS = ("none", "gaussian", "bilateral", "guided")


@dataclass(frozen=True)
class CLASPSettings:
    """Every setting of the pipeline but the backbone and the refiner module.

    Attributes: see :class:`~clasp_torch.CLASP`'s arguments of the same names. ``smoothing`` is
    the feature-smoothing kind (``"none"`` in the paper) and ``smoothing_sigma`` its width in
    patches; ``crf_params`` is stored as a sorted tuple of ``(name, value)`` pairs.
    """

    preset: str = "paper"
    beta: float = 0.5
    fixed_k: int | None = None
    n_init: int = 10
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0
    max_patches: int = DEFAULT_MAX_PATCHES
    eigen_method: str = "auto"
    affinity: str = "cosine"
    k_selector: str = "eigengap"
    amp_dtype: torch.dtype | None = None
    max_problems: int | None = None
    crf_max_pixels: int = DEFAULT_CRF_MAX_PIXELS
    crf_batch_pixels: int = DEFAULT_CRF_BATCH_PIXELS
    crf_params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    keep_band_labels: bool = False
    smoothing: str = "none"
    smoothing_sigma: float = 1.0
    smoothing_sigma_color: float | None = None
    smoothing_eps: float | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are stored once, here
        put(self, "beta", check_float("beta", self.beta, minimum=0.0, maximum=1.0, open_interval=True))
        if self.fixed_k is not None:
            put(self, "fixed_k", check_int("fixed_k", self.fixed_k, 2))
        put(self, "n_init", check_int("n_init", self.n_init, 1))
        put(self, "max_iter", check_int("max_iter", self.max_iter, 1))
        put(self, "tol", check_float("tol", self.tol, minimum=0.0))
        put(self, "seed", check_int("seed", self.seed))
        put(self, "max_patches", check_int("max_patches", self.max_patches, 4))
        if self.max_problems is not None:
            put(self, "max_problems", check_int("max_problems", self.max_problems, 1))
        put(self, "crf_max_pixels", check_int("crf_max_pixels", self.crf_max_pixels, 1))
        put(self, "crf_batch_pixels", check_int("crf_batch_pixels", self.crf_batch_pixels, 1))
        check_choice("k_selector", self.k_selector, ("eigengap", "entropy"))
        check_choice("eigen_method", self.eigen_method, ("auto", "gram", "full"))
        check_choice("affinity", self.affinity, ("cosine", "cosine_clipped", "gaussian", "laplacian"))
        if self.amp_dtype is not None and not (isinstance(self.amp_dtype, torch.dtype)
                                               and self.amp_dtype.is_floating_point):
            raise ValueError(f"amp_dtype must be None or a floating-point torch.dtype, got {self.amp_dtype!r}")
        params = self.crf_params
        if isinstance(params, dict):
            params = tuple(sorted(params.items()))
        if not isinstance(params, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in params):
            raise ValueError(f"crf_params must be a dict of keyword arguments, got {self.crf_params!r}")
        put(self, "crf_params", params)
        put(self, "keep_band_labels", bool(self.keep_band_labels))
        check_choice("smoothing", self.smoothing, SMOOTHING_KINDS)
        for name in ("smoothing_sigma_color", "smoothing_eps"):
            if getattr(self, name) is not None:
                put(self, name, check_float(name, getattr(self, name), minimum=0.0, open_interval=True))
        put(self, "smoothing_sigma", check_float("smoothing_sigma", self.smoothing_sigma, minimum=0.0,
                                                 open_interval=True))

    def as_dict(self) -> dict[str, Any]:
        """The settings as keyword arguments of :class:`~clasp_torch.CLASP` (``crf_params`` a dict)."""
        d = asdict(self)
        d["crf_params"] = dict(self.crf_params)
        return d
