"""One factory for a ``clasp segment`` run: inputs, loaders, predictor, writer and trainer.

The CLI and ``benchmarks/io.py`` both build their runs with :func:`build_segment_run`, so the
benchmark measures the real code path (with a stub model in place of CLASP).

* Host work runs off the predict loop: decoding in DataLoader workers or threads
  (``num_workers="auto"``, :func:`default_loading`), ``pin_memory`` on CUDA, prefetching; encoding
  and writing in the writer's bounded thread pool (:mod:`clasp_torch.writers`).
* Under DDP every process reads a disjoint part of the inputs: files round-robin (whole Parquet
  parts in ``parquet`` format), tar shards by ``shard % (processes * workers)``; the split is
  made in ``predict_dataloader``, once Lightning knows the rank.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import collate_images
from .inputs import InputPlan, plan_inputs
from .io import part_path
from .lightning import CLASPPredictor
from .sources import FileSource, RankSampler, ShardSource, ThreadedFiles, file_done
from .writers import SegmentationWriter

__all__ = ["SegmentConfig", "SegmentRun", "build_segment_run", "default_num_workers", "default_loading", "TMP_PATTERNS"]

TMP_PATTERNS = (".*.png.*.tmp", ".*.jpg.*.tmp", ".*.json.*.tmp", ".*.parquet.*.tmp")
"""Temporaries of a run killed hard (SIGKILL); ``--resume`` removes them."""


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """``min(8, usable CPUs - 1)``; 0 with a single CPU."""
    return max(0, min(8, _usable_cpus() - 1))


DECODE_THREADS_SMALL_HOST = 2
"""Decode threads of ``--num-workers auto`` on a host with at most two usable CPUs."""


def default_loading() -> tuple[int, int]:
    """``(worker processes, decode threads)`` of ``num_workers="auto"``.

    With more than two usable CPUs: :func:`default_num_workers` DataLoader processes, no
    threads. With one or two: no worker process and :data:`DECODE_THREADS_SMALL_HOST` decode
    threads in the main process (:class:`~clasp_torch.sources.ThreadedFiles`), since one
    worker process on two CPUs spends about as long handing each decoded image over (shared
    memory, a file descriptor per tensor, unpickling in the main process) as a thread spends
    decoding it (``python -m benchmarks.io``; README "Millions of images").
    """
    n = _usable_cpus()
    if n <= 2:
        return 0, DECODE_THREADS_SMALL_HOST
    return default_num_workers(), 0


@dataclass
class SegmentConfig:
    """Settings of a ``clasp segment`` run (the CLI's flags)."""

    inputs: list[str]
    out: str
    format: Literal["png", "parquet"] = "png"
    overlays: bool = True
    stats_json: bool = False
    embeddings: bool = False
    resume: bool = False
    batch_size: int = 1
    num_workers: int | Literal["auto"] = "auto"
    decode_threads: int | None = None
    writer_threads: int | None = None
    max_pending: int = 64
    switch_interval: float | None = None
    gpu_decode: bool = False
    part_size: int = 10_000
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    progress: bool = True
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


class CollectionData(pl.LightningDataModule):
    """The run's loaders, split over processes once the rank is known."""

    def __init__(
        self, cfg: SegmentConfig, plan: InputPlan, files: FileSource, skip_files: list[int], skip_parts: list[int]
    ) -> None:
        super().__init__()
        self.cfg, self.plan, self.files = cfg, plan, files
        self.skip_files, self.skip_parts = skip_files, skip_parts
        if cfg.num_workers == "auto":
            self.num_workers, threads = default_loading()
        else:
            self.num_workers, threads = int(cfg.num_workers), 0
        self.decode_threads = threads if cfg.decode_threads is None else int(cfg.decode_threads)
        if self.num_workers:  # worker processes decode; threads only without them
            self.decode_threads = 0

    def _loader(self, dataset: Any, sampler: Any = None, workers: int | None = None) -> DataLoader:
        n = self.num_workers if workers is None else workers
        on_gpu = self.cfg.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, sampler=sampler, shuffle=False, num_workers=n,
            collate_fn=collate_images, pin_memory=on_gpu, prefetch_factor=4 if n else None,
        )

    def _ahead(self) -> int:
        """Decoded images in flight with decode threads: 4 batches, as the loaders' prefetching
        with worker processes (memory follows the batch size, not the number of inputs)."""
        return max(2 * self.decode_threads, 4 * self.cfg.batch_size)

    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        loaders = []
        if self.plan.shards:
            skip_name = file_done(self.cfg.out) if self.cfg.resume and self.cfg.format == "png" else None
            shards = ShardSource(self.plan.shards, rank, world, skip_part=self.skip_parts, skip_name=skip_name,
                                 raw_jpeg=self.cfg.gpu_decode, decode_threads=self.decode_threads, ahead=self._ahead())
            loaders.append(self._loader(shards, workers=min(self.num_workers, max(len(self.plan.shards), 1))))
        if self.plan.files:
            sampler = RankSampler(self.files, rank, world, by_part=self.cfg.format == "parquet", skip=self.skip_files)
            if self.decode_threads:
                loaders.append(self._loader(ThreadedFiles(self.files, sampler.indices, self.decode_threads,
                                                          ahead=self._ahead())))
            else:
                loaders.append(self._loader(self.files, sampler))
        return loaders


@dataclass
class SegmentRun:
    """A built run: call :meth:`run`; ``n_skipped`` inputs were left out by ``--resume``."""

    cfg: SegmentConfig
    plan: InputPlan
    data: CollectionData
    predictor: CLASPPredictor
    writer: SegmentationWriter
    trainer: pl.Trainer
    n_skipped: int = 0
    interrupted: bool = False

    @property
    def has_work(self) -> bool:
        files_left = len(self.plan.files) - len(self.data.skip_files)
        shards_left = len(self.plan.shards) - len(self.data.skip_parts)
        return files_left > 0 or shards_left > 0

    def run(self) -> None:
        """``trainer.predict`` over the loaders; Ctrl-C sets :attr:`interrupted` (outputs so far
        are complete)."""
        old_handler = signal.getsignal(signal.SIGINT)
        old_switch = sys.getswitchinterval()
        if self.cfg.switch_interval is not None:
            # an experiment's setting (benchmarks/io.py "swN"): a shorter GIL switch interval hands
            # the GIL sooner to threads back from GIL-free encoder calls, at the cost of more
            # switches; since the loop and writer were slimmed, CPython's 5 ms measures as good or
            # better (RESULTS.md section 9c), so the default leaves it alone
            sys.setswitchinterval(min(old_switch, self.cfg.switch_interval))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                warnings.filterwarnings("ignore", ".*predict_dataloader.*")
                warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
                warnings.filterwarnings("ignore", ".*infer the batch indices.*")
                warnings.filterwarnings("ignore", ".*overridden `transfer_batch_to_device`.*")  # ours, on purpose
                self.trainer.predict(self.predictor, datamodule=self.data, return_predictions=False)
        except SystemExit:
            if not self.trainer.interrupted:  # Lightning turned a KeyboardInterrupt into exit(1)
                raise
            self.interrupted = True
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            if old_handler is not None:  # Lightning ignores SIGINT after an interrupt
                signal.signal(signal.SIGINT, old_handler)
            self.writer.finish(complete=False)
            sys.setswitchinterval(old_switch)


def _resume_skips(cfg: SegmentConfig, plan: InputPlan, files: FileSource) -> tuple[list[int], list[int]]:
    out = Path(cfg.out)
    for pattern in TMP_PATTERNS:
        for tmp in out.rglob(pattern):
            try:
                tmp.unlink()
            except OSError:
                pass
    if cfg.format == "parquet":
        skip_parts = [i for i in range(len(plan.shards)) if part_path(out, i).exists()]
        parts = Counter(files.part_of(i) for i in range(len(files)))
        done_parts = {p for p in parts if part_path(out, p).exists()}
        return [i for i in range(len(files)) if files.part_of(i) in done_parts], skip_parts
    done = file_done(out, ".png")
    return [i for i, f in enumerate(plan.files) if done(f.name)], []


def build_segment_run(cfg: SegmentConfig, model: nn.Module, plan: InputPlan | None = None) -> SegmentRun:
    """Build the loaders, predictor, writer and trainer of a run.

    Args:
        cfg: the run's settings.
        model: a :class:`~clasp_torch.pipeline.CLASP` (or any module with its call signature and
            ``_device()``, e.g. a benchmark's stub).
        plan: the expanded inputs (default ``plan_inputs(cfg.inputs, cfg.out)``).
    """
    plan = plan if plan is not None else plan_inputs(cfg.inputs, cfg.out)
    files = FileSource(plan.files, cfg.part_size, part_offset=len(plan.shards), raw_jpeg=cfg.gpu_decode)
    skip_files, skip_parts = _resume_skips(cfg, plan, files) if cfg.resume else ([], [])
    on_gpu = cfg.accelerator in ("gpu", "cuda")
    overlay_on_device = on_gpu and cfg.overlays and cfg.format == "png"
    predictor = CLASPPredictor(model, overlay_on_device=overlay_on_device, embeddings=cfg.embeddings,
                               keep_images=cfg.format == "png" and cfg.overlays and not overlay_on_device)
    part_sizes = dict(Counter(files.part_of(i) for i in range(len(files))))  # parts of files; shards end with a marker
    writer = SegmentationWriter(
        cfg.out, overlays=cfg.overlays, stats_json=cfg.stats_json, format=cfg.format, embeddings=cfg.embeddings,
        threads=cfg.writer_threads, max_pending=cfg.max_pending, part_sizes=part_sizes,
    )
    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[writer],
        enable_progress_bar=cfg.progress, use_distributed_sampler=False, **cfg.trainer_kwargs,
    )
    data = CollectionData(cfg, plan, files, skip_files, skip_parts)
    return SegmentRun(cfg, plan, data, predictor, writer, trainer, n_skipped=len(skip_files))
