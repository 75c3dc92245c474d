"""Shared fixtures: the real evaluation data beside the project, and cached real features."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- device / dtype (as kornia's)
#: (rtol, atol) of a comparison against a float64 reference, per compute dtype
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-10, 1e-12),
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", action="store", default="cpu",
                     help="device(s) of the `device` fixture: cpu, cuda, cuda:N, comma-separated, or 'all' "
                          "(cpu and cuda when available)")
    parser.addoption("--dtype", action="store", default="float32",
                     help="dtype(s) of the `dtype` fixture: float32, float64, comma-separated, or 'all'")


def _devices(option: str) -> list[str]:
    if option == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d.strip() for d in option.split(",") if d.strip()]


def _dtype_names(option: str) -> list[str]:
    names = list(_DTYPES) if option == "all" else [d.strip() for d in option.split(",") if d.strip()]
    unknown = [n for n in names if n not in _DTYPES]
    if unknown:
        raise pytest.UsageError(f"--dtype: unknown {unknown}; choose from {list(_DTYPES)} or 'all'")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking a ``device`` / ``dtype`` argument run once per ``--device`` / ``--dtype`` value
    (default: cpu, float32), so ``python -m pytest --device cuda --dtype all`` runs the same stage
    tests on a GPU in both precisions. A test that parametrizes the name itself keeps its own values."""
    own = set()
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0]
        own.update(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
    if "device" in metafunc.fixturenames and "device" not in own:
        devices = _devices(metafunc.config.getoption("--device"))
        for d in devices:
            if d.startswith("cuda") and not torch.cuda.is_available():
                raise pytest.UsageError(f"--device {d}: no CUDA GPU is visible")
        metafunc.parametrize("device", [torch.device(d) for d in devices], ids=devices)
    if "dtype" in metafunc.fixturenames and "dtype" not in own:
        names = _dtype_names(metafunc.config.getoption("--dtype"))
        metafunc.parametrize("dtype", [_DTYPES[n] for n in names], ids=names)


@pytest.fixture
def tol(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` for ``torch.testing.assert_close`` against a float64 reference."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


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


#: raw label-PNG values that are not scored, per dev set (its README: COCO-Stuff 255 unlabelled
#: and 182 "other"; ADE20K 0 "other")
IGNORE_VALUES = {"cocostuff": (182, 255), "ade20k": (0,)}


def load_labelled_pair(root: Path, stem: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(image uint8 (3, H, W), raw label map (H, W))`` of one dev-set id, read with PIL
    (no EXIF transposition: the labels refer to the stored pixel grid)."""
    from PIL import Image

    img = np.array(Image.open(root / "images" / f"{stem}.jpg").convert("RGB"))
    gt = np.array(Image.open(root / "labels" / f"{stem}.png"))
    assert gt.shape == img.shape[:2]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), gt


def per_image_matching_scores(pairs: list[tuple[np.ndarray, np.ndarray]],
                              ignore: tuple[int, ...]) -> tuple[float, float]:
    """mIoU and pixel accuracy (%) of ``(prediction, ground truth)`` pairs under README's
    per-image matching protocol, written from that text with numpy and
    ``scipy.optimize.linear_sum_assignment`` only (no ``clasp_torch``).

    Per image, on its labelled pixels: the cluster x class overlap, a one-to-one assignment
    maximising it, pairs of zero overlap dropped; each pixel predicts its cluster's class or
    nothing. tp/fp/fn and correct/total summed over the images; mIoU over the classes present
    in the ground truth."""
    from collections import Counter

    from scipy.optimize import linear_sum_assignment

    tp: Counter = Counter()
    fp: Counter = Counter()
    fn: Counter = Counter()
    correct = total = 0
    for pred, gt in pairs:
        keep = ~np.isin(gt, ignore)
        p, g = np.asarray(pred)[keep].astype(np.int64), gt[keep].astype(np.int64)
        clusters, ci = np.unique(p, return_inverse=True)
        classes, gi = np.unique(g, return_inverse=True)
        overlap = np.zeros((len(clusters), len(classes)), np.int64)
        np.add.at(overlap, (ci, gi), 1)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        to_class = np.full(len(clusters), -1, np.int64)
        for r, c in zip(rows, cols):
            if overlap[r, c] > 0 and clusters[r] >= 0:
                to_class[r] = classes[c]
        said = to_class[ci]
        for c in classes:
            tp[c] += int(np.sum((said == c) & (g == c)))
            fp[c] += int(np.sum((said == c) & (g != c)))
            fn[c] += int(np.sum((said != c) & (g == c)))
        correct += int(np.sum(said == g))
        total += int(g.size)
    present = [c for c in tp.keys() | fn.keys() if tp[c] + fn[c] > 0]
    miou = float(np.mean([tp[c] / (tp[c] + fp[c] + fn[c]) for c in present]))
    return 100 * miou, 100 * correct / total


def photo(seed: int, h: int = 96, w: int = 128):
    """A small blocky 'photo' (PIL RGB) with a few regions and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    cols = rng.uniform(0, 255, (4, 3))
    yy, xx = np.mgrid[:h, :w]
    region = (yy > h * rng.uniform(0.3, 0.7)).astype(int) * 2 + (xx > w * rng.uniform(0.3, 0.7)).astype(int)
    img[:] = cols[region]
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))
