"""Lightning integration: ``trainer.predict`` / ``trainer.test`` over DataLoaders, any scale.

* :class:`CLASPPredictor` wraps a :class:`~clasp_torch.pipeline.CLASP` model. ``predict_step``
  segments a batch from :func:`clasp_torch.data.collate_images` and returns small per-image
  records (label maps on the CPU); a bad image is isolated, reported and skipped.
  ``test_step`` updates unsupervised-segmentation metrics for the patch and pixel variants.
* :class:`SegmentationWriter` is a ``BasePredictionWriter`` that writes each batch's outputs as
  it finishes (atomically), so ``trainer.predict(..., return_predictions=False)`` keeps nothing
  in memory however many images there are.
* Multi-GPU / multi-node: ``Trainer(devices=N, strategy="ddp")``. For prediction Lightning
  replaces the sampler with an un-repeated distributed sampler, so every image is processed by
  exactly one process (no padding duplicates); the writer's per-rank logs make this checkable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric

from .pipeline import CLASP, CLASPOutput
from .viz import atomic_write_bytes, overlay, save_image_atomic, save_label_png

__all__ = ["CLASPPredictor", "SegmentationWriter", "output_stem", "segment_statistics"]


def output_stem(path: str, root: str | None) -> str:
    """Output name of an input: its path relative to ``root`` without the suffix (POSIX form)."""
    p = Path(path)
    if root is not None:
        try:
            rel = p.resolve().relative_to(Path(root).resolve())
            return rel.with_suffix("").as_posix()
        except ValueError:
            pass
    return p.stem


def segment_statistics(labels: Tensor) -> list[dict[str, Any]]:
    """Per-segment area and bounding box of a ``(H, W)`` label map (JSON-ready)."""
    from torchvision.ops import masks_to_boxes

    ids = [int(v) for v in labels.unique() if int(v) >= 0]
    if not ids:
        return []
    masks = torch.stack([labels == i for i in ids])
    boxes = masks_to_boxes(masks).tolist()
    areas = masks.flatten(1).sum(-1).tolist()
    return [{"id": i, "area": int(a), "box_xyxy": [round(v, 1) for v in b]} for i, a, b in zip(ids, areas, boxes)]


class CLASPPredictor(pl.LightningModule):
    """Lightning wrapper of :class:`CLASP` for prediction and evaluation.

    Args:
        model: a :class:`CLASP` instance, or keyword arguments to build one (``clasp_kwargs``).
        num_classes: ground-truth classes, for ``test_step`` metrics (optional).
        clasp_kwargs: used when ``model`` is None.

    ``predict_step`` returns ``list[dict]`` with, per image: ``path``, ``index``, ``labels``
    (``(H, W)`` int64 CPU tensor) or ``error`` (a one-line reason).
    """

    def __init__(self, model: CLASP | None = None, num_classes: int | None = None, **clasp_kwargs: Any) -> None:
        super().__init__()
        self.model = model if model is not None else CLASP(**clasp_kwargs)
        self.num_classes = num_classes
        if num_classes is not None:
            from .metrics import UnsupervisedSegmentationMetric

            self.metric_patch = UnsupervisedSegmentationMetric(num_classes)
            self.metric_pixel = UnsupervisedSegmentationMetric(num_classes)
            self.mean_k = MeanMetric()
            self.n_images = SumMetric()

    def forward(self, images: Sequence[Tensor] | Tensor) -> CLASPOutput:
        return self.model(images)

    def _segment(self, images: list[Tensor]) -> tuple[CLASPOutput | None, list[tuple[int, CLASPOutput | str]]]:
        """Segment a batch; on failure retry image by image to isolate the bad ones."""
        try:
            return self.model(images), []
        except (ValueError, RuntimeError) as exc:  # one bad image must not sink the batch
            if len(images) == 1:
                return None, [(0, _reason(exc))]
            single: list[tuple[int, CLASPOutput | str]] = []
            for i, im in enumerate(images):
                try:
                    single.append((i, self.model([im])))
                except (ValueError, RuntimeError) as e:
                    single.append((i, _reason(e)))
            return None, single

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [
            {"path": e["path"], "index": int(e["index"]), "error": e["error"]} for e in batch.get("errors", [])
        ]
        images: list[Tensor] = batch["image"]
        if not images:
            return records
        # Inputs the model rejects for sure (e.g. smaller than one patch) are reported up front,
        # so they do not force the rest of the batch through the one-by-one retry.
        keep: list[int] = []
        for i, im in enumerate(images):
            problem = self._check_image(im)
            if problem is None:
                keep.append(i)
            else:
                records.append({"path": batch["path"][i], "index": int(batch["index"][i]), "error": problem})
        if not keep:
            return records
        out, singles = self._segment([images[i] for i in keep])
        if out is not None:
            singles = [(j, out) for j in range(len(keep))]
        for j, res in singles:
            i = keep[j]
            rec: dict[str, Any] = {"path": batch["path"][i], "index": int(batch["index"][i])}
            if isinstance(res, str):
                rec["error"] = res
            else:
                r = j if out is not None else 0
                rec.update(
                    image=images[i],
                    labels=res.label_map(r).cpu(),
                    k=int(res.k[r]),
                    k_opt=int(res.k_opt[r]),
                )
            records.append(rec)
        records.sort(key=lambda rec: rec["index"])
        return records

    def _check_image(self, image: Tensor) -> str | None:
        """One-line reason why the model cannot segment ``image``, or ``None``."""
        from .preprocess import target_size

        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            return f"ValueError: expected a (3, H, W) RGB image, got {shape}"
        try:
            target_size(int(image.shape[-2]), int(image.shape[-1]), self.model.backbone.patch_size,
                        self.model.max_patches)
        except ValueError as exc:
            return _reason(exc)
        return None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.num_classes is None:
            raise ValueError("CLASPPredictor(num_classes=...) is required for evaluation")
        images: list[Tensor] = batch["image"]
        if not images:
            return
        out = self.model(images)
        for i, target in enumerate(batch["label"]):
            H, W = target.shape
            self.metric_patch.update(out.coarse_labels[i, :H, :W], target)
            self.metric_pixel.update(out.labels[i, :H, :W], target)
        self.mean_k.update(out.k.float())
        self.n_images.update(torch.tensor(float(len(images)), device=out.k.device))

    def on_test_epoch_end(self) -> None:
        if self.num_classes is None:
            return
        patch, pixel = self.metric_patch.compute(), self.metric_pixel.compute()
        self.log_dict(
            {
                "patch/miou": patch["miou"], "patch/pixel_accuracy": patch["pixel_accuracy"],
                "pixel/miou": pixel["miou"], "pixel/pixel_accuracy": pixel["pixel_accuracy"],
                "mean_k": self.mean_k.compute(), "n_images": self.n_images.compute(),
            },
            sync_dist=False,  # torchmetrics objects already reduce across processes
        )
        self.metric_patch.reset()
        self.metric_pixel.reset()
        self.mean_k.reset()
        self.n_images.reset()


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {msg}"


class SegmentationWriter(BasePredictionWriter):
    """Writes each finished batch: ``<out>/<stem>.png`` (+ overlay, + JSON), atomically.

    Args:
        out_dir: output folder.
        root: input root, so nested inputs keep their sub-folders (``None``: file stem only).
        overlays: also write ``<stem>_overlay.jpg``.
        stats_json: also write ``<stem>.json`` with K, K_opt and per-segment areas/boxes.
        log_name: per-rank JSON-lines log of every processed input (``<log_name>.rank<r>.jsonl``).
        report_failures: print each failed input on one line (``failed <path>: <reason>``) to
            stderr as soon as its batch is written (through ``tqdm.write``, so a progress bar
            stays intact).

    Outputs are written through a temporary file and renamed, so an interrupted run never leaves
    a half-written file. The label map ``<stem>.png`` is written last, so its presence means
    that every output of the input is complete (``clasp segment --resume`` relies on it).
    Per-rank logs record ``{"path", "index", "ok", "error"?, "k"?}``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        root: str | None = None,
        overlays: bool = True,
        stats_json: bool = False,
        log_name: str = ".clasp_log",
        report_failures: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.report_failures = report_failures
        self.out_dir = Path(out_dir)
        self.root = root
        self.overlays = overlays
        self.stats_json = stats_json
        self.log_name = log_name
        self.n_ok = 0
        self.failures: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def log_path(self, rank: int) -> Path:
        return self.out_dir / f"{self.log_name}.rank{rank}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path(trainer.global_rank).write_text("")
        self.n_ok, self.failures, self._t0 = 0, [], time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        lines = []
        for rec in prediction:
            entry: dict[str, Any] = {"path": rec["path"], "index": rec["index"]}
            if "error" in rec:
                entry.update(ok=False, error=rec["error"])
                self.failures.append(entry)
            else:
                try:
                    self._write_one(rec)
                    entry.update(ok=True, k=rec["k"], k_opt=rec["k_opt"])
                    self.n_ok += 1
                except (OSError, ValueError) as exc:
                    entry.update(ok=False, error=f"could not write output: {exc}")
                    self.failures.append(entry)
            if not entry["ok"] and self.report_failures:
                _report_line(f"failed {entry['path']}: {entry['error']}")
            lines.append(json.dumps(entry))
        with open(self.log_path(trainer.global_rank), "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))

    def _write_one(self, rec: dict[str, Any]) -> None:
        stem = output_stem(rec["path"], self.root)
        labels: Tensor = rec["labels"]
        if self.overlays:
            ov = overlay(rec["image"].cpu(), labels)
            save_image_atomic(Image.fromarray(ov), self.out_dir / f"{stem}_overlay.jpg", quality=90)
        if self.stats_json:
            info = {"path": rec["path"], "k": rec["k"], "k_opt": rec["k_opt"], "segments": segment_statistics(labels)}
            atomic_write_bytes(self.out_dir / f"{stem}.json", json.dumps(info, indent=1).encode())
        save_label_png(labels, self.out_dir / f"{stem}.png")  # last: marks the input as done


def _report_line(msg: str) -> None:
    """One line on stderr that does not break a tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except Exception:  # pragma: no cover - tqdm is a Lightning dependency
        print(msg, file=sys.stderr, flush=True)


def read_logs(out_dir: str | os.PathLike[str], log_name: str = ".clasp_log") -> list[dict[str, Any]]:
    """All records of the per-rank logs of a run (for summaries and tests)."""
    recs: list[dict[str, Any]] = []
    for p in sorted(Path(out_dir).glob(f"{log_name}.rank*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                recs.append(json.loads(line))
    return recs

