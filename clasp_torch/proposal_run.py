"""One ``clasp proposals`` run: inputs as in ``clasp segment``, instance proposals, one COCO dataset file.

The inputs (files, folders, ``.tar`` shards, ``@LIST`` files, the naming rule), their loaders and
the split over processes are ``clasp segment``'s (:func:`clasp_torch.inputs.plan_inputs`,
:class:`clasp_torch.segment_run.CollectionData`); so are the per-input failures: a bad input is
reported and skipped (:class:`clasp_torch.lightning.CLASPPredictor` isolates it). Each process
appends its images' annotations to its own JSON-lines part as batches finish (memory stays flat);
rank 0 then assigns the ids (:func:`clasp_torch.coco.image_ids`, images sorted by output name)
and streams the parts into the dataset file, written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .coco import image_ids, proposal_annotations, write_coco_dataset
from .inputs import InputPlan
from .lightning import CLASPPredictor
from .segment_run import CollectionData, SegmentConfig, SegmentRun
from .sources import FileSource

__all__ = ["ProposalConfig", "ProposalPredictor", "ProposalWriter", "build_proposal_run", "assemble_dataset"]


@dataclass
class ProposalConfig:
    """Settings of a ``clasp proposals`` run (the CLI's flags)."""

    inputs: list[str]
    out: str
    max_per_image: int = 100
    min_area: int = 64
    refine_band: bool = True
    band: dict[str, Any] = field(default_factory=dict)  # refine_band_labels options (max_pixels, max_maps)
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    num_workers: int | str = "auto"
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    progress: bool = True


class ProposalPredictor(CLASPPredictor):
    """:class:`~clasp_torch.lightning.CLASPPredictor` whose records carry COCO annotations.

    The model must be built with ``keep_band_labels=True``. Each successful record gets
    ``height``, ``width`` and ``annotations`` (no ids yet); its label map and image are dropped.
    """

    def __init__(
        self, model: Any, refine_band: bool = True, band: dict[str, Any] | None = None, **options: Any
    ) -> None:
        super().__init__(model, keep_images=False)  # records drop the image: never copy it back
        self.refine_band = refine_band
        self.band = dict(band or {})
        self.options = options
        self._found: dict[int, dict[str, Any]] = {}

    def _proposals(self, images: list[Tensor], out: Any) -> list[dict[str, Any]]:
        from .band import refine_band_labels
        from .instances import instance_proposals

        band = refine_band_labels(images, out, **self.band) if self.refine_band else None
        props = instance_proposals(out, band_labels=band, **self.options)
        anns = proposal_annotations(props, list(range(len(images))))
        per: list[list[dict[str, Any]]] = [[] for _ in images]
        for a in anns:
            per[a.pop("image_id")].append(a)
        for a in anns:
            a.pop("id")
        return [{"height": int(im.shape[-2]), "width": int(im.shape[-1]), "annotations": p}
                for im, p in zip(images, per)]

    def _segment(self, images: list[Tensor]) -> tuple[Any, list[tuple[int, Any]]]:
        out, singles = super()._segment(images)
        if out is not None:
            for im, res in zip(images, self._proposals(images, out)):
                self._found[id(im)] = res
        for j, res in singles:
            if not isinstance(res, str):
                self._found[id(images[j])] = self._proposals([images[j]], res)[0]
        return out, singles

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        self._found = {}
        records = super().predict_step(batch, batch_idx, dataloader_idx)
        where = {int(batch["index"][i]): im for i, im in enumerate(batch.get("image", []))}
        for rec in records:
            if "error" in rec:
                continue
            im = where.get(int(rec["index"]))
            found = self._found.get(id(im)) if im is not None else None
            rec.pop("image", None)
            rec.pop("labels", None)
            if found is None:  # pragma: no cover - every segmented image has proposals
                rec["error"] = "RuntimeError: no proposals were computed for this input"
            else:
                rec.update(found)
        self._found = {}
        return records


def _file_name(rec: dict[str, Any]) -> str:
    """The ``file_name`` of an image: its output name with the input's suffix (a shard sample: its key path)."""
    path = str(rec["path"])
    if ".tar:" in path:
        return path
    return rec["name"] + Path(path).suffix


class ProposalWriter(BasePredictionWriter):
    """Appends every record to this process's JSON-lines part ``<out>.part<rank>.jsonl``."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.rank = 0
        self.n_ok = 0
        self.failures: list[dict[str, Any]] = []

    def part_path(self, rank: int) -> Path:
        return self.out.with_name(f".{self.out.name}.part{rank}.jsonl")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rank = trainer.global_rank
        self.part_path(self.rank).unlink(missing_ok=True)

    def write_on_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
        batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        with open(self.part_path(self.rank), "a", encoding="utf-8") as fh:
            for rec in prediction:
                entry = {"path": rec["path"], "name": rec.get("name") or Path(str(rec["path"])).stem}
                if "error" in rec:
                    entry["error"] = rec["error"]
                    self.failures.append(entry)
                else:
                    entry.update(file_name=_file_name({**rec, **entry}), height=rec["height"], width=rec["width"],
                                 annotations=rec["annotations"])
                    self.n_ok += 1
                fh.write(json.dumps(entry) + "\n")

    def finish(self, complete: bool) -> None:
        """Nothing is buffered: every batch is on disk when its call returns."""


def _records(parts: list[Path]) -> Iterator[dict[str, Any]]:
    for p in parts:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def assemble_dataset(
    out: str | os.PathLike[str], parts: list[Path], info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Merge the JSON-lines parts into the COCO dataset file ``out`` (atomically) and remove them.

    Returns:
        ``{"images", "annotations", "failures"}``: counts and the failed inputs.
    """
    heads = []  # (name, file_name, height, width): one small tuple per image
    failures = []
    for rec in _records(parts):
        if "error" in rec:
            failures.append({"path": rec["path"], "error": rec["error"]})
        else:
            heads.append((rec["name"], rec["file_name"], rec["height"], rec["width"]))
    heads.sort()
    ids = image_ids([h[0] for h in heads])
    id_of = {h[0]: i for h, i in zip(heads, ids)}
    images = [{"id": i, "file_name": f, "height": h, "width": w} for (_, f, h, w), i in zip(heads, ids)]

    def annotations() -> Iterator[dict[str, Any]]:
        n = 0
        for rec in _records(parts):
            for a in rec.get("annotations", []):
                n += 1
                yield {"id": n, "image_id": id_of[rec["name"]], **a}

    n_ann = write_coco_dataset(out, images, annotations(), info=info)
    for p in parts:
        p.unlink(missing_ok=True)
    return {"images": len(images), "annotations": n_ann, "failures": failures}


def build_proposal_run(cfg: ProposalConfig, model: Any, plan: InputPlan) -> SegmentRun:
    """The loaders, predictor, writer and trainer of a ``clasp proposals`` run (run it with ``.run()``)."""
    seg = SegmentConfig(inputs=cfg.inputs, out=str(Path(cfg.out).parent), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, accelerator=cfg.accelerator, devices=cfg.devices,  # type: ignore[arg-type]
                        strategy=cfg.strategy, num_nodes=cfg.num_nodes, progress=cfg.progress, overlays=False)
    files = FileSource(plan.files, seg.part_size, part_offset=len(plan.shards))
    options = {"max_proposals": cfg.max_per_image, "min_area": cfg.min_area, **cfg.options}
    predictor = ProposalPredictor(model, refine_band=cfg.refine_band, band=cfg.band, **options)
    writer = ProposalWriter(cfg.out)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[writer], enable_progress_bar=cfg.progress,
        use_distributed_sampler=False,
    )
    data = CollectionData(seg, plan, files, [], [])
    return SegmentRun(seg, plan, data, predictor, writer, trainer)  # type: ignore[arg-type]
