"""``clasp segment`` end to end against ``CLASP.forward`` alone, on the same images.

``python -m benchmarks.segment_e2e --device cpu --threads 1 [--images 8] [--no-crf] [--json FILE]``

Both sides run the real model (EfficientNet-Lite0 by default) on the same COCO dev photos at
their stored size:

* ``forward``: the images decoded in advance, then ``CLASP.forward`` batch by batch (what the
  model alone costs);
* ``segment``: the real ``clasp segment`` path (:func:`clasp_torch.segment_run.build_segment_run`:
  loaders with workers, predictor, the writer's thread pool, PNG label maps and overlays).

Each side runs over ``N`` and ``2N`` images; the **marginal cost per image** is
``(T(2N) - T(N)) / N``, so fixed start-up costs (trainer set-up, worker start, first-call warm-up)
cancel. The ratio ``segment / forward`` is what the CLI adds where the model dominates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import DEFAULT_IMAGE_DIR, thread_limits, write_outputs
from clasp_torch.data import load_image
from clasp_torch.pipeline import CLASP
from clasp_torch.segment_run import SegmentConfig, build_segment_run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model: CLASP, paths: list[str], batch_size: int, device: str) -> float:
    imgs = [load_image(p) for p in paths]
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(imgs), batch_size):
        out = model([im.to(device) for im in imgs[i : i + batch_size]])
        out.labels.cpu()
    _sync(device)
    return time.perf_counter() - t0


def time_segment(model: CLASP, paths: list[str], batch_size: int, device: str, overlays: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        acc = "gpu" if device.startswith("cuda") else "cpu"
        cfg = SegmentConfig(inputs=paths, out=out, batch_size=batch_size, accelerator=acc, progress=False,
                            overlays=overlays)
        t0 = time.perf_counter()
        run = build_segment_run(cfg, model)
        run.run()
        dt = time.perf_counter() - t0
        assert len(list(Path(out).glob("*.png"))) == len(paths), "not every image was written"
        return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--images", type=int, default=8, help="N (the runs use N and 2N images)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 1 on a CPU, 8 on a GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the model")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--no-overlay", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bs = args.batch_size or (8 if args.device.startswith("cuda") else 1)
    paths = sorted(glob.glob(os.path.join(DEFAULT_IMAGE_DIR, "*.jpg")))
    if len(paths) < 2 * args.images:
        raise SystemExit(f"need {2 * args.images} photos under {DEFAULT_IMAGE_DIR}")
    model = CLASP(args.backbone, pretrained=args.backbone != "dinov2_vits14_reg",
                  refiner=None if args.no_crf else "crf").to(args.device)
    res: dict[str, dict[str, float]] = {"forward": {}, "segment": {}}
    with thread_limits(args.threads):
        model(load_image(paths[0])[None].to(args.device))  # warm-up
        for n in (args.images, 2 * args.images):  # interleaved: both sides see the same machine state
            res["forward"][str(n)] = time_forward(model, paths[:n], bs, args.device)
            res["segment"][str(n)] = time_segment(model, paths[:n], bs, args.device, not args.no_overlay)
            print(f"N={n}: forward {res['forward'][str(n)]:.2f}s, segment {res['segment'][str(n)]:.2f}s",
                  file=sys.stderr, flush=True)
    n1, n2 = str(args.images), str(2 * args.images)
    marg = {k: (v[n2] - v[n1]) / args.images for k, v in res.items()}
    summary = {
        "device": args.device, "backbone": args.backbone, "crf": not args.no_crf, "batch_size": bs,
        "threads": args.threads, "images": [args.images, 2 * args.images], "seconds": res,
        "marginal_s_per_image": marg, "segment_over_forward": marg["segment"] / marg["forward"],
        "segment_images_per_s": 1 / marg["segment"], "forward_images_per_s": 1 / marg["forward"],
    }
    text = json.dumps(summary, indent=1)
    print(text)
    write_outputs((args.json, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
