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

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric

from .pipeline import CLASP, CLASPOutput
from .writers import SegmentationWriter, output_stem, read_logs, segment_statistics

__all__ = ["CLASPPredictor", "SegmentationWriter", "output_stem", "segment_statistics", "read_logs"]


class CLASPPredictor(pl.LightningModule):
    """Lightning wrapper of :class:`CLASP` for prediction and evaluation.

    Args:
        model: a :class:`CLASP` instance, or keyword arguments to build one (``clasp_kwargs``).
        num_classes: ground-truth classes, for ``test_step`` metrics (optional).
        overlay_on_device: composite each overlay on the model's device (set on a GPU; on a
            CPU the writer's threads composite it).
        embeddings: records carry each segment's mean patch feature.
        keep_images: records carry the input ``image`` (on the CPU). A writer that needs no image
            (label maps only, Parquet, overlays composited on the device) sets False: on a GPU
            this saves copying every image back to the host.
        clasp_kwargs: used when ``model`` is None.

    ``predict_step`` returns ``list[dict]`` with, per image: ``path``, ``index``, ``labels``
    (``(H, W)`` int64 CPU tensor) or ``error`` (a one-line reason).
    """

    def __init__(
        self,
        model: CLASP | None = None,
        num_classes: int | None = None,
        *,
        overlay_on_device: bool = False,
        embeddings: bool = False,
        keep_images: bool = True,
        **clasp_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else CLASP(**clasp_kwargs)
        self.overlay_on_device = overlay_on_device
        self.embeddings = embeddings
        self.keep_images = keep_images
        self.num_classes = num_classes
        if num_classes is not None:
            from .metrics import UnsupervisedSegmentationMetric

            self.metric_patch = UnsupervisedSegmentationMetric(num_classes)
            self.metric_pixel = UnsupervisedSegmentationMetric(num_classes)
            self.mean_k = MeanMetric()
            self.n_images = SumMetric()

    def forward(self, images: Sequence[Tensor] | Tensor) -> CLASPOutput:
        return self.model(images)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move only the tensors the model reads (the ``image``, ``encoded`` and ``label`` lists)
        of a :func:`~clasp_torch.data.collate_images` batch; paths, names, indices and errors
        stay where they are (Lightning's default walks the whole batch, per element, even when
        nothing moves). Other batches: Lightning's default."""
        if not isinstance(batch, dict) or "image" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        out = dict(batch)
        for key in ("image", "encoded", "label"):
            if key in out:
                out[key] = [t.to(device, non_blocking=True) if isinstance(t, Tensor) and t.device != device else t
                            for t in out[key]]
        return out

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
        """Segment a batch; returns one record per input (errors included), in input order.

        Records: ``path``, ``index``, and ``name``/``part`` when the batch carries them; then
        either ``error`` or ``image`` (uint8 ``(3, H, W)``, CPU; only with ``keep_images``), ``labels``
        (``(H, W)`` int64, CPU),
        ``k``, ``k_opt``, plus ``overlay`` (``(3, H, W)`` uint8, CPU) when ``overlay_on_device``
        and ``embeddings`` (``(K, D)`` mean patch feature per label) when ``embeddings``.
        """
        extra = ("name", "part")
        records: list[dict[str, Any]] = [
            {"path": e["path"], "index": int(e["index"]), "error": e["error"], **{k: e[k] for k in extra if k in e}}
            for e in batch.get("errors", [])
        ]
        images: list[Tensor | None] = list(batch["image"])
        if not images:
            return records
        index = batch["index"].tolist() if isinstance(batch["index"], Tensor) else list(batch["index"])
        extras = [(k, batch[k]) for k in extra if k in batch]
        meta = [{"path": batch["path"][i], "index": int(index[i]), **{k: v[i] for k, v in extras}}
                for i in range(len(images))]
        if "encoded" in batch:  # JPEG bytes: decode on the model's device
            from .sources import decode_batch

            todo = [i for i, im in enumerate(images) if im is None]
            dec = decode_batch([batch["encoded"][i] for i in todo], [meta[i]["path"] for i in todo], self.model.device)
            for i, d in zip(todo, dec):
                images[i] = d if isinstance(d, Tensor) else None
                if not isinstance(d, Tensor):
                    records.append({**meta[i], "error": d})
        # Inputs the model rejects for sure (e.g. smaller than one patch) are reported up front,
        # so they do not force the rest of the batch through the one-by-one retry.
        keep: list[int] = []
        for i, im in enumerate(images):
            if im is None:
                continue
            problem = self._check_image(im)
            if problem is None:
                keep.append(i)
            else:
                records.append({**meta[i], "error": problem})
        if not keep:
            return sorted(records, key=lambda rec: rec["index"])
        good = [images[i] for i in keep]
        out, singles = self._segment(good)  # type: ignore[arg-type]
        if out is not None:
            singles = [(j, out) for j in range(len(keep))]
        ks: dict[int, tuple[list[int], list[int]]] = {}  # one host copy of K and K_opt per output
        for j, res in singles:
            i = keep[j]
            rec: dict[str, Any] = dict(meta[i])
            if isinstance(res, str):
                rec["error"] = res
            else:
                r = j if out is not None else 0
                if id(res) not in ks:
                    ks[id(res)] = (res.k.tolist(), res.k_opt.tolist())
                k, k_opt = ks[id(res)]
                labels = res.label_map(r)
                rec.update(labels=labels.cpu(), k=int(k[r]), k_opt=int(k_opt[r]))
                if self.keep_images:
                    rec["image"] = images[i].cpu()
                if self.overlay_on_device:
                    from .viz import overlay_tensor

                    rec["overlay"] = overlay_tensor(images[i], labels).cpu()
                if self.embeddings:
                    rec["embeddings"] = _label_means(res, r).cpu()
            records.append(rec)
        records.sort(key=lambda rec: rec["index"])
        return records

    def _check_image(self, image: Tensor) -> str | None:
        """One-line reason why the model cannot segment ``image``, or ``None``."""
        from .preprocess import target_size

        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            return f"ValueError: expected a (3, H, W) RGB image, got {shape}"
        _, H, W = image.shape
        try:
            target_size(H, W, int(self.model.backbone.patch_size), self.model.max_patches)
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


def _label_means(out: CLASPOutput, i: int) -> Tensor:
    """``(K, D)`` mean backbone feature of the patches of each patch label of image ``i``."""
    feats = out.features[i].flatten(0, 1)  # (h*w, D)
    lab = out.patch_labels[i].flatten()
    valid = lab >= 0
    K = max(int(out.k[i]), 1)
    sums = feats.new_zeros(K, feats.shape[-1]).index_add_(0, lab[valid], feats[valid])
    counts = torch.bincount(lab[valid], minlength=K).clamp_min(1).to(feats.dtype)
    return sums / counts[:, None]


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {msg}"
