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
import contextlib
import csv
import gc
import glob
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_IMAGE_DIR = os.path.join(ROOT, "..", "shared", "data", "cocostuff-val-dev", "images")
OUT_DIR = os.path.join(ROOT, "benchmarks", "out")

STAGES = ("backbone", "affinity+eigen", "elbow", "kmeans", "silhouette", "select", "crf")
SPECTRAL_STAGES = ("affinity+eigen", "elbow", "kmeans", "silhouette", "select")


# ----------------------------------------------------------------------------- machine / timing


def machine_description(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, core count, load, torch version and GPU name (when on CUDA)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        desc["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        desc["loadavg"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(torch.device(device))
        desc["cuda"] = torch.version.cuda
    return desc


def describe(desc: dict[str, Any]) -> str:
    s = f"CPU {desc['cpu']} ({desc['cpu_count']} logical cores, torch threads {desc['torch_threads']})"
    if desc.get("gpu"):
        s += f", GPU {desc['gpu']} (CUDA {desc.get('cuda')})"
    s += f", torch {desc['torch']}, Python {desc['python']}"
    if desc.get("loadavg"):
        s += f", load average {desc['loadavg'][0]:.1f}"
    return s


@contextlib.contextmanager
def thread_limits(n: int | None):
    """Limit torch (and, via threadpoolctl, numpy/scipy/sklearn BLAS/OpenMP) to ``n`` CPU threads
    inside the block; ``None`` leaves the library defaults. Restores the previous settings."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    ctx = threadpool_limits(n) if threadpool_limits is not None else contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def pinned_cluster_policy(policy: Any | None):
    """Inside the block, ``clasp_torch.cluster.cluster_policy`` returns ``policy`` whatever the
    device (``None``: the device's own), so that a CPU run can count or measure what a GPU run
    does with the GPU's choices (they never change a result)."""
    if policy is None:
        yield
        return
    from unittest import mock

    from clasp_torch import cluster

    with mock.patch.object(cluster, "cluster_policy", lambda _device: policy):
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; wall seconds with a device synchronize before each clock read."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class PeakRSS:
    """Samples the process RSS in a background thread; ``delta_mib`` is the high-water mark
    above the RSS at entry (``peak_mib`` the absolute high-water mark)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


class TensorPeak:
    """Context manager: peak bytes held by tensors inside the block, above the entry level.

    ``peak_bytes`` after exit. CUDA: ``max_memory_allocated`` − ``memory_allocated`` at entry.
    CPU: maximum running sum of the allocation events recorded by ``torch.profiler``.

    Example:
        >>> with TensorPeak(torch.device("cpu")) as tp:
        ...     a = torch.empty(1000, 1000)          # 4 MB
        ...     b = torch.empty(2000, 2000); del b   # 16 MB, freed
        ...     c = torch.empty(500, 1000)           # 2 MB
        >>> tp.peak_bytes >= 20_000_000, tp.peak_bytes < 20_100_000
        (True, True)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.base_bytes = 0  # CUDA: memory_allocated at entry
        self._prof: Any = None

    def __enter__(self) -> "TensorPeak":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
            return
        self._prof.__exit__(*exc)
        events = [
            (e.start_ns(), e.nbytes())
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        events.sort(key=lambda t: t[0])
        run = peak = 0
        for _, nb in events:
            run += nb
            peak = max(peak, run)
        self.peak_bytes = peak
        self._prof = None


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` (absolute, MiB) or CPU RSS delta."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")  # CUDA: max_memory_allocated; CPU: absolute peak RSS of the process
        self.delta_mib = float("nan")  # CUDA: above memory_allocated at entry; CPU: above RSS at entry
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS (process)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            self._tp = TensorPeak(self.device).__enter__()
        else:
            gc.collect()
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._tp.__exit__(*exc)
            self.delta_mib = self._tp.peak_bytes / 2**20
            self.mib = (self._tp.base_bytes + self._tp.peak_bytes) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.mib = self._rss.peak_mib
            self.delta_mib = self._rss.delta_mib


# ----------------------------------------------------------------------------- inputs


def load_images(n: int, size: tuple[int, int] = (640, 480), image_dir: str | None = None) -> tuple[list[torch.Tensor], str]:
    """``n`` uint8 ``(3, H, W)`` RGB images resized to ``size = (W, H)``, cycling through the
    COCO-Stuff dev images (or skimage's sample photos when that folder is missing)."""
    from PIL import Image

    image_dir = image_dir or DEFAULT_IMAGE_DIR
    files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")) + glob.glob(os.path.join(image_dir, "*.png")))
    arrays: list[np.ndarray] = []
    if files:
        source = f"{len(files)} images of {os.path.normpath(image_dir)}"
        for f in files[: max(n, 1)]:
            arrays.append(np.array(Image.open(f).convert("RGB").resize(size, Image.BILINEAR)))
    else:
        from skimage import data

        source = "skimage.data sample photos (COCO dev images missing)"
        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            im = getattr(data, name)()
            if im.ndim == 2:
                im = np.stack([im] * 3, -1)
            arrays.append(np.array(Image.fromarray(im[..., :3]).resize(size, Image.BILINEAR)))
    imgs = [torch.from_numpy(arrays[i % len(arrays)]).permute(2, 0, 1).contiguous() for i in range(n)]
    return imgs, source


# ----------------------------------------------------------------------------- stages


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
    from clasp_torch.cluster import _kmeans_images

    return _kmeans_images(prob["emb"], prob["image_mask"], prob["b_idx"], prob["dims"], prob["k"], n_init, max_iter,
                          tol, seed, 1)


def silhouette_of(prob: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Mean silhouette of every problem, the call ``select_k`` makes: ``(P,)``."""
    from clasp_torch.cluster import _mean_silhouette, _silhouette_images, cluster_policy

    C = int(prob["k"].max())
    block = cluster_policy(prob["emb"].device).max_block_elements
    s = _silhouette_images(prob["emb"], prob["image_mask"], prob["b_idx"], prob["dims"], labels, C, block)
    return _mean_silhouette(s, labels, C, prob["mask"])


def run_stages(model: Any, imgs: list[torch.Tensor], device: torch.device,
               label: Callable[[str], Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """One pass of the pipeline, stage by stage; returns seconds per stage (whole batch).

    ``label(stage)`` (optional) returns a context manager entered around each stage, e.g.
    ``torch.profiler.record_function`` + an NVTX range (see ``benchmarks/profile_gpu.py``).
    """

    def T(name: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        with (label(name) if label is not None else contextlib.nullcontext()):
            return timed(fn, device)

    from clasp_torch.cluster import best_in_band
    from clasp_torch.pipeline import _to_uint8, pad_images, upsample_labels
    from clasp_torch.spectral import eigengap_elbow, k_band, spectral_decomposition

    t: dict[str, float] = {}
    image_sizes = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in imgs], dtype=torch.long)
    (feats, pmask, grids), t["backbone"] = T("backbone", lambda: model.extract_features(imgs))
    B, hm, wm, D = feats.shape
    # the library's own spectral+clustering call (authoritative figure, used for the ratios)
    _, t["cluster_features"] = T("cluster_features", lambda: model.cluster_features(feats, pmask))

    def spectral():
        flat_mask = pmask.reshape(B, hm * wm)
        order = torch.argsort((~flat_mask).to(torch.int8), dim=1, stable=True)
        f = feats.reshape(B, hm * wm, D).gather(1, order.unsqueeze(-1).expand(B, hm * wm, D))
        m = flat_mask.gather(1, order)
        return order, m, spectral_decomposition(f, m, method=model.eigen_method, affinity=model.affinity)

    (order, m, spec), t["affinity+eigen"] = T("affinity+eigen", spectral)

    def elbow():
        k_opt = eigengap_elbow(spec.eigenvalues, spec.n)
        lo, hi = k_band(k_opt, spec.n, model.beta)
        return k_opt, lo, hi

    (k_opt, lo, hi), t["elbow"] = T("elbow", elbow)
    prob = problems_of(spec.eigenvectors, m, lo, hi)
    info: dict[str, Any] = {"k_opt": k_opt.tolist(), "n_patches": spec.n.tolist(), "D": D}
    if prob is None:
        t["kmeans"] = t["silhouette"] = 0.0
        k = torch.ones(B, dtype=torch.long, device=feats.device)
        info["problems"] = 0
    else:
        kp = prob["k"]
        info["problems"] = int(kp.numel())
        res, t["kmeans"] = T("kmeans", lambda: kmeans_of(prob, model.n_init, model.max_iter, model.tol, model.seed))
        info["kmeans_iters"] = res.n_iter
        sc, t["silhouette"] = T("silhouette", lambda: silhouette_of(prob, res.labels))

        def select():
            Kc = prob["k_values"].numel()
            scores = torch.full((B, Kc), float("nan"), dtype=sc.dtype, device=sc.device)
            scores[prob["b_idx"], prob["kc_idx"]] = sc
            best = best_in_band(scores)
            prob_of = torch.full((B, Kc), -1, dtype=torch.long, device=sc.device)
            prob_of[prob["b_idx"], prob["kc_idx"]] = torch.arange(kp.numel(), device=sc.device)
            chosen = prob_of.gather(1, best.view(B, 1)).squeeze(1)
            ok = (hi >= lo) & (chosen >= 0)
            lab = torch.where(ok.view(B, 1), res.labels[chosen.clamp_min(0)], torch.zeros_like(res.labels[:B]))
            kk = torch.where(ok, prob["k_values"][best], torch.ones_like(best))
            full = torch.full((B, hm * wm), -1, dtype=torch.long, device=lab.device)
            full.scatter_(1, order, lab)
            coarse = upsample_labels(full.view(B, hm, wm), grids.to(lab.device), image_sizes.to(lab.device))
            return kk, coarse

        (k, coarse), t["select"] = T("select", select)
    if prob is None:
        coarse = upsample_labels(torch.zeros(B, hm, wm, dtype=torch.long, device=feats.device),
                                 grids.to(feats.device), image_sizes.to(feats.device))
        t["select"] = 0.0
    info["k"] = k.tolist()
    if model.refiner is not None:
        padded, imask = pad_images([_to_uint8(im) for im in imgs])
        _, t["crf"] = T("crf", lambda: model.refiner(padded, coarse.clamp_min(0), k, imask))
    else:
        t["crf"] = 0.0
    info["features"] = feats
    info["grids"] = grids
    info["coarse"] = coarse
    return t, info


def probe_stages(model: Any, imgs: list[torch.Tensor], device: torch.device,
                 probe: Callable[[], Any]) -> dict[str, Any]:
    """One pass of :func:`run_stages` with a fresh context manager ``probe()`` entered around
    each stage; returns what each stage's ``__enter__`` gave (e.g. a :class:`TensorPeak` or an
    operator counter), by stage name."""
    out: dict[str, Any] = {}

    @contextlib.contextmanager
    def label(name: str) -> Iterator[None]:
        with probe() as p:
            yield
        out[name] = p

    run_stages(model, imgs, device, label=label)
    return out


# ----------------------------------------------------------------------------- reference


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
    ms = {key: 1000 * statistics.median(p[key] for p in passes) / max(n, 1) for key in passes[0]} if passes else {}
    return ms, records


# ----------------------------------------------------------------------------- driver


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
    times: dict[str, list[float]] = {"crf": [], "nocrf": []}
    mem = {"crf": float("nan"), "nocrf": float("nan")}
    deltas_d = {"crf": float("nan"), "nocrf": float("nan")}
    outs: dict[str, Any] = {}

    def whole(key: str, ref_mod: Any) -> None:
        model.refiner = ref_mod
        tt = 0.0
        with PeakMemory(device) as pm:
            for b in batches:
                outs[key], dt = timed(lambda b=b: model(b), device)
                tt += dt
        times[key].append(tt)
        mem[key] = pm.mib if mem[key] != mem[key] else max(mem[key], pm.mib)
        deltas_d[key] = pm.delta_mib if deltas_d[key] != deltas_d[key] else max(deltas_d[key], pm.delta_mib)

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
            whole("crf", refiner)
        whole("nocrf", None)
    stage_ms = {s: 1000 * statistics.median(r[s] for r in stage_runs) / n for s in (*STAGES, "cluster_features")}
    crf_ms = 1000 * statistics.median(times["crf"]) / n if times["crf"] else float("nan")
    nocrf_ms = 1000 * statistics.median(times["nocrf"]) / n
    crf_mem, nocrf_mem, out_nc = mem["crf"], mem["nocrf"], outs.get("nocrf")
    deltas = [deltas_d["crf"], deltas_d["nocrf"]]
    model.refiner = refiner
    k_ok = out_nc is not None and [int(v) for v in out_nc.k] == info.get("k")
    res = BatchResult(
        batch_size=batch_size, n_images=n, stage_ms_per_image=stage_ms,
        whole_crf_ms_per_image=crf_ms, whole_nocrf_ms_per_image=nocrf_ms,
        images_per_s_crf=1000 / crf_ms if crf_ms == crf_ms else float("nan"),
        images_per_s_nocrf=1000 / nocrf_ms, peak_mem_crf_mib=crf_mem, peak_mem_nocrf_mib=nocrf_mem,
        k_consistent=bool(k_ok), spectral_cluster_ms_per_image=stage_ms["cluster_features"],
        extras={"peak_mem_crf_delta_mib": deltas[0], "peak_mem_nocrf_delta_mib": deltas[1],
                "memory_measure": PeakMemory(device).kind, "problems_last_batch": info.get("problems"), "kmeans_iters_last_batch": info.get("kmeans_iters"),
                "k_opt_last_batch": info.get("k_opt"), "k_last_batch": info.get("k")},
    )
    return res, info


def markdown_tables(results: list[BatchResult], ref: dict[str, float] | None, meta: dict[str, Any]) -> str:
    """Markdown for RESULTS.md: machine line, stage table, whole-pipeline table, ratios."""
    lines = [f"Machine: {describe(meta['machine'])}.", "",
             f"Command: `{meta['command']}`", "",
             f"Inputs: {meta['n_images']} images resized to {meta['size'][0]}x{meta['size'][1]} from "
             f"{meta['image_source']}; backbone `{meta['backbone']}` "
             f"({'pretrained' if meta['pretrained'] else 'random weights'}), patch grid {meta['grid']}, D={meta['D']}; "
             f"device `{meta['device']}`; median of {meta['repeats']} repeats after one warm-up.", "",
             "Per-stage time (ms per image):", "",
             "| batch | " + " | ".join(STAGES) + " | sum of spectral stages | `cluster_features` (one call) |",
             "| --- | " + " | ".join("---" for _ in STAGES) + " | --- | --- |"]
    for r in results:
        lines.append(f"| {r.batch_size} | " + " | ".join(f"{r.stage_ms_per_image[s]:.1f}" for s in STAGES)
                     + f" | {sum(r.stage_ms_per_image[s] for s in SPECTRAL_STAGES):.1f} | {r.spectral_cluster_ms_per_image:.1f} |")
    mem_kind = ("GPU `torch.cuda.max_memory_allocated`" if meta["device"].startswith("cuda")
                else "CPU process peak RSS (psutil, sampled every 2 ms; batch sizes run in ascending order, so it includes the model and earlier batches)")
    lines += ["", f"Whole pipeline (`CLASP.forward`), peak memory = {mem_kind}:", "",
              "| batch | with CRF: ms/image | with CRF: images/s | peak MiB | no CRF: ms/image | no CRF: images/s | peak MiB | K same as stages |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.batch_size} | {r.whole_crf_ms_per_image:.1f} | {r.images_per_s_crf:.2f} | {r.peak_mem_crf_mib:.0f} | "
                     f"{r.whole_nocrf_ms_per_image:.1f} | {r.images_per_s_nocrf:.2f} | {r.peak_mem_nocrf_mib:.0f} | "
                     f"{'yes' if r.k_consistent else 'no'} |")
    if ref:
        intro = ("References on the same features of the same images as ours (`benchmarks/reference.py`, numpy/sklearn/"
                 f"pydensecrf), warmed up, timed right after each batch size, median of {meta['repeats']} passes per image. "
                 "Literal: numpy `eigh` of the n x n affinity; Gram path: numpy `eigh` of the D x D Gram matrix (clasp_torch's "
                 "algebra), the same sklearn `KMeans(n_init=10)` and `silhouette_score` per K. Reference whole = backbone "
                 "(ours, same features) + reference spectral+clustering + nearest upsampling + pydensecrf; ours whole = "
                 "`CLASP.forward` with the CRF.")
        header = ("| batch | images | literal reference ms (eigh / KMeans / silhouette) | Gram-path reference ms (eigh / "
                  "KMeans / silhouette) | pydensecrf ms | ours `cluster_features` ms | spectral+clustering: literal / ours "
                  "| Gram path / ours | whole with CRF: literal / ours | Gram path / ours |")
        lines += ["", intro, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            rf = r.extras.get("reference")
            if not rf:
                continue
            mine = r.extras["ours_on_reference_images"]
            lines.append(f"| {r.batch_size} | {rf['n']} | {rf['spectral_cluster']:.0f} ({rf['eigh']:.0f} / {rf['kmeans']:.0f} / "
                         f"{rf['silhouette']:.0f}) | {rf['gram_spectral_cluster']:.0f} ({rf['gram_eigh']:.1f} / "
                         f"{rf['gram_kmeans']:.0f} / {rf['gram_silhouette']:.0f}) | {rf['crf']:.0f} | "
                         f"{mine['spectral_cluster_ms']:.0f} | {r.extras['ratio_spectral_cluster']:.2f}x | "
                         f"{r.extras['ratio_spectral_cluster_gram']:.2f}x | {r.extras['ratio_whole_crf']:.2f}x | "
                         f"{r.extras['ratio_whole_crf_gram']:.2f}x |")
    return "\n".join(lines) + "\n"


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


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
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
    imgs = [im.to(device) for im in imgs]
    machine = machine_description(device)
    print(describe(machine), flush=True)
    print(f"{len(imgs)} images {args.size[0]}x{args.size[1]} from {source}; backbone {args.backbone} "
          f"({'pretrained' if pretrained else 'random weights'}), amp={args.amp}, device {device}", flush=True)

    ref_on = not args.no_reference and args.ref_images > 0
    if ref_on:
        # the references run on the very same backbone features of the very images ours is timed on
        ref_imgs = imgs[: args.ref_images]
        ref_feats, _, ref_grids = model.extract_features(ref_imgs)
        run_reference(ref_feats, ref_grids, ref_imgs, 1, with_crf=not args.no_crf)  # warm-up (imports, BLAS)

    results: list[BatchResult] = []
    last_info: dict[str, Any] = {}
    ref_records: list[dict[str, Any]] = []
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        r, last_info = bench_batch(model, imgs, bs, args.repeats, device, with_crf=not args.no_crf)
        results.append(r)
        st = " ".join(f"{s}={r.stage_ms_per_image[s]:.1f}" for s in STAGES)
        print(f"[batch {bs}] ms/image: {st} | "
              f"cluster_features={r.spectral_cluster_ms_per_image:.1f} | whole CRF {r.whole_crf_ms_per_image:.1f} ms "
              f"({r.images_per_s_crf:.2f} img/s, peak {r.peak_mem_crf_mib:.0f} MiB) | "
              f"whole no-CRF {r.whole_nocrf_ms_per_image:.1f} ms ({r.images_per_s_nocrf:.2f} img/s, "
              f"peak {r.peak_mem_nocrf_mib:.0f} MiB) | K consistent={r.k_consistent} | {time.perf_counter() - t0:.0f}s", flush=True)
        if not ref_on:
            continue
        # ours on exactly the images the references run on
        n_ref = min(args.ref_images, r.n_images)
        if n_ref < bs:
            print(f"[reference] batch {bs}: fewer reference images ({n_ref}) than the batch size, no ratio", flush=True)
            continue
        mine = r if n_ref == r.n_images else bench_batch(model, imgs[:n_ref], bs, args.repeats, device,
                                                          with_crf=not args.no_crf)[0]
        n_ref = mine.n_images
        # references timed right after this batch size (adjacent in time: fairer on a machine whose load varies)
        ref, recs = run_reference(ref_feats, ref_grids, ref_imgs, n_ref, with_crf=not args.no_crf, repeats=args.repeats)
        ref_records += [{"after_batch_size": bs, **x} for x in recs]
        ref.setdefault("crf", 0.0)
        ref["n"] = n_ref
        ref["k_agreement_gram"] = sum(x["k"] == x["gram_k"] for x in recs) / max(len(recs), 1)
        ours_sc = mine.spectral_cluster_ms_per_image
        ours_whole = mine.whole_crf_ms_per_image if not args.no_crf else mine.whole_nocrf_ms_per_image
        ratios = {}
        for pre in REFERENCE_VARIANTS.values():
            ratios[pre + "sc"] = ref[pre + "spectral_cluster"] / ours_sc
            ratios[pre + "whole"] = (mine.stage_ms_per_image["backbone"] + ref[pre + "spectral_cluster"] + ref["crf"]) / ours_whole
        r.extras.update(reference=ref, ours_on_reference_images={"n": n_ref, "spectral_cluster_ms": ours_sc,
                                                                 "whole_ms": ours_whole},
                        ratio_spectral_cluster=ratios["sc"], ratio_whole_crf=ratios["whole"],
                        ratio_spectral_cluster_gram=ratios["gram_sc"], ratio_whole_crf_gram=ratios["gram_whole"])
        print(f"[reference after batch {bs}] {n_ref} images (the images ours was timed on), {args.repeats} repeats, "
              f"per image: reference_clasp {ref['spectral_cluster']:.0f} ms (eigh {ref['eigh']:.0f}, KMeans "
              f"{ref['kmeans']:.0f}, silhouette {ref['silhouette']:.0f}); Gram-path reference {ref['gram_spectral_cluster']:.0f} ms "
              f"(eigh {ref['gram_eigh']:.0f}, KMeans {ref['gram_kmeans']:.0f}, silhouette {ref['gram_silhouette']:.0f}); "
              f"pydensecrf {ref['crf']:.0f} ms", flush=True)
        print(f"[ratio batch {bs}] spectral+clustering reference/ours = {ratios['sc']:.1f}x (target >= 20x), "
              f"Gram-path reference/ours = {ratios['gram_sc']:.1f}x; whole pipeline{' with CRF' if not args.no_crf else ''} "
              f"reference/ours = {ratios['whole']:.2f}x (target >= 2x), Gram-path reference/ours = {ratios['gram_whole']:.2f}x",
              flush=True)
    ref_summary = {"n": args.ref_images, "repeats": args.repeats} if ref_on else None

    feats = last_info.get("features")
    meta = {
        "machine": machine_description(device), "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
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
        _makedirs_for(args.markdown_file)
        with open(args.markdown_file, "w") as fh:
            fh.write(md)
    if args.csv:
        _makedirs_for(args.csv)
        with open(args.csv, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["device", "backbone", "batch_size", "n_images", *[f"{s}_ms" for s in STAGES],
                         "cluster_features_ms", "whole_crf_ms", "images_per_s_crf", "peak_mem_crf_mib",
                         "whole_nocrf_ms", "images_per_s_nocrf", "peak_mem_nocrf_mib", "ratio_spectral_cluster",
                         "ratio_whole_crf", "k_consistent", "ratio_spectral_cluster_gram", "ratio_whole_crf_gram"])
            for r in results:
                wr.writerow([str(device), args.backbone, r.batch_size, r.n_images,
                             *[f"{r.stage_ms_per_image[s]:.3f}" for s in STAGES], f"{r.spectral_cluster_ms_per_image:.3f}",
                             f"{r.whole_crf_ms_per_image:.3f}", f"{r.images_per_s_crf:.4f}", f"{r.peak_mem_crf_mib:.1f}",
                             f"{r.whole_nocrf_ms_per_image:.3f}", f"{r.images_per_s_nocrf:.4f}", f"{r.peak_mem_nocrf_mib:.1f}",
                             f"{r.extras.get('ratio_spectral_cluster', float('nan')):.3f}",
                             f"{r.extras.get('ratio_whole_crf', float('nan')):.3f}", int(r.k_consistent),
                             f"{r.extras.get('ratio_spectral_cluster_gram', float('nan')):.3f}",
                             f"{r.extras.get('ratio_whole_crf_gram', float('nan')):.3f}"])
    payload = {"meta": meta, "results": [asdict(r) for r in results], "reference": ref_summary, "reference_images": ref_records}
    if args.json:
        _makedirs_for(args.json)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
    return payload


def write_outputs(*pairs: tuple[str | None, str]) -> None:
    """Write each ``(path, text)`` whose path is set, creating parent folders."""
    for path, text in pairs:
        if path:
            _makedirs_for(path)
            with open(path, "w") as fh:
                fh.write(text + "\n")


def _makedirs_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


if __name__ == "__main__":
    main()
