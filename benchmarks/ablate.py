"""Ablation of feature smoothing and k-means effort on both dev sets; picks the ``best`` and ``fast`` presets.

Every figure comes from the real ``CLASP.forward`` (``refiner=None`` for the patch variant, the
default dense CRF for the CRF variant), built from a settings dict through
``clasp_torch.presets.clasp_kwargs`` exactly as a preset is; only the backbone is cached: its
features are computed once per image (``CLASP.extract_features``) and the models' own
``extract_features`` returns them. Scores: Hungarian-matched mIoU and pixel accuracy per image
(``UnsupervisedSegmentationMetric``, the CLASP protocol of ``clasp eval``), mean K, and K agreement
with the literal reference (``benchmarks.reference.reference_clasp``: numpy ``eigh`` + sklearn
``KMeans(n_init=10)`` + ``silhouette_score``) run on the very features the variant clusters
(after its smoothing). Times: ms per image of ``forward`` without the backbone (median over the
images after one warm-up image), of its ``cluster_features`` call (spectral + clustering), and of
the backbone once per image.

Stages, in order (each result is cached in the JSON; rerun the same command to resume):

1. ``sweep`` (patch variant): paper (no smoothing) and every smoothing kind (gaussian, joint
   bilateral, guided) x sigma in {0.5, 0.75, 1, 1.25, 1.5, 2} patches, each with k-means
   ``n_init`` in {1, 3, 10} (default second parameters: bilateral colour scale 0.1, guided eps
   0.01); plus the edge-aware kinds' second parameter (colour scale 0.05 / 0.2, eps 0.001 / 0.1)
   at sigma in {0.5, 1, 1.5, 2}, each with the same three ``n_init``.
2. ``fast`` (patch): no smoothing, the best sweep smoothing and the best Gaussian one (the cheapest
   kind), ``n_init`` in {1, 3}, ``max_iter`` in {300, 100, 50, 20, 10, 5}.
3. ``crf``: the CRF variant (~1-1.5 s per image here, so not for every setting) of paper, of the
   top ``--crf-candidates`` patch candidates (distinct smoothings) and of ``fast``.
4. ``final``: paper, best and fast once more, image by image interleaved with the literal
   reference on their features, in one run: K agreement and the spectral+clustering time ratio.

Selection (never on single images): ``best`` = the highest mean patch mIoU over the two sets among
the settings with ``max_iter`` 300 whose patch pixel accuracy is not below paper's on either set and,
where its CRF variant was run, whose CRF mIoU and pixel accuracy beat paper's CRF on both sets;
``fast`` = the least mean patch ``forward`` time (smoothing + spectral + clustering + upsampling,
backbone cached) among the ``fast``-stage settings whose patch mIoU is within 0.3 of paper's on both sets.

    python -m benchmarks.ablate --threads 1 --budget-s 540   # exit 3: budget spent, run again to resume
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.run import ROOT, describe, machine_description, thread_limits, write_outputs

DATASET_DIRS = {"cocostuff": "cocostuff-val-dev", "ade20k": "ade20k-val-dev"}
SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
KINDS = ("gaussian", "bilateral", "guided")
N_INITS = (1, 3, 10)
FAST_N_INITS = (1, 3)
FAST_MAX_ITERS = (300, 100, 50, 20, 10, 5)
EDGE_PARAMS = (("bilateral", "smoothing_sigma_color", (0.05, 0.2)), ("guided", "smoothing_eps", (0.001, 0.1)))
EDGE_SIGMAS = (0.5, 1.0, 1.5, 2.0)
FAST_MIOU_SLACK = 0.3
BEST_CRF_TRIES = 6
EXIT_BUDGET = 3


# ----------------------------------------------------------------------------- settings


def settings_of(smoothing: dict[str, Any] | None = None, **clustering: Any) -> dict[str, Any]:
    """Preset-style settings: paper's clustering with ``clustering`` and ``smoothing`` keys applied."""
    from clasp_torch.presets import resolve_preset

    return resolve_preset("paper", **(smoothing or {}), **clustering)


def smoothing_part(s: dict[str, Any]) -> dict[str, Any]:
    from clasp_torch.presets import SMOOTHING_KEYS

    return {k: s[k] for k in SMOOTHING_KEYS if k in s and s[k] is not None and s.get("smoothing") != "none"}


def key_of(s: dict[str, Any]) -> str:
    """Canonical text key of settings, e.g. ``gaussian(sigma=1.0)|n_init=10|max_iter=300``."""
    sm = smoothing_part(s)
    kind = sm.pop("smoothing", "none")
    args = ",".join(f"{k.removeprefix('smoothing_')}={v}" for k, v in sorted(sm.items()))
    return f"{kind}({args})|n_init={s['n_init']}|max_iter={s['max_iter']}"


def smoothing_key(s: dict[str, Any]) -> str:
    return key_of(s).split("|")[0]


def sweep_settings() -> list[dict[str, Any]]:
    out = [settings_of(n_init=n) for n in N_INITS]
    for kind in KINDS:
        for sigma in SIGMAS:
            out += [settings_of({"smoothing": kind, "smoothing_sigma": sigma}, n_init=n) for n in N_INITS]
    for kind, param, values in EDGE_PARAMS:
        for sigma in EDGE_SIGMAS:
            out += [settings_of({"smoothing": kind, "smoothing_sigma": sigma, param: v}, n_init=n)
                    for v in values for n in N_INITS]
    return out


# ----------------------------------------------------------------------------- data and features


@dataclass
class DevSet:
    """A dev set in memory: images, labels and their cached backbone features."""

    name: str
    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    num_classes: int
    features: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    backbone_ms: float = 0.0


def load_dev_set(name: str, data: str, backbone: torch.nn.Module, limit: int | None) -> DevSet:
    from clasp_torch.data import SegmentationDataset
    from clasp_torch.pipeline import CLASP

    ds = SegmentationDataset(os.path.join(data, DATASET_DIRS[name]), dataset=name, limit=limit)
    items = [ds[i] for i in range(len(ds))]
    dev = DevSet(name, [it["image"] for it in items], [it["label"] for it in items], ds.num_classes)
    model = CLASP(backbone, refiner=None).eval()
    times = []
    for im in dev.images:
        t0 = time.perf_counter()
        dev.features.append(model.extract_features([im]))
        times.append(time.perf_counter() - t0)
    dev.backbone_ms = 1000 * statistics.median(times[1:] or times)
    return dev


class Recorder:
    """Replaces a model's ``extract_features`` (cached features of ``current``) and times its
    ``cluster_features``: the rest of ``CLASP.forward`` runs as it is."""

    def __init__(self, model: Any) -> None:
        self.current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cluster_s = 0.0
        inner: Callable[..., Any] = model.cluster_features

        def cluster(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            self.cluster_s = time.perf_counter() - t0
            return out

        model.extract_features = lambda imgs: self.current
        model.cluster_features = cluster


def build_model(settings: dict[str, Any], variant: str, backbone: torch.nn.Module) -> tuple[Any, Recorder]:
    from clasp_torch.pipeline import CLASP
    from clasp_torch.presets import clasp_kwargs

    model = CLASP(backbone, refiner=None if variant == "patch" else "crf", **clasp_kwargs(settings)).eval()
    return model, Recorder(model)


def run_image(model: Any, rec: Recorder, dev: DevSet, i: int) -> tuple[Any, float, float]:
    """``(output, forward seconds, cluster_features seconds)`` of image ``i``."""
    rec.current = dev.features[i]
    t0 = time.perf_counter()
    out = model(dev.images[i])
    return out, time.perf_counter() - t0, rec.cluster_s


def evaluate(settings: dict[str, Any], variant: str, dev: DevSet, backbone: torch.nn.Module) -> dict[str, Any]:
    """Scores and times of one setting on one dev set (see the module docstring)."""
    from clasp_torch.metrics import UnsupervisedSegmentationMetric

    model, rec = build_model(settings, variant, backbone)
    metric = UnsupervisedSegmentationMetric(dev.num_classes)
    run_image(model, rec, dev, 0)  # warm-up, untimed
    ks, t_fwd, t_cl = [], [], []
    for i in range(len(dev.images)):
        out, tf, tc = run_image(model, rec, dev, i)
        metric.update(out.label_map(0), dev.labels[i])
        ks.append(int(out.k[0]))
        t_fwd.append(tf)
        t_cl.append(tc)
    s = metric.compute()
    return {"settings": settings, "variant": variant, "images": len(ks),
            "miou": 100 * float(s["miou"]), "pixel_accuracy": 100 * float(s["pixel_accuracy"]),
            "mean_k": statistics.mean(ks), "ks": ks,
            "ms_forward": 1000 * statistics.median(t_fwd), "ms_cluster": 1000 * statistics.median(t_cl)}


def clustered_features(settings: dict[str, Any], dev: DevSet, i: int) -> np.ndarray:
    """``(h, w, D)`` float64: the features the setting's ``cluster_features`` sees for image ``i``."""
    from clasp_torch.pipeline import patch_guides
    from clasp_torch.presets import build_smoothing

    feats, pmask, grids = dev.features[i]
    sm = build_smoothing(settings)
    if sm is not None:
        guide = patch_guides([dev.images[i]], grids) if sm.needs_guide else None
        feats = sm(feats, pmask, guide)
    h, w = int(grids[0, 0]), int(grids[0, 1])
    return feats[0, :h, :w].double().numpy()


# ----------------------------------------------------------------------------- selection


def paper_key(variant: str = "patch") -> str:
    return f"{variant}:{key_of(settings_of())}"


def both(res: dict[str, dict[str, Any]], key: str) -> list[dict[str, Any]] | None:
    rows = [res.get(ds, {}).get(key) for ds in DATASET_DIRS]
    return None if any(r is None for r in rows) else rows  # type: ignore[return-value]


def mean_of(rows: list[dict[str, Any]], metric: str) -> float:
    return statistics.mean(r[metric] for r in rows)


def patch_candidates(res: dict[str, dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """``(mean patch mIoU, settings)`` of the max_iter-300 settings whose patch pixel accuracy is
    not below paper's on either set, best first."""
    paper = both(res, paper_key())
    if paper is None:
        return []
    out = []
    for s in sweep_settings():
        rows = both(res, f"patch:{key_of(s)}")
        if rows and all(r["pixel_accuracy"] >= p["pixel_accuracy"] for r, p in zip(rows, paper)):
            out.append((mean_of(rows, "miou"), s))
    return sorted(out, key=lambda t: -t[0])


def crf_candidates(res: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The top ``n`` patch candidates with distinct smoothings (each with its best n_init)."""
    seen, out = set(), []
    for _, s in patch_candidates(res):
        if smoothing_key(s) not in seen and smoothing_key(s) != smoothing_key(settings_of()):
            seen.add(smoothing_key(s))
            out.append(s)
    return out[:n]


def beats_paper_crf(res: dict[str, dict[str, Any]], s: dict[str, Any]) -> bool | None:
    rows, paper = both(res, f"crf:{key_of(s)}"), both(res, paper_key("crf"))
    if rows is None or paper is None:
        return None
    return all(r[m] > p[m] for r, p in zip(rows, paper) for m in ("miou", "pixel_accuracy"))


def choose_best(res: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The first of the top ``BEST_CRF_TRIES`` patch candidates whose CRF variant beats paper's, or
    was not run yet (then the ``crf`` stage runs it); the top patch candidate when none does."""
    cands = patch_candidates(res)
    for _, s in cands[:BEST_CRF_TRIES]:
        if beats_paper_crf(res, s) is not False:
            return s
    return cands[0][1] if cands else None


def fast_settings(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """No smoothing, best's smoothing and the best Gaussian one (the cheapest kind), each with
    ``FAST_N_INITS`` x ``FAST_MAX_ITERS``."""
    best = choose_best(res)
    gauss = next((s for _, s in patch_candidates(res) if s.get("smoothing") == "gaussian"), None)
    smooths = [{}]
    for s in (best, gauss):
        if s is not None and smoothing_part(s) and smoothing_part(s) not in smooths:
            smooths.append(smoothing_part(s))
    return [settings_of(sm, n_init=n, max_iter=m) for sm in smooths for n in FAST_N_INITS for m in FAST_MAX_ITERS]


def choose_fast(res: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    paper = both(res, paper_key())
    ok = []
    for s in fast_settings(res):
        rows = both(res, f"patch:{key_of(s)}")
        if paper and rows and all(r["miou"] >= p["miou"] - FAST_MIOU_SLACK for r, p in zip(rows, paper)):
            ok.append((mean_of(rows, "ms_forward"), s))  # smoothing + spectral + clustering (+ upsampling)
    return min(ok, key=lambda t: t[0])[1] if ok else None


# ----------------------------------------------------------------------------- stages


def final_stage(presets: dict[str, dict[str, Any]], dev: DevSet, backbone: torch.nn.Module) -> dict[str, Any]:
    """Paper, best and fast image by image, interleaved with the literal reference on each
    distinct feature set they cluster: K agreement and times of one run."""
    from benchmarks.reference import reference_clasp

    models = {name: build_model(s, "patch", backbone) for name, s in presets.items()}
    feats_of = {smoothing_key(s): s for s in presets.values()}
    for model, rec in models.values():
        run_image(model, rec, dev, 0)  # warm-up
    reference_clasp(clustered_features(settings_of(), dev, 0))
    rows: dict[str, dict[str, list[float]]] = {name: {"k": [], "cl": [], "fwd": []} for name in presets}
    ref: dict[str, dict[str, list[float]]] = {sk: {"k": [], "k_opt": [], "s": []} for sk in feats_of}
    for i in range(len(dev.images)):
        for name, (model, rec) in models.items():
            out, tf, tc = run_image(model, rec, dev, i)
            rows[name]["k"].append(int(out.k[0]))
            rows[name]["cl"].append(tc)
            rows[name]["fwd"].append(tf)
        for sk, s in feats_of.items():
            f = clustered_features(s, dev, i)
            t0 = time.perf_counter()
            r = reference_clasp(f)
            ref[sk]["s"].append(time.perf_counter() - t0)
            ref[sk]["k"].append(r.k)
            ref[sk]["k_opt"].append(r.k_opt)
    result: dict[str, Any] = {"reference": {}, "presets": {}}
    for sk, r in ref.items():
        result["reference"][sk] = {"ks": r["k"], "k_opts": r["k_opt"],
                                   "ms_spectral_cluster": 1000 * statistics.median(r["s"])}
    for name, s in presets.items():
        r, rf = rows[name], ref[smoothing_key(s)]
        ms_cl = 1000 * statistics.median(r["cl"])
        result["presets"][name] = {
            "settings": s, "ks": r["k"], "ms_cluster": ms_cl, "ms_forward": 1000 * statistics.median(r["fwd"]),
            "k_agreement": statistics.mean(a == b for a, b in zip(r["k"], rf["k"])),
            "reference_ms_spectral_cluster": 1000 * statistics.median(rf["s"]),
            "reference_over_ours": 1000 * statistics.median(rf["s"]) / ms_cl,
        }
    return result


def pending(res: dict[str, Any], stage: str, n_crf: int) -> list[tuple[str, dict[str, Any]]]:
    """``(variant, settings)`` still to run in ``stage`` (on some dev set)."""
    r = res["runs"]
    if stage == "sweep":
        todo = [("patch", s) for s in sweep_settings()]
    elif stage == "fast":
        todo = [("patch", s) for s in fast_settings(r)] if len(patch_candidates(r)) else []
    else:  # crf
        extra = [s for s in (choose_best(r), choose_fast(r)) if s is not None]  # best: until one beats paper's CRF
        todo = [("crf", s) for s in [settings_of(), *crf_candidates(r, n_crf), *extra]]
    return [(v, s) for v, s in todo if both(r, f"{v}:{key_of(s)}") is None]


def out_of_budget(save: Callable[[], None], budget_s: float, left: str) -> int:
    save()
    print(f"budget of {budget_s:.0f} s spent; run again to resume ({left})", flush=True)
    return EXIT_BUDGET


def run(args: argparse.Namespace) -> int:
    from clasp_torch.backbones import get_backbone

    t_start = time.perf_counter()
    res: dict[str, Any] = {"runs": {}, "final": {}, "backbone_ms": {}}
    if os.path.exists(args.json):
        with open(args.json) as fh:
            res = json.load(fh)
    res["meta"] = {"machine": machine_description(), "threads": args.threads, "backbone": args.backbone,
                   "limit": args.limit, "command": "python -m benchmarks.ablate " + " ".join(sys.argv[1:])}

    def save() -> None:
        write_outputs((args.json + ".tmp", json.dumps(res, indent=1)))
        os.replace(args.json + ".tmp", args.json)  # an interrupted run never leaves half a cache

    torch.manual_seed(0)
    backbone = get_backbone(args.backbone).eval()
    devs = {name: load_dev_set(name, args.data, backbone, args.limit) for name in DATASET_DIRS}
    for name, dev in devs.items():
        res["backbone_ms"][name] = dev.backbone_ms
    print(describe(res["meta"]["machine"]), flush=True)
    # a later stage's result can change an earlier stage's list (best's CRF -> fast's smoothing): loop to a fixed point
    stages = ("sweep", "fast", "crf")
    while stage_todo := next(((st, t) for st in stages if (t := pending(res, st, args.crf_candidates))), None):
        stage, todo = stage_todo
        if time.perf_counter() - t_start > args.budget_s:
            return out_of_budget(save, args.budget_s, f"{stage}: {len(todo)} settings left")
        variant, s = todo[0]
        for name, dev in devs.items():
            row = evaluate(s, variant, dev, backbone)
            res["runs"].setdefault(name, {})[f"{variant}:{key_of(s)}"] = row
            print(f"{stage:5} {name:9} {variant}:{key_of(s):52} mIoU {row['miou']:5.2f} "
                  f"acc {row['pixel_accuracy']:5.2f} K {row['mean_k']:5.2f} cluster {row['ms_cluster']:6.1f} ms",
                  flush=True)
        save()
    presets = {"paper": settings_of(), "best": choose_best(res["runs"]), "fast": choose_fast(res["runs"])}
    if any(v is None for v in presets.values()):
        print("no admissible best/fast setting", presets)
        return 1
    res["selection"] = presets
    for name, dev in devs.items():
        if res["final"].get(name, {}).get("presets", {}).keys() != presets.keys() or any(
                res["final"][name]["presets"][p]["settings"] != s for p, s in presets.items()):
            if time.perf_counter() - t_start > args.budget_s:
                return out_of_budget(save, args.budget_s, f"final: {name}")
            res["final"][name] = final_stage(presets, dev, backbone)
            save()
    save()
    print(summary(res))
    return 0


def summary(res: dict[str, Any]) -> str:
    """Markdown table of paper / best / fast, both sets, patch and CRF. Patch times come from the
    ``final`` stage (one run with the reference), CRF times from the CRF run; the backbone
    (cached) adds ``backbone_ms`` per image to every row."""
    head = ("| preset | variant | dataset | mIoU | pixel acc. | mean K | K agreement | ms/img forward | "
            "ms/img with backbone | ms/img spectral+clustering | literal ref. ms | ref. / ours |")
    lines = [head, "|" + " --- |" * 12]
    for name, s in res["selection"].items():
        for variant in ("patch", "crf"):
            for ds in DATASET_DIRS:
                r = res["runs"][ds].get(f"{variant}:{key_of(s)}")
                if r is None:
                    continue
                f = res["final"][ds]["presets"][name]
                fwd = f["ms_forward"] if variant == "patch" else r["ms_forward"]
                lines.append(f"| {name} | {variant} | {ds} | {r['miou']:.2f} | {r['pixel_accuracy']:.2f} | "
                             f"{r['mean_k']:.2f} | {100 * f['k_agreement']:.0f} % | {fwd:.0f} | "
                             f"{fwd + res['backbone_ms'][ds]:.0f} | {f['ms_cluster']:.0f} | "
                             f"{f['reference_ms_spectral_cluster']:.0f} | {f['reference_over_ours']:.1f}x |")
    lines += [""] + [f"- `{name}`: `{key_of(s)}`" for name, s in res["selection"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "ablate.json"))
    ap.add_argument("--data", default=os.environ.get("CLASP_DATA", os.path.join(ROOT, "..", "shared", "data")))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--threads", type=int, default=1, help="torch and numpy/sklearn threads (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new setting after this many seconds (exit 3: run again to resume)")
    ap.add_argument("--crf-candidates", type=int, default=3, help="patch candidates also run with the CRF")
    args = ap.parse_args(argv)
    with thread_limits(args.threads):
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
