"""Cost of one image against its size: ``clasp segment`` on 0.3 to 27-megapixel real photos.

**Size sweep** (the default). A real COCO dev photo (640x480; ``skimage.data.coffee`` when
``../shared/data`` is absent) is upscaled (PIL bicubic, JPEG quality 95, written to ``--work``,
outside the repository) to 2000x1500 (3 MP), 4000x3000 (12 MP) and 6000x4500 (27 MP); a 640x427
dev photo, as is, is the reference. Each measurement is its OWN process running the real CLI::

    clasp segment IMG --out DIR --backbone efficientnet_lite0 --device cpu [--no-crf]

with ``OMP_NUM_THREADS=--threads``. Recorded per run: wall time of the whole process (start-up,
model build, decoding, segmentation, writing the label PNG and the overlay) and the peak RSS:
``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of the CLI process, or of its
largest waited-for child), and, sampled every 20 ms with psutil, the peak of the RSS summed over
the CLI process and its children (DataLoader workers; shared pages counted in each). The output
label map must have the input's size. Figures: the fastest of ``--repeats`` runs, the largest RSS.

**Agreement** (``--agreement``). Which way to bring the CRF's result back from its working
resolution agrees better with the CRF at full resolution: the first ``--images`` COCO dev photos
upscaled by ``--factors`` (2 and 3, PIL bicubic), coarse labels from ``CLASP(refiner=None)`` on the
upscaled photo, then ``crf_refine_labels`` at full resolution (the reference) against
``crf_refine_labels_bounded`` at a working resolution of the original photo's pixel count
(``max_pixels = H0 W0``, a 1/factor downscale, like a 12-27 MP photo at the default cap), with
``upsample="marginals"`` and ``"nearest"``, the spatial bandwidths scaled by the downscale factor
(``scale_bandwidths=True``, the default) or kept in working pixels; plus all defaults (cap
``2**19``). Per variant: pixel agreement with the full-resolution
labels (mean and minimum over images), agreement on the pixels the full-resolution CRF changed,
and mIoU / pixel accuracy against the (nearest-upscaled) ground truth with per-image Hungarian
matching, as ``clasp eval``.

Outputs: ``--out-dir`` (default ``benchmarks/out``) ``size_sweep.json`` + ``size_sweep.md``, or
``crf_agreement.json`` + ``crf_agreement.md``::

    python -m benchmarks.size_sweep [--threads 1] [--repeats 2] [--sizes 0.3 3 12 27]
    python -m benchmarks.size_sweep --agreement [--images 12] [--factors 2 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLASP_DATA", ROOT.parent / "shared" / "data"))
COCO = DATA / "cocostuff-val-dev"
BASE_IMAGE = "000000010995.jpg"  # 640x480
REFERENCE_IMAGE = "000000011197.jpg"  # 640x427: the "small photo" of the issue
SIZES = {"0.3": (480, 640), "3": (1500, 2000), "12": (3000, 4000), "27": (4500, 6000)}  # MP -> (H, W)


# ------------------------------------------------------------------------------------- inputs
def _base_photos() -> tuple[Any, Any, str]:
    """``(base 640x480-ish photo, 640x427 reference photo, provenance)`` as PIL images."""
    from PIL import Image

    if (COCO / "images" / BASE_IMAGE).is_file():
        return (Image.open(COCO / "images" / BASE_IMAGE).convert("RGB"),
                Image.open(COCO / "images" / REFERENCE_IMAGE).convert("RGB"), f"COCO dev {BASE_IMAGE}")
    from skimage import data

    im = Image.fromarray(data.coffee())  # 400x600
    return im.resize((640, 480), Image.BICUBIC), im.resize((640, 427), Image.BICUBIC), "skimage.data.coffee"


def make_inputs(work: Path, sizes: list[str]) -> tuple[list[dict[str, Any]], str]:
    """Write the sweep's photos (JPEG q95) into ``work``; returns ``[{name, path, H, W}]``."""
    from PIL import Image

    base, ref, origin = _base_photos()
    work.mkdir(parents=True, exist_ok=True)
    out = []
    p = work / "ref_640x427.jpg"
    ref.save(p, quality=95)
    out.append({"name": "640x427 (reference)", "path": str(p), "H": ref.height, "W": ref.width})
    for s in sizes:
        H, W = SIZES[s]
        p = work / f"photo_{W}x{H}.jpg"
        im = base if (base.height, base.width) == (H, W) else base.resize((W, H), Image.BICUBIC)
        im.save(p, quality=95)
        out.append({"name": f"{W}x{H} ({H * W / 1e6:.1f} MP)", "path": str(p), "H": H, "W": W})
    return out, origin


# ---------------------------------------------------------------------------------- one run
def _tree_rss(proc: Any) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_cli(image: str, crf: bool, threads: int) -> dict[str, Any]:
    """One ``clasp segment`` process on ``image``: wall s, peak RSS (GiB), output size."""
    import psutil
    from PIL import Image

    out = Path(tempfile.mkdtemp(prefix="clasp_sweep_out_"))
    cmd = [shutil.which("clasp") or "clasp", "segment", image, "--out", str(out),
           "--backbone", "efficientnet_lite0", "--device", "cpu"] + ([] if crf else ["--no-crf"])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    peak_tree = 0
    stop = threading.Event()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(child.pid)

    def sample() -> None:
        nonlocal peak_tree
        while not stop.is_set():
            peak_tree = max(peak_tree, _tree_rss(ps))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = child.stdout.read() if child.stdout else b""  # drains the pipe until the CLI exits
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    stem = Path(image).stem
    size = None
    if (out / f"{stem}.png").is_file():
        with Image.open(out / f"{stem}.png") as lab:
            size = [lab.height, lab.width]
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {child.returncode}:\n{log.decode(errors='replace')[-2000:]}")
    return {"wall_s": wall, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "tree_rss_gb": peak_tree / 1e9, "label_size": size}


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    inputs, origin = make_inputs(work, args.sizes)
    rows = []
    for inp in inputs:
        for crf in (True, False):
            runs = [run_cli(inp["path"], crf, args.threads) for _ in range(args.repeats)]
            for r in runs:
                if r["label_size"] != [inp["H"], inp["W"]]:
                    raise RuntimeError(f"{inp['path']}: label map {r['label_size']} != input {(inp['H'], inp['W'])}")
            row = {"image": inp["name"], "H": inp["H"], "W": inp["W"], "megapixels": inp["H"] * inp["W"] / 1e6,
                   "crf": crf, "wall_s": min(r["wall_s"] for r in runs),
                   "wall_s_runs": [round(r["wall_s"], 2) for r in runs],
                   "rss_gb": max(r["rss_gb"] for r in runs), "tree_rss_gb": max(r["tree_rss_gb"] for r in runs)}
            rows.append(row)
            print(f"{row['image']:>22} crf={crf!s:5} wall {row['wall_s']:6.2f} s  peak RSS {row['rss_gb']:.2f} GB"
                  f"  (with workers {row['tree_rss_gb']:.2f})", flush=True)
    ref = {r["crf"]: r["wall_s"] for r in rows if r["image"].startswith("640x427")}
    for r in rows:
        r["wall_ratio"] = r["wall_s"] / ref[r["crf"]]
    shutil.rmtree(work, ignore_errors=True)
    # the targets: with the CRF, a 12 or 27 MP photo within 3 GB and 2.5x the 640x427 photo's wall time
    checks = [{"image": r["image"], "rss_ok": r["rss_gb"] <= 3.0, "wall_ok": r["wall_ratio"] <= 2.5}
              for r in rows if r["crf"] and r["megapixels"] > 10]
    return {"origin": origin, "threads": args.threads, "repeats": args.repeats, "rows": rows, "targets": checks,
            "command": "clasp segment IMG --out DIR --backbone efficientnet_lite0 --device cpu [--no-crf]"}


def sweep_markdown(res: dict[str, Any]) -> str:
    lines = [f"Photo: {res['origin']} upscaled (bicubic, JPEG q95); `{res['command']}`, one process per run, "
             f"OMP_NUM_THREADS={res['threads']}, fastest of {res['repeats']} runs (largest RSS).", "",
             "| image | CRF | wall s | x 640x427 | peak RSS GB (process) | peak RSS GB (process + workers) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['image']} | {'yes' if r['crf'] else 'no'} | {r['wall_s']:.1f} | {r['wall_ratio']:.2f} | "
                     f"{r['rss_gb']:.2f} | {r['tree_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- agreement
def agreement(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from benchmarks.reference import DATASETS, hungarian_miou_stats
    from clasp_torch import CLASP
    from clasp_torch.crf_resolution import DEFAULT_CRF_MAX_PIXELS, crf_refine_labels_bounded

    torch.set_num_threads(args.threads)
    if not (COCO / "images").is_dir():
        raise SystemExit(f"--agreement needs the COCO dev images in {COCO}")
    n_classes, ignore = DATASETS["cocostuff"]
    model = CLASP("efficientnet_lite0", refiner=None).eval()
    paths = sorted((COCO / "images").glob("*.jpg"))[: args.images]
    per_factor: dict[str, Any] = {}
    for f in args.factors:
        stats: dict[str, dict[str, Any]] = {}

        def add(name: str, pred: torch.Tensor, full: torch.Tensor, coarse: torch.Tensor, gt: np.ndarray,
                dt: float) -> None:
            s = stats.setdefault(name, {"agree": [], "changed": [], "tp": 0, "fp": 0, "fn": 0, "correct": 0,
                                        "total": 0, "s": 0.0})
            s["agree"].append(float((pred == full).double().mean()))
            ch = full != coarse
            s["changed"].append(float((pred[ch] == full[ch]).double().mean()) if bool(ch.any()) else 1.0)
            h = hungarian_miou_stats(pred.numpy(), gt, n_classes, ignore)
            for k in ("tp", "fp", "fn"):
                s[k] = s[k] + h[k]
            s["correct"] += int(h["correct"])
            s["total"] += int(h["total"])
            s["s"] += dt

        for p in paths:
            im = Image.open(p).convert("RGB")
            W0, H0 = im.size
            up = im.resize((W0 * f, H0 * f), Image.BICUBIC)
            img = torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1).contiguous()
            gt = np.asarray(Image.open(COCO / "labels" / (p.stem + ".png")).resize((W0 * f, H0 * f), Image.NEAREST))
            with torch.no_grad():
                out = model([img])
            coarse, k = out.coarse_labels[0], out.k
            H, W = coarse.shape
            runs: list[tuple[str, dict[str, Any]]] = [("full resolution (reference)", {"max_pixels": H * W})]
            for scaled in (True, False):
                for up_mode in ("marginals", "nearest"):
                    bw = "bandwidths scaled" if scaled else "bandwidths in working pixels"
                    runs.append((f"1/{f} downscale, {up_mode}, {bw}",
                                 {"max_pixels": H0 * W0, "upsample": up_mode, "scale_bandwidths": scaled}))
            runs.append((f"defaults (cap {DEFAULT_CRF_MAX_PIXELS} px, marginals, bandwidths scaled)", {}))
            preds = {}
            for name, kw in runs:
                t0 = time.perf_counter()
                preds[name] = crf_refine_labels_bounded(img[None], coarse[None], k, **kw)[0]
                preds[name + "/dt"] = time.perf_counter() - t0
            full = preds[runs[0][0]]
            add("coarse labels (no CRF)", coarse, full, coarse, gt, 0.0)
            for name, _ in runs:
                add(name, preds[name], full, coarse, gt, preds[name + "/dt"])
            print(f"x{f} {p.name} {W}x{H} K={int(k[0])}: " + ", ".join(
                f"{name.replace(f'1/{f} downscale, ', '')}={float((preds[name] == full).double().mean()):.4f}"
                for name, _ in runs[1:]),
                flush=True)
        rows = []
        for name, st in stats.items():
            tp, fp, fn = st["tp"], st["fp"], st["fn"]
            present = (tp + fn) > 0
            iou = tp[present] / np.maximum(tp + fp + fn, 1)[present]
            miou = float(np.mean(iou)) if np.any(present) else float("nan")
            rows.append({"variant": name, "agreement_mean": float(np.mean(st["agree"])),
                         "agreement_min": float(np.min(st["agree"])),
                         "changed_agreement": float(np.mean(st["changed"])), "miou": 100 * miou,
                         "pixel_acc": 100 * st["correct"] / max(st["total"], 1), "s_per_image": st["s"] / len(paths)})
        per_factor[str(f)] = rows
    return {"images": len(paths), "factors": args.factors, "threads": args.threads, "results": per_factor}


def agreement_markdown(res: dict[str, Any]) -> str:
    lines = [f"{res['images']} COCO dev photos upscaled (bicubic); CLASP coarse labels (EfficientNet-Lite0) on the "
             f"upscaled photo; reference = the CRF at full resolution. Threads: {res['threads']}.", ""]
    for f, rows in res["results"].items():
        lines += [f"Upscaled x{f}:", "",
                  "| variant | pixels = full-res CRF (mean) | (min) | on pixels the full-res CRF changed | mIoU "
                  "| pixel acc. | s/image |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {100 * r['agreement_mean']:.2f} % | {100 * r['agreement_min']:.2f} % | "
                         f"{100 * r['changed_agreement']:.1f} % | {r['miou']:.1f} | {r['pixel_acc']:.1f} | "
                         f"{r['s_per_image']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "clasp_size_sweep"),
                    help="folder for the upscaled photos (outside the repository; removed at the end)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--agreement", action="store_true", help="measure the bring-back choices instead of the sweep")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.agreement:
        res = agreement(args)
        md, stem = agreement_markdown(res), "crf_agreement"
    else:
        res = sweep(args)
        md, stem = sweep_markdown(res), "size_sweep"
        for c in res["targets"]:
            print(f"target {c['image']}: peak RSS <= 3 GB {'met' if c['rss_ok'] else 'NOT met'}, "
                  f"wall <= 2.5x 640x427 {'met' if c['wall_ok'] else 'NOT met'}")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
