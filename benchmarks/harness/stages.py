"""The CLASP pipeline run stage by stage, each stage timed (or probed) on its own.

:func:`run_stages` re-implements ``CLASP.cluster_features`` / ``select_k`` call by call (no
``max_problems`` chunking; the library's cheap guards for degenerate images -- distinct-row cap on
K, single-direction / uniform images -- are left out, they only change K on degenerate inputs), so
that the k-means and the silhouettes of the (image, K) problems get their own clock; it also times
``CLASP.cluster_features`` as one call, the authoritative spectral+clustering figure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from clasp_torch.cluster import best_in_band, policy
from clasp_torch.cluster.kmeans import kmeans_problems
from clasp_torch.cluster.silhouette import mean_silhouette, silhouette_problems
from clasp_torch.pipeline import pad_images, to_uint8, upsample_labels
from clasp_torch.spectral import eigengap_elbow, k_band, spectral_decomposition

from .timing import timed

__all__ = ["STAGES", "SPECTRAL_STAGES", "problems_of", "kmeans_of", "silhouette_of", "run_stages", "probe_stages"]

STAGES = ("backbone", "affinity+eigen", "elbow", "kmeans", "silhouette", "select", "crf")
SPECTRAL_STAGES = ("affinity+eigen", "elbow", "kmeans", "silhouette", "select")


def problems_of(embedding: torch.Tensor, mask: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> dict[str, Any] | None:
    """The (image, K) k-means problems exactly as ``clasp_torch.cluster.select_k`` builds them:
    each problem refers to its image's embedding ``emb (B, N, D)`` and uses its first ``dims``
    coordinates."""
    B, N, M = embedding.shape
    dev = embedding.device
    kmin_all, kmax_all = int(k_lo.min()), int(k_hi.max())
    if kmax_all < kmin_all:
        return None
    k_values = torch.arange(kmin_all, kmax_all + 1, device=dev)
    Kc = k_values.numel()
    in_band = (k_values.view(1, Kc) >= k_lo.view(B, 1)) & (k_values.view(1, Kc) <= k_hi.view(B, 1))
    b_idx, kc_idx = in_band.nonzero(as_tuple=True)
    kp = k_values[kc_idx]
    D = min(M, kmax_all)
    emb = embedding[..., :D].to(dtype) * mask.to(dtype).unsqueeze(-1)
    return {"emb": emb, "image_mask": mask, "dims": kp.clamp(max=D), "k": kp, "mask": mask[b_idx], "b_idx": b_idx,
            "kc_idx": kc_idx, "k_values": k_values}


def kmeans_of(prob: dict[str, Any], n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0) -> Any:
    """k-means of every problem, the call ``select_k`` makes (a ``KMeansResult``)."""
    return kmeans_problems(prob["emb"], prob["image_mask"], prob["b_idx"], prob["dims"], prob["k"], n_init,
                           max_iter, tol, seed, 1)


def silhouette_of(prob: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Mean silhouette of every problem, the call ``select_k`` makes: ``(P,)``."""
    C = int(prob["k"].max())
    block = policy.cluster_policy(prob["emb"].device).max_block_elements  # looked up now: pinnable
    s = silhouette_problems(prob["emb"], prob["image_mask"], prob["b_idx"], prob["dims"], labels, C, block)
    return mean_silhouette(s, labels, C, prob["mask"])


def _spectral(model: Any, feats: torch.Tensor, pmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``cluster_features``' patch reordering (real patches first) and spectral decomposition."""
    B, hm, wm, D = feats.shape
    flat_mask = pmask.reshape(B, hm * wm)
    order = torch.argsort((~flat_mask).to(torch.int8), dim=1, stable=True)
    f = feats.reshape(B, hm * wm, D).gather(1, order.unsqueeze(-1).expand(B, hm * wm, D))
    m = flat_mask.gather(1, order)
    return order, m, spectral_decomposition(f, m, method=model.eigen_method, affinity=model.affinity)


def _elbow(model: Any, spec: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_opt, k_lo, k_hi)``: the eigengap elbow and its K band."""
    k_opt = eigengap_elbow(spec.eigenvalues, spec.n)
    lo, hi = k_band(k_opt, spec.n, model.beta)
    return k_opt, lo, hi


def _select(prob: dict[str, Any], labels: torch.Tensor, sc: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best K per image and its labels scattered back to patch order: ``(k (B,), labels (B, N))``."""
    B, N = order.shape
    Kc = prob["k_values"].numel()
    scores = torch.full((B, Kc), float("nan"), dtype=sc.dtype, device=sc.device)
    scores[prob["b_idx"], prob["kc_idx"]] = sc
    best = best_in_band(scores)
    prob_of = torch.full((B, Kc), -1, dtype=torch.long, device=sc.device)
    prob_of[prob["b_idx"], prob["kc_idx"]] = torch.arange(prob["k"].numel(), device=sc.device)
    chosen = prob_of.gather(1, best.view(B, 1)).squeeze(1)
    ok = (hi >= lo) & (chosen >= 0)
    lab = torch.where(ok.view(B, 1), labels[chosen.clamp_min(0)], torch.zeros_like(labels[:B]))
    kk = torch.where(ok, prob["k_values"][best], torch.ones_like(best))
    full = torch.full((B, N), -1, dtype=torch.long, device=lab.device)
    full.scatter_(1, order, lab)
    return kk, full


def run_stages(model: Any, imgs: list[torch.Tensor], device: torch.device,
               label: Callable[[str], Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """One pass of the pipeline on ``imgs``, stage by stage; returns seconds per stage
    (whole batch) and what the stages computed (``k``, ``k_opt``, ``features``, ``coarse``, ...).

    ``label(stage)`` (optional) returns a context manager entered around each stage, e.g.
    ``torch.profiler.record_function`` + an NVTX range (see ``benchmarks/profile_gpu.py``).
    """
    def clock(name: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        with (label(name) if label is not None else contextlib.nullcontext()):
            return timed(fn, device)

    t: dict[str, float] = {}
    image_sizes = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in imgs], dtype=torch.long)
    (feats, pmask, grids), t["backbone"] = clock("backbone", lambda: model.extract_features(imgs))
    B, hm, wm, D = feats.shape
    # the library's own spectral+clustering call (authoritative figure, used for the ratios)
    _, t["cluster_features"] = clock("cluster_features", lambda: model.cluster_features(feats, pmask))
    (order, m, spec), t["affinity+eigen"] = clock("affinity+eigen", lambda: _spectral(model, feats, pmask))
    (k_opt, lo, hi), t["elbow"] = clock("elbow", lambda: _elbow(model, spec))
    prob = problems_of(spec.eigenvectors, m, lo, hi)
    info: dict[str, Any] = {"k_opt": k_opt.tolist(), "n_patches": spec.n.tolist(), "D": D,
                            "problems": 0 if prob is None else int(prob["k"].numel())}
    if prob is None:
        t["kmeans"] = t["silhouette"] = t["select"] = 0.0
        k = torch.ones(B, dtype=torch.long, device=feats.device)
        full = torch.zeros(B, hm, wm, dtype=torch.long, device=feats.device)
        coarse = upsample_labels(full, grids.to(feats.device), image_sizes.to(feats.device))
    else:
        res, t["kmeans"] = clock("kmeans", lambda: kmeans_of(prob, model.n_init, model.max_iter, model.tol, model.seed))
        info["kmeans_iters"] = res.n_iter
        sc, t["silhouette"] = clock("silhouette", lambda: silhouette_of(prob, res.labels))

        def select() -> tuple[torch.Tensor, torch.Tensor]:
            kk, full = _select(prob, res.labels, sc, lo, hi, order)
            dev = full.device
            return kk, upsample_labels(full.view(B, hm, wm), grids.to(dev), image_sizes.to(dev))

        (k, coarse), t["select"] = clock("select", select)
    info["k"] = k.tolist()
    if model.refiner is not None:
        padded, imask = pad_images([to_uint8(im) for im in imgs])
        _, t["crf"] = clock("crf", lambda: model.refiner(padded, coarse.clamp_min(0), k, imask))
    else:
        t["crf"] = 0.0
    info.update(features=feats, grids=grids, coarse=coarse)
    return t, info


def probe_stages(model: Any, imgs: list[torch.Tensor], device: torch.device,
                 probe: Callable[[], Any]) -> dict[str, Any]:
    """One pass of :func:`run_stages` with a fresh context manager ``probe()`` entered around
    each stage; returns what each stage's ``__enter__`` gave (e.g. a ``TensorPeak`` or an
    operator counter), by stage name."""
    out: dict[str, Any] = {}

    @contextlib.contextmanager
    def label(name: str) -> Iterator[None]:
        with probe() as p:
            yield
        out[name] = p

    run_stages(model, imgs, device, label=label)
    return out
