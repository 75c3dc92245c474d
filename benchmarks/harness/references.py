"""Reference runs: the literal CPU transcription of Algorithm 1 (``benchmarks/reference.py``) and
its Gram-path variant, on the very backbone features clasp_torch was timed on."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

__all__ = ["REFERENCE_VARIANTS", "run_reference"]

REFERENCE_VARIANTS = {"full": "", "gram": "gram_"}  # reference_clasp(eigen=...) -> prefix of its keys


def run_reference(feats: torch.Tensor, grids: torch.Tensor, imgs: list[torch.Tensor], n: int,
                  with_crf: bool = True, repeats: int = 1) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The literal reference and its Gram-path variant on the same features of the first ``n``
    images, ``repeats`` passes.

    Returns ``(ms, records)``: ``ms[key]`` is the median over the passes of the pass's total
    divided by ``n`` (ms per image; the statistic ``bench_batch`` reports for ours), for
    ``spectral_cluster``, ``eigh``, ``kmeans``, ``silhouette`` (literal reference), the same keys
    prefixed ``gram_`` (Gram-path reference) and ``crf`` (nearest upsampling + pydensecrf on the
    literal reference's labels); ``records`` has K_opt / K of both variants per image.
    """
    from benchmarks.reference import pixel_labels, pydensecrf_refine, reference_clasp

    n = min(n, feats.shape[0])
    passes: list[dict[str, float]] = []
    records: list[dict[str, Any]] = []
    for rep in range(repeats):
        tot: dict[str, float] = {}
        for i in range(n):
            h, w = int(grids[i, 0]), int(grids[i, 1])
            f_np = feats[i, :h, :w].detach().double().cpu().numpy()
            rec: dict[str, Any] = {"image": i}
            for eigen, pre in REFERENCE_VARIANTS.items():
                t0 = time.perf_counter()
                ref = reference_clasp(f_np, eigen=eigen)
                dt = time.perf_counter() - t0
                for key, v in (("spectral_cluster", dt), *ref.timings.items()):
                    tot[pre + key] = tot.get(pre + key, 0.0) + v
                rec[pre + "k"], rec[pre + "k_opt"] = ref.k, ref.k_opt
                if eigen == "full":
                    literal = ref
            if with_crf:
                img = imgs[i].permute(1, 2, 0).cpu().numpy()
                t0 = time.perf_counter()
                lab = pixel_labels(literal.labels, img.shape[0], img.shape[1])
                pydensecrf_refine(img, lab, literal.k)
                tot["crf"] = tot.get("crf", 0.0) + time.perf_counter() - t0
            if rep == 0:
                records.append(rec)
        passes.append(tot)
    keys = passes[0] if passes else {}
    ms = {key: 1000 * statistics.median(p[key] for p in passes) / max(n, 1) for key in keys}
    return ms, records
