"""``torch.profiler`` trace of one CLASP batch, plus backbone variants (torch.compile, autocast).

* One warm-up batch, then one profiled batch through the stage decomposition of
  ``benchmarks/run.py`` (backbone → affinity+eigen → elbow → kmeans → silhouette → select → crf),
  each stage inside ``torch.profiler.record_function("clasp/<stage>")`` and, on CUDA, an NVTX range
  of the same name (visible in Nsight Systems: ``nsys profile -t cuda,nvtx python -m benchmarks.profile_gpu``).
  The Chrome trace goes to ``<out-dir>/trace.json`` (open in chrome://tracing or ui.perfetto.dev);
  the operator table (top ops by self time) is printed and saved to ``profile_ops.txt``.
* Backbone timing (``CLASP.extract_features`` of the batch, median of ``--repeats``): eager fp32;
  eager under ``--amp`` autocast (bf16/fp16: ``CLASP(amp_dtype=...)``); with ``--compile``, the
  backbone wrapped in ``torch.compile`` (fp32 and, if requested, under autocast). Only the backbone
  runs in reduced precision: the Gram matrix and its ``eigh`` are float64, k-means and the
  silhouette float32, the CRF float32 (see ``clasp_torch/spectral.py`` / ``cluster.py``).

    python -m benchmarks.profile_gpu [--device cuda|cpu] [--batch-size 32] [--compile] [--amp bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import (
    OUT_DIR,
    STAGES,
    describe,
    load_images,
    machine_description,
    run_stages,
    thread_limits,
    timed,
)


def stage_label(device: torch.device) -> Callable[[str], Any]:
    """``record_function`` (+ NVTX range on CUDA) context factory for a stage name."""

    @contextlib.contextmanager
    def label(name: str):
        with torch.profiler.record_function(f"clasp/{name}"):
            if device.type == "cuda":
                torch.cuda.nvtx.range_push(f"clasp/{name}")
                try:
                    yield
                finally:
                    torch.cuda.nvtx.range_pop()
            else:
                yield

    return label


def time_backbone(model: Any, imgs: list[torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of ``model.extract_features(imgs)`` after one warm-up call."""
    model.extract_features(imgs)
    ts = [timed(lambda: model.extract_features(imgs), device)[1] for _ in range(repeats)]
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 2 on CPU")
    ap.add_argument("--backbone", default=None, help="default dinov2_vits14_reg on CUDA, efficientnet_lite0 on CPU")
    ap.add_argument("--pretrained", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"), help="default 640 480")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd backbone")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=OUT_DIR)
    args = ap.parse_args(argv)
    with thread_limits(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    from clasp_torch.pipeline import CLASP

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    bs = args.batch_size or (32 if device.type == "cuda" else 2)
    backbone = args.backbone or ("dinov2_vits14_reg" if device.type == "cuda" else "efficientnet_lite0")
    pretrained = args.pretrained == "yes" or (args.pretrained == "auto" and not backbone.startswith("dinov2"))
    size = tuple(args.size or (640, 480))
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    os.makedirs(args.out_dir, exist_ok=True)

    torch.manual_seed(0)
    model = CLASP(backbone, pretrained=pretrained, amp_dtype=amp).to(device).eval()
    if args.no_crf:
        model.refiner = None
    imgs = [im.to(device) for im in load_images(bs, size)[0]]
    machine = machine_description(device)
    print(describe(machine), flush=True)
    weights = "pretrained" if pretrained else "random weights"
    print(f"batch {bs} x {size[0]}x{size[1]}, backbone {backbone} ({weights}), amp={args.amp}, device {device}",
          flush=True)

    # ---- profiled batch ------------------------------------------------------------------------
    label = stage_label(device)
    run_stages(model, imgs, device)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False, profile_memory=True) as prof:
        with label("batch"):
            stage_t, info = run_stages(model, imgs, device, label=label)
    trace = os.path.join(args.out_dir, "trace.json")
    prof.export_chrome_trace(trace)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=25)
    with open(os.path.join(args.out_dir, "profile_ops.txt"), "w") as fh:
        fh.write(table)
    print(table)
    print("profiled batch, ms per stage (whole batch, profiler overhead included): "
          + ", ".join(f"{s} {1000 * stage_t[s]:.1f}" for s in STAGES), flush=True)
    print(f"wrote {trace}", flush=True)

    # ---- backbone variants ---------------------------------------------------------------------
    bb_times: dict[str, float] = {}
    model.amp_dtype = None
    bb_times["eager fp32"] = time_backbone(model, imgs, device, args.repeats)
    if amp is not None:
        model.amp_dtype = amp
        bb_times[f"eager {args.amp}"] = time_backbone(model, imgs, device, args.repeats)
    compile_error = None
    if args.compile:
        eager_bb = model.backbone
        try:
            model.backbone = torch.compile(eager_bb, mode=args.compile_mode, dynamic=False)
            model.amp_dtype = None
            bb_times["compiled fp32"] = time_backbone(model, imgs, device, args.repeats)
            if amp is not None:
                model.amp_dtype = amp
                bb_times[f"compiled {args.amp}"] = time_backbone(model, imgs, device, args.repeats)
        except Exception as e:  # inductor needs a C++ compiler / Triton; report instead of failing
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"torch.compile failed: {compile_error}", flush=True)
        finally:
            model.backbone = eager_bb
    model.amp_dtype = amp
    for k_, v in bb_times.items():
        print(f"backbone {k_}: {1000 * v:.1f} ms per batch of {bs} ({1000 * v / bs:.2f} ms/image, "
              f"{bs / v:.1f} images/s)", flush=True)
    summary = {"machine": machine, "batch_size": bs, "backbone": backbone, "pretrained": pretrained, "size": list(size),
               "amp": args.amp, "stage_ms_profiled": {s: 1000 * v for s, v in stage_t.items()},
               "backbone_ms_per_batch": {k_: 1000 * v for k_, v in bb_times.items()}, "compile_error": compile_error,
               "trace": trace, "k": info.get("k"), "k_opt": info.get("k_opt")}
    if device.type == "cuda":
        summary["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    with open(os.path.join(args.out_dir, "profile_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    return summary


if __name__ == "__main__":
    main()
