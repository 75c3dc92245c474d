"""Backbone contract: normalised images ``(B, 3, H, W)`` -> patch features ``(B, h, w, D)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Backbone", "ModuleBackbone", "WeightsUnavailableError", "InvalidWeightsError", "check_input",
    "read_state_dict", "load_state_dict_checked", "invalid_weights_error",
]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


class InvalidWeightsError(WeightsUnavailableError):
    """A weights file exists but is not loadable as the named backbone (not a torch/safetensors
    file, truncated, other keys, other shapes). The message is one paragraph naming the file,
    what was found and the remedies."""


def invalid_weights_error(path: str, label: str, found: str, remedies: str) -> InvalidWeightsError:
    """The one-paragraph :class:`InvalidWeightsError` for ``path`` (``found``: what is wrong with it)."""
    found = " ".join(found.split())[:400]
    return InvalidWeightsError(f"The weights file {path!r} cannot be loaded as {label} weights: {found}. {remedies}")


def read_state_dict(path: str, label: str, remedies: str) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or torch file (always ``weights_only=True``) as a flat state dict.

    Raises:
        InvalidWeightsError: unreadable, truncated, not a state dict.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip reader), EOFError, SafetensorError...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        found = f"it is not a readable torch or safetensors file ({type(exc).__name__}: {msg})"
        raise invalid_weights_error(path, label, found, remedies) from None
    if not isinstance(sd, dict) or not sd:
        raise invalid_weights_error(path, label, f"it holds a {type(sd).__name__}, not a state dict", remedies)
    return sd


def load_state_dict_checked(model: nn.Module, sd: dict[str, Tensor], path: str, label: str, remedies: str) -> None:
    """``model.load_state_dict(sd)`` with every key and shape required to match.

    Raises:
        InvalidWeightsError: missing or unexpected keys, or shapes of another model size.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in sd and isinstance(sd[k], Tensor) and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) of other shapes, e.g. {', '.join(wrong[:2])} (another model size?)")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise invalid_weights_error(path, label, "; ".join(parts), remedies)
    model.load_state_dict(sd)


def check_input(x: Tensor, patch_size: int) -> tuple[int, int]:
    """Validate a ``(B, 3, H, W)`` batch and return the patch grid ``(H // p, W // p)``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size or H == 0 or W == 0:
        raise ValueError(
            f"image size {H}x{W} is not a positive multiple of the patch size {patch_size}; "
            "resize it first (clasp_torch.preprocess.preprocess_image)"
        )
    return H // patch_size, W // patch_size


class Backbone(nn.Module):
    """Base class of feature extractors.

    Attributes:
        patch_size: stride of the output grid in input pixels (14 for DINOv2, 16 for EfficientNet).
        mean, std: normalisation applied to RGB in [0, 1] before :meth:`forward`.
        feature_dim: ``D``, the number of channels of the output features.
        name: short identifier (e.g. ``"dinov2_vits14_reg"``).

    ``forward(x)`` maps ``(B, 3, H, W)`` normalised images, ``H`` and ``W`` multiples of
    ``patch_size``, to ``(B, H // patch_size, W // patch_size, feature_dim)`` features
    (not L2-normalised).
    """

    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    name: str

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalize(self, x01: Tensor) -> Tensor:
        """Normalise RGB images in [0, 1] (``(..., 3, H, W)``) with this backbone's mean/std."""
        m = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        s = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(3, 1, 1)
        return (x01 - m) / s

    def extra_repr(self) -> str:
        return (
            f"name={getattr(self, 'name', '?')!r}, patch_size={getattr(self, 'patch_size', '?')}, "
            f"feature_dim={getattr(self, 'feature_dim', '?')}"
        )


class ModuleBackbone(Backbone):
    """Wrap any ``nn.Module`` returning ``(B, h, w, D)`` features as a :class:`Backbone`.

    Attributes not given are read from the module; ``patch_size``, ``mean`` and ``std`` are
    required one way or the other. ``feature_dim`` may be left out (then it is -1 until
    the first forward call, which records it).
    """

    def __init__(
        self,
        module: nn.Module,
        patch_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_dim: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        patch_size = patch_size if patch_size is not None else getattr(module, "patch_size", None)
        mean = mean if mean is not None else getattr(module, "mean", None)
        std = std if std is not None else getattr(module, "std", None)
        missing = [n for n, v in (("patch_size", patch_size), ("mean", mean), ("std", std)) if v is None]
        if missing:
            raise ValueError(
                f"custom backbone {type(module).__name__} lacks the attribute(s) {', '.join(missing)}; "
                f"pass them explicitly, e.g. get_backbone(module, patch_size=16, "
                f"mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
            )
        if isinstance(patch_size, (tuple, list)):
            patch_size = patch_size[0]
        self.patch_size = int(patch_size)
        self.mean = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 values (RGB)")
        fd = feature_dim if feature_dim is not None else getattr(module, "feature_dim", None)
        self.feature_dim = int(fd) if fd is not None else -1
        self.name = name or getattr(module, "name", None) or type(module).__name__

    def forward(self, x: Tensor) -> Tensor:
        h, w = check_input(x, self.patch_size)
        out = self.module(x)
        if out.ndim != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[1:3]) != (h, w):
            raise ValueError(
                f"custom backbone returned shape {tuple(out.shape)}, expected (B, {h}, {w}, D) "
                f"for input {tuple(x.shape)} and patch_size {self.patch_size}"
            )
        if self.feature_dim < 0:
            self.feature_dim = int(out.shape[-1])
        return out
