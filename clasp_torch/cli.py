"""Command line: ``clasp segment``, ``clasp demo``, ``clasp eval``.

User errors (missing weights, bad arguments, unreadable inputs) are reported in one
paragraph or one line per input, never as a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """An error explained to the user in one paragraph (exit code 2)."""


# ----------------------------------------------------------------------------------- helpers
def _device_args(device: str, devices: int | None) -> dict[str, Any]:
    import torch

    dev = device.lower()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device} was requested but no CUDA GPU is available; use --device cpu")
        if ":" in dev:
            return {"accelerator": "gpu", "devices": [int(dev.split(":")[1])]}
        return {"accelerator": "gpu", "devices": devices or 1}
    if dev == "cpu":
        return {"accelerator": "cpu", "devices": devices or 1}
    raise CLIError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")


def default_batch_size(device: str) -> int:
    """1 on a CPU (the clustering problems of a batch are padded, so batching costs time there), 8
    on a GPU (``device``: auto, cpu, cuda or cuda:N)."""
    import torch

    dev = device.lower()
    on_gpu = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    return 8 if on_gpu else 1


def _build_model(args: argparse.Namespace, refiner: str | None):
    from .backbones import WeightsUnavailableError
    from .pipeline import CLASP

    try:
        return CLASP(
            args.backbone,
            weights=args.weights,
            refiner=refiner,
            max_patches=args.max_patches,
            fixed_k=getattr(args, "fixed_k", None),
            seed=args.seed,
            k_selector=getattr(args, "k_selector", "eigengap"),
        )
    except WeightsUnavailableError as exc:
        raise CLIError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], str | None, list[dict[str, str]]]:
    """Expand files and folders into image paths.

    Returns ``(paths, root, missing)``: ``root`` is the common folder when a single folder was
    given (outputs then mirror its sub-folders), ``missing`` lists inputs that do not exist.
    """
    from .data import IMAGE_EXTENSIONS, ImageFolder

    paths: list[str] = []
    missing: list[dict[str, str]] = []
    root = None
    dirs = [p for p in inputs if Path(p).is_dir()]
    if len(dirs) == 1 and len(inputs) == 1:
        root = dirs[0]
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            try:
                paths.extend(ImageFolder(path, on_error="return").paths)
            except ValueError:
                missing.append({"path": p, "error": f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"})
        elif path.exists():
            paths.append(str(path))
        else:
            missing.append({"path": p, "error": "no such file or folder"})
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    return unique, root, missing


class PathDataset:
    """Map-style dataset over explicit image paths; unreadable files become error items."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from .data import ImageLoadError, load_image

        path = self.paths[index]
        try:
            return {"image": load_image(path), "path": path, "index": index}
        except ImageLoadError as exc:
            return {"image": None, "path": path, "index": index, "error": exc.reason}
        except OSError as exc:  # permissions, vanished files
            return {"image": None, "path": path, "index": index, "error": f"cannot read: {exc.strerror or exc}"}


# ----------------------------------------------------------------------------------- segment
_TMP_PATTERNS = (".*.png.*.tmp", ".*.jpg.*.tmp", ".*.json.*.tmp")


def _prepare_out_dir(out: Path) -> None:
    """Create the output folder and make sure files can be written in it (else CLIError)."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clasp_write_test.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"cannot write to the output folder {str(out)!r}: {exc.strerror or exc}") from None


def _previous_failures(report_path: Path) -> set[str]:
    try:
        rep = json.loads(report_path.read_text(encoding="utf-8"))
        return {str(f["path"]) for f in rep.get("failures", []) if "path" in f}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def _run_predict(trainer: Any, predictor: Any, loader: Any) -> None:
    """``trainer.predict`` where Ctrl-C raises KeyboardInterrupt (Lightning turns it into exit 1)."""
    import signal

    old_handler = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*predict_dataloader.*")
            trainer.predict(predictor, loader, return_predictions=False)
    except SystemExit:
        if trainer.interrupted:  # Lightning caught a KeyboardInterrupt and called sys.exit(1)
            raise KeyboardInterrupt from None
        raise
    finally:
        # Lightning ignores SIGINT after an interrupt; give the caller its handler back.
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def cmd_segment(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from .data import collate_images
    from .lightning import CLASPPredictor, SegmentationWriter, output_stem, read_logs
    from .viz import atomic_write_bytes

    out = Path(args.out)
    dev = _device_args(args.device, args.devices)  # before the (slow) model build
    _prepare_out_dir(out)
    report_path = Path(args.report) if args.report else out / "clasp_report.json"
    paths, root, missing = collect_inputs(args.inputs)
    n_found = len(paths) + len(missing)
    n_skipped = 0
    if args.resume:
        for pattern in _TMP_PATTERNS:  # temporaries of a run that was killed hard (SIGKILL)
            for tmp in out.rglob(pattern):
                try:
                    tmp.unlink()
                except OSError:
                    pass
        before = len(paths)
        paths = [p for p in paths if not (out / f"{output_stem(p, root)}.png").exists()]
        n_skipped = before - len(paths)
        print(f"--resume: {n_skipped} of {before} inputs already have outputs; skipping them", file=sys.stderr)
        retried = len(_previous_failures(report_path) & set(paths))
        if retried:
            print(f"--resume: retrying {retried} input(s) that failed in the previous run", file=sys.stderr)
    for m in missing:
        print(f"failed {m['path']}: {m['error']}", file=sys.stderr)
    model = _build_model(args, None if args.no_crf else "crf")
    predictor = CLASPPredictor(model)
    writer = SegmentationWriter(out, root=root, overlays=not args.no_overlay, stats_json=args.json_stats)
    failures: list[dict[str, Any]] = list(missing)
    n_ok = 0
    t0 = time.perf_counter()
    rank = 0
    interrupted = False
    if paths:
        loader = DataLoader(
            PathDataset(paths), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            collate_fn=collate_images,
        )
        try:
            trainer = pl.Trainer(
                **dev, strategy=args.strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
                callbacks=[writer], enable_progress_bar=not args.quiet, num_nodes=args.num_nodes,
            )
        except Exception as exc:  # Lightning's MisconfigurationException, ValueError, ...
            raise CLIError(f"invalid --strategy/--devices/--num-nodes settings: {exc}") from None
        try:
            _run_predict(trainer, predictor, loader)
        except KeyboardInterrupt:
            interrupted = True
        rank = trainer.global_rank
        if trainer.world_size > 1 and not interrupted:
            trainer.strategy.barrier()
        recs = read_logs(out)
        n_ok = sum(1 for r in recs if r.get("ok"))
        failures += [r for r in recs if not r.get("ok")]
    if rank != 0:
        if interrupted:
            raise KeyboardInterrupt
        return 0
    dt = time.perf_counter() - t0
    report = {
        "inputs": n_found,
        "skipped_existing": n_skipped,
        "processed": n_ok + len(failures),
        "ok": n_ok,
        "failed": len(failures),
        "failures": failures,
        "interrupted": interrupted,
        "seconds": round(dt, 2),
        "backbone": model.backbone.name,
        "crf": not args.no_crf,
    }
    try:
        atomic_write_bytes(report_path, json.dumps(report, indent=1).encode())
    except OSError as exc:
        raise CLIError(f"cannot write the report {str(report_path)!r}: {exc.strerror or exc}") from None
    skipped = f", {n_skipped} skipped (--resume)" if n_skipped else ""
    print(f"segmented {n_ok} image(s) into {out} in {dt:.1f}s; {len(failures)} failed{skipped}", file=sys.stderr)
    if failures:
        print("failed inputs:", file=sys.stderr)
        for f in failures:
            print(f"  {f['path']}: {f['error']}", file=sys.stderr)
    if failures or interrupted:
        print(f"report: {report_path}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    return 1 if failures else 0


# ----------------------------------------------------------------------------------- demo
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
        model = CLASP(args.backbone, weights=args.weights, max_patches=args.max_patches, seed=args.seed)
    except WeightsUnavailableError as exc:
        if args.backbone not in ("dinov2_vits14_reg", "dinov2"):
            raise CLIError(str(exc)) from None
        print(
            "WARNING: DINOv2 weights are not available here (" + str(exc).split(".")[0] + ").\n"
            "WARNING: falling back to the offline stand-in backbone efficientnet_lite0 "
            "(ImageNet EfficientNet-Lite0; NOT the paper's backbone).",
            file=sys.stderr,
        )
        model = CLASP("efficientnet_lite0", max_patches=args.max_patches, seed=args.seed)
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
    model = _build_model(args, None if args.no_crf else "crf")
    predictor = CLASPPredictor(model, num_classes=num_classes)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_images)
    trainer = pl.Trainer(**_device_args(args.device, args.devices), strategy=args.strategy, logger=False,
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
        "patch": {"miou": 100 * res["patch/miou"], "pixel_accuracy": 100 * res["patch/pixel_accuracy"]},
        "mean_k": res["mean_k"], "images_per_s": n / dt if dt > 0 else None, "seconds": dt,
    }
    if not args.no_crf:
        summary["pixel"] = {"miou": 100 * res["pixel/miou"], "pixel_accuracy": 100 * res["pixel/pixel_accuracy"]}
    rows = [("patch", summary["patch"])] + ([("pixel (CRF)", summary["pixel"])] if "pixel" in summary else [])
    print(f"\n{args.dataset} ({n} images, backbone {model.backbone.name}, "
          f"{'fixed K=' + str(args.fixed_k) if args.fixed_k else 'adaptive K'})")
    print(f"{'variant':<12} {'mIoU':>6} {'pix.acc':>8} {'mean K':>7} {'img/s':>6}")
    for name, r in rows:
        print(f"{name:<12} {r['miou']:6.1f} {r['pixel_accuracy']:8.1f} {summary['mean_k']:7.2f} {summary['images_per_s']:6.2f}")
    if args.json:
        from .viz import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(summary, indent=1).encode())
    return 0


# ----------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="dinov2_vits14_reg",
                   help="dinov2_vits14_reg (default, the paper's) or efficientnet_lite0 (offline stand-in)")
    p.add_argument("--weights", default=os.environ.get("CLASP_WEIGHTS"),
                   help="local weights file (DINOv2: Meta's dinov2_vits14_reg4_pretrain.pth or a timm state dict); "
                        "default $CLASP_WEIGHTS")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-patches", type=int, default=2500, help="cap on patches per image (aspect kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _scale(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: 1 on a CPU, where batches only add padding; 8 on a GPU)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--devices", type=int, default=None, help="number of devices (processes) per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF (the paper's patch variant)")
    p.add_argument("--fixed-k", type=int, default=None, help="fixed number of segments instead of adaptive K")
    p.add_argument("--k-selector", default="eigengap", choices=["eigengap", "entropy"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clasp", description="CLASP: training-free per-image segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment images or folders of images")
    s.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    s.add_argument("--out", required=True, help="output folder: <stem>.png label maps and <stem>_overlay.jpg")
    s.add_argument("--no-overlay", action="store_true", help="write label maps only")
    s.add_argument("--json-stats", action="store_true", help="also write <stem>.json with per-segment boxes/areas")
    s.add_argument("--resume", action="store_true", help="skip inputs whose label map already exists")
    s.add_argument("--report", default=None, help="JSON report path (default OUT/clasp_report.json)")
    _common(s)
    _scale(s)
    s.set_defaults(func=cmd_segment)
    d = sub.add_parser("demo", help="segment a few real photos from skimage.data into a contact sheet")
    d.add_argument("--out", default="clasp_demo")
    _common(d)
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help="evaluate on a labelled dataset (ROOT/images, ROOT/labels)")
    e.add_argument("--dataset", required=True, choices=["cocostuff", "ade20k"])
    e.add_argument("--root", required=True)
    e.add_argument("--coarse", action="store_true", help="COCO-Stuff 27 coarse classes")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--json", default=None, help="write the results as JSON")
    _common(e)
    _scale(e)
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "batch_size") and args.batch_size is None:
        args.batch_size = default_batch_size(args.device)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    if getattr(args, "max_patches", 4) < 4:
        parser.error("--max-patches must be >= 4")
    if getattr(args, "fixed_k", None) is not None and args.fixed_k < 2:
        parser.error("--fixed-k must be >= 2")
    if getattr(args, "num_workers", 0) < 0:
        parser.error("--num-workers must be >= 0")
    if getattr(args, "devices", None) is not None and args.devices < 1:
        parser.error("--devices must be >= 1")
    if getattr(args, "num_nodes", 1) < 1:
        parser.error("--num-nodes must be >= 1")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"clasp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clasp {args.command}: interrupted; outputs written so far are complete (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
