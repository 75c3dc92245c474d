"""Per-stage and end-to-end timing of the CLASP pipeline, against the literal CPU reference.

For each batch size (default 1, 8, 32) the same real images (COCO-Stuff dev photos resized to
640x480; skimage photos when the data folder is missing) go through:

==================  =====================================================================
stage               what is timed
==================  =====================================================================
backbone            ``CLASP.extract_features`` (resize + normalise + backbone forward)
cluster_features    ``CLASP.cluster_features`` as one call: the authoritative spectral+clustering
                    figure (used for the ratios); the rows below break it down
affinity+eigen      patch reordering of ``cluster_features`` + ``spectral_decomposition``
                    (Gram path: ``F̂ᵀF̂`` and ``eigh`` in float64)
elbow               ``eigengap_elbow`` + ``k_band``
kmeans              ``clasp_torch.cluster.kmeans`` on exactly the (image, K) problems that
                    ``select_k`` builds (all K of all bands, restarts batched)
silhouette          ``clasp_torch.cluster.silhouette_score`` on the same problems and the
                    k-means labels (called separately, *not* select_k minus k-means)
select              best K per image + scatter back to the grid + nearest upsampling
crf                 the pipeline's refiner (``model.refiner``: the torch dense CRF)
whole (CRF)         ``CLASP.forward`` with the CRF refiner, end to end
whole (no CRF)      ``CLASP.forward`` with ``refiner=None`` (patch variant)
==================  =====================================================================

The stage decomposition re-implements ``CLASP.cluster_features`` / ``select_k`` call by call (no
``max_problems`` chunking; the library's cheap guards for degenerate images -- distinct-row cap on K,
single-direction / uniform images -- are left out, they only change K on degenerate inputs) and checks
that it gives the same K as ``forward`` (column "K same as stages").

Every figure is the median over ``--repeats`` timed runs after one warm-up run; on CUDA
``torch.cuda.synchronize()`` precedes every clock read. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process RSS high-water mark (sampled every
2 ms by a background thread, reported above the RSS before the call) on the CPU.

The literal reference (``benchmarks/reference.py``: numpy ``eigh`` + sklearn ``KMeans(n_init=10)``
+ ``silhouette_score`` per K, then ``pydensecrf_refine``) runs in the same process on the very same
backbone features of the very images ours was timed on (all ``--images`` by default), right after
each batch size, warmed up like ours (one untimed pass on the first image) and timed the same way:
the median over ``--repeats`` passes of the pass's total divided by the number of images. Beside
it, the *Gram-path reference* runs on the same features: the same numpy/sklearn code, except that
the spectrum comes from ``eigh`` of the ``D x D`` Gram matrix (``reference_clasp(eigen="gram")``,
the algebra clasp_torch uses), so its ratio shows what the torch clustering stages gain by
themselves. Ratios printed:

* spectral+clustering: reference ``reference_clasp`` per image / ours ``CLASP.cluster_features``
  per image (and the same with the Gram-path reference);
* whole pipeline with CRF: (backbone per image [ours, shared] + ``reference_clasp`` + nearest
  upsampling + ``pydensecrf_refine``) / ours ``forward`` with CRF per image.

With ``--ref-images R`` below the number of timed images (to save time, e.g. on a GPU machine whose
CPU runs the reference), ours is timed a second time on those first R images (in batches of the
batch size; batch sizes above R get no ratio), so that a ratio always compares the same images.

Usage::

    python -m benchmarks.run [--device cpu|cuda] [--batch-sizes 1 8 32]
        [--backbone efficientnet_lite0|dinov2_vits14_reg] [--images N] [--repeats R] [--quick]
        [--csv out.csv] [--markdown] [--json out.json]
"""


from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# The harness lives in benchmarks.harness; these names stay importable from benchmarks.run (other
# scripts and helpers import them from here).
from benchmarks.harness import (  # noqa: F401
    DEFAULT_IMAGE_DIR,
    OUT_DIR,
    REFERENCE_VARIANTS,
    ROOT,
    SHARED_DATA,
    SPECTRAL_STAGES,
    STAGES,
    PeakMemory,
    PeakRSS,
    TensorPeak,
    describe,
    kmeans_of,
    load_images,
    machine_description,
    makedirs_for,
    pinned_cluster_policy,
    probe_stages,
    problems_of,
    run_reference,
    run_stages,
    silhouette_of,
    sync,
    tensor_peak,
    thread_limits,
    timed,
    write_outputs,
)

CSV_COLUMNS = ["device", "backbone", "batch_size", "n_images", *[f"{s}_ms" for s in STAGES], "cluster_features_ms",
               "whole_crf_ms", "images_per_s_crf", "peak_mem_crf_mib", "whole_nocrf_ms", "images_per_s_nocrf",
               "peak_mem_nocrf_mib", "ratio_spectral_cluster", "ratio_whole_crf", "k_consistent",
               "ratio_spectral_cluster_gram", "ratio_whole_crf_gram"]


@dataclass
class BatchResult:
    batch_size: int
    n_images: int
    stage_ms_per_image: dict[str, float]
    whole_crf_ms_per_image: float
    whole_nocrf_ms_per_image: float
    images_per_s_crf: float
    images_per_s_nocrf: float
    peak_mem_crf_mib: float
    peak_mem_nocrf_mib: float
    k_consistent: bool
    spectral_cluster_ms_per_image: float = 0.0  # CLASP.cluster_features, timed as one call
    extras: dict[str, Any] = field(default_factory=dict)


class _WholeRuns:
    """``CLASP.forward`` over all batches, with one refiner: summed seconds per pass, the largest
    peak memory (absolute and above the entry level) over the passes, the last output."""

    def __init__(self, model: Any, batches: list[list[torch.Tensor]], device: torch.device) -> None:
        self.model, self.batches, self.device = model, batches, device
        self.times: list[float] = []
        self.mib = self.delta_mib = float("nan")
        self.out: Any = None

    def run(self, refiner: Any) -> None:
        self.model.refiner = refiner
        tt = 0.0
        with PeakMemory(self.device) as pm:
            for b in self.batches:
                self.out, dt = timed(lambda b=b: self.model(b), self.device)
                tt += dt
        self.times.append(tt)
        self.mib = pm.mib if self.mib != self.mib else max(self.mib, pm.mib)
        self.delta_mib = pm.delta_mib if self.delta_mib != self.delta_mib else max(self.delta_mib, pm.delta_mib)

    def ms_per_image(self, n: int) -> float:
        return 1000 * statistics.median(self.times) / n if self.times else float("nan")


def bench_batch(model: Any, imgs: list[torch.Tensor], batch_size: int, repeats: int, device: torch.device,
                with_crf: bool = True) -> tuple[BatchResult, dict[str, Any]]:
    """Stage and whole-pipeline timing of ``imgs`` processed in batches of ``batch_size``."""
    batches = [imgs[i:i + batch_size] for i in range(0, len(imgs), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or [imgs[:batch_size]]
    n = sum(len(b) for b in batches)
    refiner = model.refiner if with_crf else None
    # warm-up (one batch through everything)
    model.refiner = refiner
    run_stages(model, batches[0], device)
    model(batches[0])
    stage_runs: list[dict[str, float]] = []
    info: dict[str, Any] = {}
    crf, nocrf = _WholeRuns(model, batches, device), _WholeRuns(model, batches, device)
    # repeats interleave the stage pass and the two whole-pipeline passes, so that a drifting
    # machine load affects all of them alike
    for _ in range(repeats):
        model.refiner = refiner
        tot = dict.fromkeys((*STAGES, "cluster_features"), 0.0)
        for b in batches:
            t, info = run_stages(model, b, device)
            for k_, v in t.items():
                tot[k_] += v
        stage_runs.append(tot)
        if refiner is not None:
            crf.run(refiner)
        nocrf.run(None)
    stage_ms = {s: 1000 * statistics.median(r[s] for r in stage_runs) / n for s in (*STAGES, "cluster_features")}
    crf_ms, nocrf_ms = crf.ms_per_image(n), nocrf.ms_per_image(n)
    model.refiner = refiner
    k_ok = nocrf.out is not None and [int(v) for v in nocrf.out.k] == info.get("k")
    res = BatchResult(
        batch_size=batch_size, n_images=n, stage_ms_per_image=stage_ms,
        whole_crf_ms_per_image=crf_ms, whole_nocrf_ms_per_image=nocrf_ms,
        images_per_s_crf=1000 / crf_ms if crf_ms == crf_ms else float("nan"),
        images_per_s_nocrf=1000 / nocrf_ms, peak_mem_crf_mib=crf.mib, peak_mem_nocrf_mib=nocrf.mib,
        k_consistent=bool(k_ok), spectral_cluster_ms_per_image=stage_ms["cluster_features"],
        extras={"peak_mem_crf_delta_mib": crf.delta_mib, "peak_mem_nocrf_delta_mib": nocrf.delta_mib,
                "memory_measure": PeakMemory(device).kind, "problems_last_batch": info.get("problems"),
                "kmeans_iters_last_batch": info.get("kmeans_iters"),
                "k_opt_last_batch": info.get("k_opt"), "k_last_batch": info.get("k")},
    )
    return res, info


# ----------------------------------------------------------------------------- markdown

_REFERENCE_INTRO = (
    "References on the same features of the same images as ours (`benchmarks/reference.py`, numpy/sklearn/"
    "pydensecrf), warmed up, timed right after each batch size, median of {repeats} passes per image. "
    "Literal: numpy `eigh` of the n x n affinity; Gram path: numpy `eigh` of the D x D Gram matrix (clasp_torch's "
    "algebra), the same sklearn `KMeans(n_init=10)` and `silhouette_score` per K. Reference whole = backbone "
    "(ours, same features) + reference spectral+clustering + nearest upsampling + pydensecrf; ours whole = "
    "`CLASP.forward` with the CRF.")
_REFERENCE_HEADER = (
    "| batch | images | literal reference ms (eigh / KMeans / silhouette) | Gram-path reference ms (eigh / "
    "KMeans / silhouette) | pydensecrf ms | ours `cluster_features` ms | spectral+clustering: literal / ours "
    "| Gram path / ours | whole with CRF: literal / ours | Gram path / ours |")
_CPU_MEMORY = ("CPU process peak RSS (psutil, sampled every 2 ms; batch sizes run in ascending order, so it "
               "includes the model and earlier batches)")


def _stage_table(results: list[BatchResult]) -> list[str]:
    lines = ["| batch | " + " | ".join(STAGES) + " | sum of spectral stages | `cluster_features` (one call) |",
             "| --- | " + " | ".join("---" for _ in STAGES) + " | --- | --- |"]
    for r in results:
        spectral = sum(r.stage_ms_per_image[s] for s in SPECTRAL_STAGES)
        lines.append(f"| {r.batch_size} | " + " | ".join(f"{r.stage_ms_per_image[s]:.1f}" for s in STAGES)
                     + f" | {spectral:.1f} | {r.spectral_cluster_ms_per_image:.1f} |")
    return lines


def _whole_table(results: list[BatchResult]) -> list[str]:
    lines = ["| batch | with CRF: ms/image | with CRF: images/s | peak MiB | no CRF: ms/image | no CRF: images/s "
             "| peak MiB | K same as stages |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.batch_size} | {r.whole_crf_ms_per_image:.1f} | {r.images_per_s_crf:.2f} | "
                     f"{r.peak_mem_crf_mib:.0f} | {r.whole_nocrf_ms_per_image:.1f} | {r.images_per_s_nocrf:.2f} | "
                     f"{r.peak_mem_nocrf_mib:.0f} | {'yes' if r.k_consistent else 'no'} |")
    return lines


def _reference_table(results: list[BatchResult]) -> list[str]:
    lines = [_REFERENCE_HEADER, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rf = r.extras.get("reference")
        if not rf:
            continue
        mine, x = r.extras["ours_on_reference_images"], r.extras
        lines.append(f"| {r.batch_size} | {rf['n']} | {rf['spectral_cluster']:.0f} ({rf['eigh']:.0f} / "
                     f"{rf['kmeans']:.0f} / {rf['silhouette']:.0f}) | {rf['gram_spectral_cluster']:.0f} "
                     f"({rf['gram_eigh']:.1f} / {rf['gram_kmeans']:.0f} / {rf['gram_silhouette']:.0f}) | "
                     f"{rf['crf']:.0f} | {mine['spectral_cluster_ms']:.0f} | {x['ratio_spectral_cluster']:.2f}x | "
                     f"{x['ratio_spectral_cluster_gram']:.2f}x | {x['ratio_whole_crf']:.2f}x | "
                     f"{x['ratio_whole_crf_gram']:.2f}x |")
    return lines


def markdown_tables(results: list[BatchResult], ref: dict[str, float] | None, meta: dict[str, Any]) -> str:
    """Markdown for RESULTS.md: machine line, stage table, whole-pipeline table, ratios."""
    weights = "pretrained" if meta["pretrained"] else "random weights"
    lines = [f"Machine: {describe(meta['machine'])}.", "",
             f"Command: `{meta['command']}`", "",
             f"Inputs: {meta['n_images']} images resized to {meta['size'][0]}x{meta['size'][1]} from "
             f"{meta['image_source']}; backbone `{meta['backbone']}` ({weights}), patch grid {meta['grid']}, "
             f"D={meta['D']}; device `{meta['device']}`; median of {meta['repeats']} repeats after one warm-up.", "",
             "Per-stage time (ms per image):", "", *_stage_table(results)]
    mem_kind = "GPU `torch.cuda.max_memory_allocated`" if meta["device"].startswith("cuda") else _CPU_MEMORY
    lines += ["", f"Whole pipeline (`CLASP.forward`), peak memory = {mem_kind}:", "", *_whole_table(results)]
    if ref:
        lines += ["", _REFERENCE_INTRO.format(repeats=meta["repeats"]), "", *_reference_table(results)]
    return "\n".join(lines) + "\n"


def _csv_row(r: BatchResult, device: torch.device, backbone: str) -> list[Any]:
    x = r.extras
    return [str(device), backbone, r.batch_size, r.n_images,
            *[f"{r.stage_ms_per_image[s]:.3f}" for s in STAGES], f"{r.spectral_cluster_ms_per_image:.3f}",
            f"{r.whole_crf_ms_per_image:.3f}", f"{r.images_per_s_crf:.4f}", f"{r.peak_mem_crf_mib:.1f}",
            f"{r.whole_nocrf_ms_per_image:.3f}", f"{r.images_per_s_nocrf:.4f}", f"{r.peak_mem_nocrf_mib:.1f}",
            f"{x.get('ratio_spectral_cluster', float('nan')):.3f}", f"{x.get('ratio_whole_crf', float('nan')):.3f}",
            int(r.k_consistent), f"{x.get('ratio_spectral_cluster_gram', float('nan')):.3f}",
            f"{x.get('ratio_whole_crf_gram', float('nan')):.3f}"]


def write_csv(path: str, results: list[BatchResult], device: torch.device, backbone: str) -> None:
    """One row per batch size (columns :data:`CSV_COLUMNS`)."""
    makedirs_for(path)
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(CSV_COLUMNS)
        for r in results:
            wr.writerow(_csv_row(r, device, backbone))


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--pretrained", choices=("auto", "yes", "no"), default="auto",
                    help="auto: real weights for efficientnet_lite0, random weights for DINOv2")
    ap.add_argument("--images", type=int, default=None, help="images per batch size (default: the largest batch size)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; 1 with --quick)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"), help="input size (default 640 480)")
    ap.add_argument("--image-dir", default=None)
    ap.add_argument("--ref-images", type=int, default=None,
                    help="images run through the references (default: all --images); with fewer, ours is timed "
                         "again on those same images for the ratios")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-crf", action="store_true", help="skip the CRF (and the with-CRF whole-pipeline runs)")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype of the backbone")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and (threadpoolctl) numpy/sklearn (default: library defaults)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 small (128x96) images, batches 1 2, 1 repeat")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for benchmarks/RESULTS.md)")
    ap.add_argument("--markdown-file", default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes = args.batch_sizes or [1, 2]
        args.size = args.size or [128, 96]
        args.repeats = args.repeats or 1
    args.batch_sizes = args.batch_sizes or [1, 8, 32]
    args.size = tuple(args.size or (640, 480))
    args.repeats = args.repeats or 3
    args.images = args.images or max(args.batch_sizes)
    if args.ref_images is None or args.ref_images > args.images:
        args.ref_images = args.images
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with thread_limits(args.threads):  # same thread budget for torch and the numpy/sklearn reference
        return _main(args, argv)


def _setup(args: argparse.Namespace) -> tuple[Any, list[torch.Tensor], str, torch.device, bool]:
    """``(model, images on the device, their source, device, pretrained)``."""
    from clasp_torch.pipeline import CLASP

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    pretrained = args.pretrained == "yes" or (args.pretrained == "auto" and not args.backbone.startswith("dinov2"))
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    torch.manual_seed(0)
    model = CLASP(args.backbone, pretrained=pretrained, amp_dtype=amp).to(device).eval()
    if args.no_crf:
        model.refiner = None
    imgs, source = load_images(args.images, args.size, args.image_dir)
    return model, [im.to(device) for im in imgs], source, device, pretrained


def _print_batch(r: BatchResult, seconds: float) -> None:
    st = " ".join(f"{s}={r.stage_ms_per_image[s]:.1f}" for s in STAGES)
    print(f"[batch {r.batch_size}] ms/image: {st} | "
          f"cluster_features={r.spectral_cluster_ms_per_image:.1f} | whole CRF {r.whole_crf_ms_per_image:.1f} ms "
          f"({r.images_per_s_crf:.2f} img/s, peak {r.peak_mem_crf_mib:.0f} MiB) | "
          f"whole no-CRF {r.whole_nocrf_ms_per_image:.1f} ms ({r.images_per_s_nocrf:.2f} img/s, "
          f"peak {r.peak_mem_nocrf_mib:.0f} MiB) | K consistent={r.k_consistent} | {seconds:.0f}s", flush=True)


def _compare_with_reference(r: BatchResult, mine: BatchResult, ref: dict[str, float], no_crf: bool,
                            repeats: int) -> None:
    """Ratios of the references (timed on ``mine.n_images`` images) to ours, into ``r.extras``."""
    bs = r.batch_size
    ours_sc = mine.spectral_cluster_ms_per_image
    ours_whole = mine.whole_crf_ms_per_image if not no_crf else mine.whole_nocrf_ms_per_image
    ratios = {}
    for pre in REFERENCE_VARIANTS.values():
        ratios[pre + "sc"] = ref[pre + "spectral_cluster"] / ours_sc
        ref_whole = mine.stage_ms_per_image["backbone"] + ref[pre + "spectral_cluster"] + ref["crf"]
        ratios[pre + "whole"] = ref_whole / ours_whole
    r.extras.update(reference=ref, ours_on_reference_images={"n": ref["n"], "spectral_cluster_ms": ours_sc,
                                                             "whole_ms": ours_whole},
                    ratio_spectral_cluster=ratios["sc"], ratio_whole_crf=ratios["whole"],
                    ratio_spectral_cluster_gram=ratios["gram_sc"], ratio_whole_crf_gram=ratios["gram_whole"])
    print(f"[reference after batch {bs}] {ref['n']} images (the images ours was timed on), {repeats} repeats, "
          f"per image: reference_clasp {ref['spectral_cluster']:.0f} ms (eigh {ref['eigh']:.0f}, KMeans "
          f"{ref['kmeans']:.0f}, silhouette {ref['silhouette']:.0f}); Gram-path reference "
          f"{ref['gram_spectral_cluster']:.0f} ms (eigh {ref['gram_eigh']:.0f}, KMeans {ref['gram_kmeans']:.0f}, "
          f"silhouette {ref['gram_silhouette']:.0f}); pydensecrf {ref['crf']:.0f} ms", flush=True)
    print(f"[ratio batch {bs}] spectral+clustering reference/ours = {ratios['sc']:.1f}x (target >= 20x), "
          f"Gram-path reference/ours = {ratios['gram_sc']:.1f}x; whole pipeline{' with CRF' if not no_crf else ''} "
          f"reference/ours = {ratios['whole']:.2f}x (target >= 2x), Gram-path reference/ours = "
          f"{ratios['gram_whole']:.2f}x", flush=True)


class _References:
    """The references on the first ``--ref-images`` images (their backbone features computed once,
    warmed up), timed right after each batch size against ours on exactly those images."""

    def __init__(self, model: Any, imgs: list[torch.Tensor], args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.imgs = imgs[: args.ref_images]
        self.feats, _, self.grids = model.extract_features(self.imgs)
        run_reference(self.feats, self.grids, self.imgs, 1, with_crf=not args.no_crf)  # warm-up (imports, BLAS)
        self.records: list[dict[str, Any]] = []

    def after_batch(self, r: BatchResult, all_imgs: list[torch.Tensor], device: torch.device) -> None:
        args, bs = self.args, r.batch_size
        n_ref = min(args.ref_images, r.n_images)
        if n_ref < bs:
            print(f"[reference] batch {bs}: fewer reference images ({n_ref}) than the batch size, no ratio",
                  flush=True)
            return
        # ours on exactly the images the references run on
        mine = r if n_ref == r.n_images else bench_batch(self.model, all_imgs[:n_ref], bs, args.repeats, device,
                                                          with_crf=not args.no_crf)[0]
        n_ref = mine.n_images
        # references timed right after this batch size (adjacent in time: fairer on a machine whose load varies)
        ref, recs = run_reference(self.feats, self.grids, self.imgs, n_ref, with_crf=not args.no_crf,
                                  repeats=args.repeats)
        self.records += [{"after_batch_size": bs, **x} for x in recs]
        ref.setdefault("crf", 0.0)
        ref["n"] = n_ref
        ref["k_agreement_gram"] = sum(x["k"] == x["gram_k"] for x in recs) / max(len(recs), 1)
        _compare_with_reference(r, mine, ref, args.no_crf, args.repeats)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    model, imgs, source, device, pretrained = _setup(args)
    machine = machine_description(device)
    print(describe(machine), flush=True)
    print(f"{len(imgs)} images {args.size[0]}x{args.size[1]} from {source}; backbone {args.backbone} "
          f"({'pretrained' if pretrained else 'random weights'}), amp={args.amp}, device {device}", flush=True)
    refs = _References(model, imgs, args) if not args.no_reference and args.ref_images > 0 else None
    results: list[BatchResult] = []
    last_info: dict[str, Any] = {}
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        r, last_info = bench_batch(model, imgs, bs, args.repeats, device, with_crf=not args.no_crf)
        results.append(r)
        _print_batch(r, time.perf_counter() - t0)
        if refs is not None:
            refs.after_batch(r, imgs, device)
    ref_summary = {"n": args.ref_images, "repeats": args.repeats} if refs is not None else None
    feats = last_info.get("features")
    meta = {
        "machine": machine_description(device),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "n_images": len(imgs), "size": list(args.size), "image_source": source, "backbone": args.backbone,
        "pretrained": pretrained, "device": str(device), "repeats": args.repeats, "amp": args.amp,
        "grid": "x".join(str(int(v)) for v in last_info["grids"][0]) if "grids" in last_info else "?",
        "D": int(feats.shape[-1]) if feats is not None else None,
        "machine_start": machine,
    }
    md = markdown_tables(results, ref_summary, meta)
    if args.markdown:
        print()
        print(md)
    if args.markdown_file:
        makedirs_for(args.markdown_file)
        with open(args.markdown_file, "w") as fh:
            fh.write(md)
    if args.csv:
        write_csv(args.csv, results, device, args.backbone)
    payload = {"meta": meta, "results": [asdict(r) for r in results], "reference": ref_summary,
               "reference_images": refs.records if refs is not None else []}
    if args.json:
        makedirs_for(args.json)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
    return payload


if __name__ == "__main__":
    main()
