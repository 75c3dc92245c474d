"""Connected components: the run-based union-find (``backend="torch"``) against kornia's (``"kornia"``).

:func:`clasp_torch.components.label_components` labels a multi-label map in one pass; the
``kornia`` backend one-hot encodes it into one binary plane per label and calls
:func:`kornia.contrib.connected_components_union_find` once on all planes. Both give the same ids
(checked here on every map). Timed single-threaded (``torch.set_num_threads(1)``), the median of
``--repeats`` calls, both backends interleaved in the same run, on:

* synthetic 640 x 480 maps of 5, 10 and 15 blobby labels (upsampled noise, argmax);
* the cached CRF label maps of the COCO-Stuff dev images (``benchmarks/proposals.py``'s cache,
  when present): the chosen K's pixel labels, one image at a time, and the band's maps (every K,
  the CRF at 2**14 px, upsampled to the image: what ``clasp proposals`` labels), one image's band
  as one batch, at image size (8-connectivity only: kornia's 4-connectivity takes minutes there)
  and at the CRF's 2**14-pixel working size.

Usage::

    python -m benchmarks.components [--repeats 3] [--images 2] [--json benchmarks/out/components.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clasp_torch.components import label_components

CACHE = Path(__file__).resolve().parent / "out" / "proposals_cache"


def synthetic(k: int, seed: int, size: tuple[int, int] = (480, 640)) -> torch.Tensor:
    """``(1, H, W)`` blobby map of ``k`` labels: noise on a 1/16 grid, bilinear upsampling, argmax."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    x = torch.rand(1, k, H // 16, W // 16, generator=g)
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False).argmax(1)


def cached_maps(n_images: int) -> dict[str, list[torch.Tensor]]:
    """Real label maps from the proposals cache: pixel labels and band maps of the first images."""
    out: dict[str, list[torch.Tensor]] = {"crf labels (1 map)": [], "band maps (17 maps)": [],
                                          "band maps at 2**14 px": []}
    for p in sorted(CACHE.glob("*.band.pt"))[:n_images]:
        fwd = torch.load(p.with_name(p.name.replace(".band.pt", ".pt")), weights_only=False)
        band = torch.load(p, weights_only=False)["labels"][0].long()
        band = band[band.flatten(1).amax(1) >= 0]  # the K of the image's band
        H, W = band.shape[-2:]
        s = (2**14 / (H * W)) ** 0.5
        small = F.interpolate(band[None].double(), size=(round(H * s), round(W * s)), mode="nearest")[0].long()
        out["crf labels (1 map)"].append(fwd["labels"].long())
        out["band maps (17 maps)"].append(band)
        out["band maps at 2**14 px"].append(small)
    return {k: v for k, v in out.items() if v}


def timed(maps: list[torch.Tensor], connectivity: int, repeats: int) -> dict[str, float]:
    """Median ms per map batch of each backend (interleaved); checks that they agree on every map."""
    times: dict[str, list[float]] = {"torch": [], "kornia": []}
    for r in range(repeats):
        results: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"torch": [], "kornia": []}
        for backend in times:
            t0 = time.perf_counter()
            for m in maps:
                results[backend].append(label_components(m, connectivity, backend))
            times[backend].append((time.perf_counter() - t0) * 1e3 / len(maps))
        if r == 0:
            for (a, na), (b, nb) in zip(results["torch"], results["kornia"]):
                assert torch.equal(a, b) and torch.equal(na, nb), "backends disagree"
    return {b: statistics.median(t) for b, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=2, help="cached dev images to use")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = {f"640x480, {k} labels": [synthetic(k, s) for s in range(2)] for k in (5, 10, 15)}
    cases.update(cached_maps(args.images))
    rows = []
    print(f"| maps | shape | labels | connectivity | torch ms | kornia ms | kornia / torch |\n|{'---|' * 7}")
    for name, maps in cases.items():
        labels = statistics.mean(float(m.flatten(1).amax(1).float().mean()) + 1 for m in maps)
        for conn in (8,) if name.startswith("band maps (") else (8, 4):  # kornia's 4-connectivity: minutes
            t = timed(maps, conn, args.repeats)
            row = {"maps": name, "shape": list(maps[0].shape), "labels": round(labels, 1), "connectivity": conn,
                   "torch_ms": round(t["torch"], 2), "kornia_ms": round(t["kornia"], 2),
                   "ratio": round(t["kornia"] / t["torch"], 2)}
            rows.append(row)
            shape = "x".join(map(str, maps[0].shape))
            print(f"| {name} | {shape} | {row['labels']} | {conn} | {row['torch_ms']} | {row['kornia_ms']} | "
                  f"{row['ratio']}x |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": 1, "repeats": args.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
