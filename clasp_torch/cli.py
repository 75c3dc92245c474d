"""Command line: ``clasp segment``, ``clasp proposals``, ``clasp demo``, ``clasp eval`` (the last two in
:mod:`clasp_torch.cli_eval`; shared helpers in :mod:`clasp_torch.cli_common`).

User errors (missing weights, bad arguments, unreadable inputs) are reported in one
paragraph or one line per input, never as a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_common import (  # noqa: F401  (re-exported: tests and users import them from here)
    CLIError,
    build_model,
    default_batch_size,
    device_args,
    prepare_out_dir,
    quiet_third_party,
)
from .cli_eval import cmd_demo, cmd_eval, demo_images  # noqa: F401

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------- segment
def _previous_failures(report_path: Path) -> set[str]:
    try:
        rep = json.loads(report_path.read_text(encoding="utf-8"))
        return {str(f["path"]) for f in rep.get("failures", []) if "path" in f}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def _segment_config(args: argparse.Namespace, dev: dict[str, Any]) -> Any:
    from .segment_run import SegmentConfig

    if args.format == "parquet":
        for mod in ("pyarrow", "pycocotools"):
            try:
                __import__(mod)
            except ImportError:
                raise CLIError(f"--format parquet needs the package {mod}: "
                               "pip install 'clasp-torch[collection]'") from None
    return SegmentConfig(
        inputs=list(args.inputs), out=args.out, format=args.format,
        overlays=not args.no_overlay and args.format == "png",
        stats_json=args.json_stats, embeddings=args.embeddings, resume=args.resume, batch_size=args.batch_size,
        num_workers=args.num_workers, writer_threads=args.writer_threads, gpu_decode=args.gpu_decode,
        accelerator=dev["accelerator"], devices=dev["devices"], strategy=args.strategy, num_nodes=args.num_nodes,
        progress=not args.quiet,
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from .inputs import plan_inputs
    from .segment_run import build_segment_run
    from .viz import atomic_write_bytes
    from .writers import read_logs

    out = Path(args.out)
    dev = device_args(args.device, args.devices)  # before the (slow) model build
    if args.gpu_decode and dev["accelerator"] != "gpu":
        print("--gpu-decode: no CUDA device in this run; decoding on the CPU", file=sys.stderr)
        args.gpu_decode = False
    plan = plan_inputs(args.inputs, out)
    _refuse_collisions(plan)
    prepare_out_dir(out)
    cfg = _segment_config(args, dev)
    # in a Parquet folder the report is "_clasp_report.json": readers skip "_" and "." files
    default_report = "_clasp_report.json" if args.format == "parquet" else "clasp_report.json"
    report_path = Path(args.report) if args.report else out / default_report
    if plan.excluded:
        print(f"left out {plan.excluded} file(s) under the output folder {out}", file=sys.stderr)
    for m in plan.missing:
        print(f"failed {m['path']}: {m['error']}", file=sys.stderr)
    model = build_model(args, None if args.no_crf else "crf")
    try:
        run = build_segment_run(cfg, model, plan)
    except Exception as exc:  # Lightning's MisconfigurationException, ValueError, ...
        raise CLIError(f"invalid --strategy/--devices/--num-nodes settings: {exc}") from None
    n_skipped = run.n_skipped
    if args.resume:
        _announce_resume(run, plan, report_path)
    failures: list[dict[str, Any]] = list(plan.missing)
    n_ok = n_shard_samples = 0
    t0 = time.perf_counter()
    rank = 0
    interrupted = False
    if run.has_work:
        run.run()
        interrupted = run.interrupted
        trainer = run.trainer
        rank = trainer.global_rank
        if trainer.world_size > 1 and not interrupted:
            trainer.strategy.barrier()
        recs = read_logs(out)
        file_paths = {f.path for f in plan.files}
        n_shard_samples = sum(1 for r in recs if r.get("path") not in file_paths)
        n_ok = sum(1 for r in recs if r.get("ok"))
        failures += [r for r in recs if not r.get("ok")]
    if rank != 0:
        if interrupted:
            raise KeyboardInterrupt
        return 0
    dt = time.perf_counter() - t0
    report = {
        "inputs": len(plan.files) + len(plan.missing) + n_shard_samples,
        "skipped_existing": n_skipped,
        "excluded_under_out": plan.excluded,
        "processed": n_ok + len(failures),
        "ok": n_ok,
        "failed": len(failures),
        "failures": failures,
        "interrupted": interrupted,
        "seconds": round(dt, 2),
        "backbone": model.backbone.name,
        "crf": not args.no_crf,
        "format": args.format,
    }
    try:
        atomic_write_bytes(report_path, json.dumps(report, indent=1).encode())
    except OSError as exc:
        raise CLIError(f"cannot write the report {str(report_path)!r}: {exc.strerror or exc}") from None
    _print_summary(out, report, report_path, n_skipped)
    if interrupted:
        raise KeyboardInterrupt
    return 1 if failures else 0


def _refuse_collisions(plan: Any) -> None:
    """A ``CLIError`` listing every output name that more than one input would write."""
    if plan.collisions:
        lines = "\n".join(f"  {c}" for c in plan.collisions)
        raise CLIError(
            f"{len(plan.collisions)} output name(s) would be written by more than one input (names are paths "
            f"relative to the inputs' common folder, suffix dropped); rename or give them in separate runs:\n{lines}"
        )


def _announce_resume(run: Any, plan: Any, report_path: Path) -> None:
    """What ``--resume`` skips and what it retries (on stderr)."""
    print(f"--resume: {run.n_skipped} of {len(plan.files)} file inputs already have outputs; skipping them"
          + (f"; {len(run.data.skip_parts)} of {len(plan.shards)} shards done" if plan.shards else ""),
          file=sys.stderr)
    retried = len(_previous_failures(report_path) & {f.path for f in plan.files})
    if retried:
        print(f"--resume: retrying {retried} input(s) that failed in the previous run", file=sys.stderr)


def _print_summary(out: Path, report: dict[str, Any], report_path: Path, n_skipped: int) -> None:
    """The one-line summary of a ``segment`` run, its failures and where the report is (stderr)."""
    failures = report["failures"]
    skipped = f", {n_skipped} skipped (--resume)" if n_skipped else ""
    print(f"segmented {report['ok']} image(s) into {out} in {report['seconds']:.1f}s; {len(failures)} failed{skipped}",
          file=sys.stderr)
    if failures:
        print("failed inputs:", file=sys.stderr)
        for f in failures:
            print(f"  {f['path']}: {f['error']}", file=sys.stderr)
    if failures or report["interrupted"]:
        print(f"report: {report_path}", file=sys.stderr)


# ----------------------------------------------------------------------------------- proposals
def cmd_proposals(args: argparse.Namespace) -> int:
    """``clasp proposals``: instance proposals of every input, one COCO-format dataset file."""
    from .inputs import plan_inputs
    from .proposal_run import ProposalConfig, assemble_dataset, build_proposal_run

    try:
        __import__("pycocotools")
    except ImportError:
        raise CLIError("clasp proposals needs the package pycocotools: "
                       "pip install 'clasp-torch[collection]'") from None
    out = Path(args.out)
    dev = device_args(args.device, args.devices)
    plan = plan_inputs(args.inputs, None)
    if plan.collisions:
        lines = "\n".join(f"  {c}" for c in plan.collisions)
        raise CLIError(f"{len(plan.collisions)} image name(s) are claimed by more than one input (names are paths "
                       "relative to the inputs' common folder, suffix dropped); rename or give them in separate "
                       f"runs:\n{lines}")
    prepare_out_dir(out.parent if str(out.parent) else Path("."))
    for m in plan.missing:
        print(f"failed {m['path']}: {m['error']}", file=sys.stderr)
    model = build_model(args, None if args.no_crf else "crf", keep_band_labels=True)  # every K of the band
    cfg = ProposalConfig(
        inputs=list(args.inputs), out=str(out), max_per_image=args.max_per_image, min_area=args.min_area,
        refine_band=not (args.no_crf or args.no_band_crf),
        options={"iou_threshold": args.iou_threshold, "components_backend": args.components_backend},
        band={"max_pixels": args.band_crf_pixels, "max_maps": args.band_maps},
        batch_size=args.batch_size, num_workers=args.num_workers, accelerator=dev["accelerator"],
        devices=dev["devices"],
        strategy=args.strategy, num_nodes=args.num_nodes, progress=not args.quiet,
    )
    try:
        run = build_proposal_run(cfg, model, plan)
    except Exception as exc:  # Lightning's MisconfigurationException, ValueError, ...
        raise CLIError(f"invalid --strategy/--devices/--num-nodes settings: {exc}") from None
    t0 = time.perf_counter()
    run.run()
    trainer = run.trainer
    if trainer.world_size > 1 and not run.interrupted:
        trainer.strategy.barrier()
    if trainer.global_rank != 0:
        if run.interrupted:
            raise KeyboardInterrupt
        return 0
    parts = sorted(out.parent.glob(f".{out.name}.part*.jsonl"))
    if run.interrupted:
        for p in parts:
            p.unlink(missing_ok=True)
        raise KeyboardInterrupt
    info = {"description": "CLASP instance proposals (class-agnostic pseudo-labels)", "backbone": model.backbone.name,
            "crf": not args.no_crf, "band_crf": cfg.refine_band, "max_per_image": args.max_per_image,
            "min_area": args.min_area, "iou_threshold": args.iou_threshold,
            **({"band": cfg.band} if cfg.refine_band else {})}
    try:
        summary = assemble_dataset(out, parts, info=info)
    except OSError as exc:
        raise CLIError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    failures = list(plan.missing) + summary["failures"]
    dt = time.perf_counter() - t0
    print(f"wrote {summary['annotations']} proposals of {summary['images']} image(s) to {out} in {dt:.1f}s; "
          f"{len(failures)} failed", file=sys.stderr)
    if failures:
        print("failed inputs:", file=sys.stderr)
        for f in failures:
            print(f"  {f['path']}: {f['error']}", file=sys.stderr)
    return 1 if failures else 0


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
    p.add_argument("--preset", default="paper", choices=["paper", "best", "fast"],
                   help="named settings (clasp_torch.presets): paper (default, the paper's pipeline), best (guided "
                        "feature smoothing, chosen on the dev sets with the stand-in backbone), fast (Gaussian "
                        "smoothing + one short k-means run: 3-4x less clustering time, within 0.3 mIoU of paper)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _scale(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: 1 on a CPU, where batches only add padding; 8 on a GPU)")
    p.add_argument("--num-workers", type=_workers, default="auto",
                   help="DataLoader worker processes that decode the inputs (default auto: min(8, usable CPUs - 1); "
                        "with at most 2 usable CPUs, 2 decode threads in the main process instead)")
    p.add_argument("--devices", type=int, default=None, help="number of devices (processes) per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF (the paper's patch variant)")
    p.add_argument("--crf-max-pixels", type=int, default=None,
                   help="working-resolution cap of the CRF: larger images are refined downscaled to this many "
                        "pixels and brought back to their size (default 2**19 = 524,288: every dev-set image "
                        "untouched)")
    p.add_argument("--fixed-k", type=int, default=None, help="fixed number of segments instead of adaptive K")
    p.add_argument("--k-selector", default="eigengap", choices=["eigengap", "entropy"])


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clasp", description="CLASP: training-free per-image segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment images or folders of images")
    s.add_argument("inputs", nargs="+",
                   help="image files, folders (searched recursively), .tar shards (WebDataset layout) and @LIST files "
                        "(one path per line)")
    s.add_argument("--out", required=True,
                   help="output folder: <name>.png label maps and <name>_overlay.jpg, or part-NNNNN.parquet")
    s.add_argument("--format", default="png", choices=["png", "parquet"],
                   help="png: a label PNG (+ overlay) per input; parquet: one row per input with COCO RLE segments, "
                        "one part per shard or per 10,000 files")
    s.add_argument("--embeddings", action="store_true", help="parquet: each segment's mean patch feature")
    s.add_argument("--writer-threads", type=int, default=None,
                   help="threads that encode and write outputs (default: min(8, max(2, usable CPUs)) for png, "
                        "1 for parquet, whose row encoder holds the GIL; 0: in the predict loop)")
    s.add_argument("--gpu-decode", action="store_true", help="decode JPEG inputs on the GPU (torchvision, CUDA only)")
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
    pr = sub.add_parser("proposals",
                        help="instance proposals of images as a COCO-format dataset (class-agnostic pseudo-labels)")
    pr.add_argument("inputs", nargs="+", help="image files, folders, .tar shards and @LIST files, as in clasp segment")
    pr.add_argument("--out", required=True, help="the COCO dataset file to write, e.g. proposals.json")
    pr.add_argument("--max-per-image", type=int, default=100, help="best proposals kept per image (default 100)")
    pr.add_argument("--min-area", type=int, default=64,
                    help="fragments below this many pixels are merged into a neighbour (default 64)")
    pr.add_argument("--iou-threshold", type=float, default=0.8,
                    help="mask IoU above which a lower-scored proposal is dropped (default 0.8)")
    pr.add_argument("--band-crf-pixels", type=int, default=2**14,
                    help="working resolution of the CRF on the other K of the band (default 16384 pixels)")
    pr.add_argument("--band-maps", type=int, default=None,
                    help="refine at most this many K of each band, evenly spaced (default: all; fewer is faster)")
    pr.add_argument("--no-band-crf", action="store_true",
                    help="take the other K of the band as upsampled patch labels (no CRF; fastest)")
    pr.add_argument("--components-backend", default="torch", choices=["torch", "kornia"],
                    help="connected components: torch (one pass over each label map; default) or kornia "
                         "(kornia.contrib.connected_components_union_find on one binary plane per label; "
                         "the same result, 11-52x slower on a CPU)")
    _common(pr)
    _scale(pr)
    pr.set_defaults(func=cmd_proposals)
    return parser


_MINIMA: tuple[tuple[str, int], ...] = (
    ("batch_size", 1),
    ("max_patches", 4),
    ("fixed_k", 2),
    ("crf_max_pixels", 1),
    ("writer_threads", 0),
    ("devices", 1),
    ("num_nodes", 1),
    ("limit", 1),
    ("max_per_image", 1),
    ("min_area", 0),
    ("band_maps", 1),
    ("band_crf_pixels", 1),
)
"""The smallest value each numeric flag accepts (checked in :func:`main`)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "batch_size") and args.batch_size is None:
        args.batch_size = default_batch_size(args.device)
    for dest, low in _MINIMA:  # flags absent from a command, or left at None, are not checked
        value = getattr(args, dest, None)
        if value is not None and value < low:
            parser.error(f"--{dest.replace('_', '-')} must be >= {low}")
    try:
        with quiet_third_party():
            return int(args.func(args))
    except CLIError as exc:
        print(f"clasp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clasp {args.command}: interrupted; outputs written so far are complete (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
