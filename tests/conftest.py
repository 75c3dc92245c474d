"""Shared fixtures: the real evaluation data beside the project, and cached real features."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

DATA_ROOT = Path(os.environ.get("CLASP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module single-threaded (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    on a small shared CPU, intra-op threads only add overhead to code of many small ops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class PatchMeanBackbone(nn.Module):
    """A tiny deterministic 'backbone': per-patch mean colour and its square (D = 6)."""

    patch_size = 8
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = F.avg_pool2d(x, 8)
        return torch.cat([m, m**2 + 0.05], 1).permute(0, 2, 3, 1)


def toy_image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(3, h, w)
    img[0, : h // 2] = 0.9
    img[1, :, : w // 3] = 0.8
    img[2, h // 2 :, w // 2 :] = 0.7
    return ((img + 0.05 * torch.rand(3, h, w, generator=g)).clamp(0, 1) * 255).to(torch.uint8)


def data_dir(name: str) -> Path:
    """Path of a dev set under ``../shared/data``; skips the test when it is absent."""
    p = DATA_ROOT / name
    if not (p / "images").is_dir():
        pytest.skip(f"real data folder {p} is missing (it lives beside the project as ../shared/data)")
    return p


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    return data_dir("cocostuff-val-dev")


@pytest.fixture(scope="session")
def effnet():
    from clasp_torch.backbones import get_backbone

    torch.manual_seed(0)
    return get_backbone("efficientnet_lite0").eval()


@pytest.fixture(scope="session")
def real_features(coco_dir, effnet) -> list[torch.Tensor]:
    """EfficientNet-Lite0 features ``(h, w, D)`` of the first 6 COCO dev images."""
    from clasp_torch.preprocess import preprocess_image

    out = []
    for p in sorted((coco_dir / "images").glob("*.jpg"))[:6]:
        x, _ = preprocess_image(load_rgb(p), effnet.patch_size, effnet.mean, effnet.std)
        with torch.no_grad():
            out.append(effnet(x[None])[0].double())
    return out
