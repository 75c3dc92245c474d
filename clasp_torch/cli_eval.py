"""``clasp demo`` (bundled photos) and ``clasp eval`` (a labelled dataset, paper metrics)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .cli_common import CLIError, build_model, device_args

__all__ = ["cmd_demo", "cmd_eval", "demo_images"]


def demo_images() -> dict[str, Any]:
    """A few real photos from ``skimage.data`` as uint8 ``(3, H, W)`` tensors."""
    import numpy as np
    import torch
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        arr = np.asarray(getattr(data, name)())
        out[name] = torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1).contiguous()
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from .backbones import WeightsUnavailableError
    from .pipeline import CLASP
    from .viz import overlay, save_image_atomic

    out = Path(args.out)
    try:
        model = CLASP(args.backbone, weights=args.weights, max_patches=args.max_patches, seed=args.seed,
                      preset=args.preset)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except WeightsUnavailableError as exc:
        if args.backbone not in ("dinov2_vits14_reg", "dinov2"):
            raise CLIError(str(exc)) from None
        print(
            "WARNING: DINOv2 weights are not available here (" + str(exc).split(".")[0] + ").\n"
            "WARNING: falling back to the offline stand-in backbone efficientnet_lite0 "
            "(ImageNet EfficientNet-Lite0; NOT the paper's backbone).",
            file=sys.stderr,
        )
        model = CLASP("efficientnet_lite0", max_patches=args.max_patches, seed=args.seed, preset=args.preset)
    import torch

    device = "cuda" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    model = model.to(device)
    imgs = demo_images()
    res = model(list(imgs.values()))
    rows, caps = [], []
    for i, (name, im) in enumerate(imgs.items()):
        coarse = res.coarse_labels[i, : im.shape[1], : im.shape[2]]
        fine = res.label_map(i)
        rows.append([im.permute(1, 2, 0).numpy(), overlay(im, coarse), overlay(im, fine)])
        caps.append(f"{name}: K_opt={int(res.k_opt[i])}, K={int(res.k[i])}  |  input / patch labels / after dense CRF")
        save_image_atomic(Image.fromarray(overlay(im, fine)), out / f"{name}_overlay.jpg", quality=90)
    from .viz import contact_sheet

    sheet = contact_sheet(rows, caps)
    path = out / "demo_contact_sheet.png"
    save_image_atomic(sheet, path)
    print(f"backbone {model.backbone.name}: wrote {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- eval
def _settings_summary(model: Any) -> dict[str, Any]:
    """The resolved settings that differ between presets or that the user set, for the eval report."""
    st = model.settings
    keys = ("preset", "n_init", "max_iter", "tol", "smoothing", "smoothing_sigma", "beta", "fixed_k", "k_selector",
            "max_patches", "seed")
    out = {k: getattr(st, k) for k in keys}
    if st.smoothing == "none":
        out.pop("smoothing_sigma")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Subset

    from .data import SegmentationDataset, collate_images
    from .lightning import CLASPPredictor

    try:
        ds = SegmentationDataset(args.root, dataset=args.dataset, coarse=args.coarse)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if args.limit:
        ds = Subset(ds, range(min(args.limit, len(ds))))  # type: ignore[assignment]
    num_classes = (ds.dataset if isinstance(ds, Subset) else ds).num_classes
    model = build_model(args, None if args.no_crf else "crf")
    predictor = CLASPPredictor(model, num_classes=num_classes)
    from .segment_run import default_num_workers

    workers = default_num_workers() if args.num_workers == "auto" else args.num_workers
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_images)
    trainer = pl.Trainer(**device_args(args.device, args.devices), strategy=args.strategy, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.quiet)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        res = trainer.test(predictor, loader, verbose=False)[0]
    dt = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return 0
    n = int(res["n_images"])
    summary: dict[str, Any] = {
        "dataset": args.dataset, "root": str(args.root), "images": n, "backbone": model.backbone.name,
        "fixed_k": args.fixed_k, "k_selector": args.k_selector, "coarse": args.coarse,
        "preset": args.preset, "settings": _settings_summary(model),
        "patch": {"miou": 100 * res["patch/miou"], "pixel_accuracy": 100 * res["patch/pixel_accuracy"]},
        "mean_k": res["mean_k"], "images_per_s": n / dt if dt > 0 else None, "seconds": dt,
    }
    if not args.no_crf:
        summary["pixel"] = {"miou": 100 * res["pixel/miou"], "pixel_accuracy": 100 * res["pixel/pixel_accuracy"]}
    rows = [("patch", summary["patch"])] + ([("pixel (CRF)", summary["pixel"])] if "pixel" in summary else [])
    print(f"\n{args.dataset} ({n} images, backbone {model.backbone.name}, "
          f"{'fixed K=' + str(args.fixed_k) if args.fixed_k else 'adaptive K'})")
    print("settings (preset " + repr(args.preset) + "): "
          + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()))
    print(f"{'variant':<12} {'mIoU':>6} {'pix.acc':>8} {'mean K':>7} {'img/s':>6}")
    for name, r in rows:
        print(f"{name:<12} {r['miou']:6.1f} {r['pixel_accuracy']:8.1f} {summary['mean_k']:7.2f} "
              f"{summary['images_per_s']:6.2f}")
    if args.json:
        from .viz import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(summary, indent=1).encode())
    return 0


