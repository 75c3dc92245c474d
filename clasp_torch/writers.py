"""Prediction writers: encode and write off the predict loop, in a bounded background pool.

:class:`SegmentationWriter` is a Lightning ``BasePredictionWriter``. The predict loop only
*enqueues* each finished image; a :class:`BackgroundPool` of threads encodes and writes it (PNG
label map, JPEG overlay, JSON, or a Parquet row). The queue is bounded: when ``max_pending``
images wait, the predict loop blocks (back-pressure), so memory never grows with the number of
inputs. Threads rather than processes: the encoders (zlib for the label PNG, libjpeg-turbo through
simplejpeg for the overlay, NumPy for its compositing, pycocotools) release the GIL, and threads
need no copy of the label maps. Measured on this project's 2-core VM (``benchmarks/io.py``,
RESULTS.md section 9): a worker *process* that received each image and label map cost about
4.6 ms of transfer per 640x480 image and ran the encoders 1.6x slower than in-process, a loss
against threads once the encoders stopped holding the GIL.

Nothing is marked done before it is complete on disk: in ``png`` format an input's files are
staged as temporaries and committed in groups (:mod:`clasp_torch.commit`: one ``syncfs`` for the
group, then the renames, the label map ``<name>.png`` last, after the overlay and JSON, then the
log); in ``parquet`` format the part file ``part-NNNNN.parquet`` appears (atomically) only when
every input of the part has passed. So ``--resume`` after SIGINT or SIGKILL loses nothing and
repeats nothing. A group is committed when ``commit_files`` files wait or the writer's queue runs
empty, so with a slow model each input is committed as soon as it is written.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .commit import GroupCommitter, StagedFile, discard, stage_bytes
from .inputs import OutputFolder
from .viz import encode_overlay_jpeg, label_png_bytes, overlay_array

__all__ = ["BackgroundPool", "SegmentationWriter", "output_stem", "segment_statistics", "read_logs",
           "default_writer_threads"]

OutputFormat = Literal["png", "parquet"]


def default_writer_threads(format: OutputFormat = "png") -> int:
    """Encoder threads. ``png``: as many as usable CPUs, between 2 and 8 (the PNG and JPEG encoders
    release the GIL and wait on the disk, so one per core keeps the cores busy). ``parquet``: one,
    since the row encoder (many small NumPy calls) holds the GIL: it ran at 0.96x on two threads
    against one, and a second writer thread only added contention (``benchmarks/io.py``: 0.5-0.9 ms
    more CPU per image; RESULTS.md section 9c)."""
    if format == "parquet":
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        n = os.cpu_count() or 1
    return max(2, min(8, n))


class BackgroundPool:
    """Worker threads fed by a queue that holds at most ``max_pending`` tasks (``submit`` blocks
    beyond).

    ``threads=0`` runs each task at once in the caller (the synchronous writer).
    ``peak_pending`` records the most tasks ever queued or running (tests check the bound);
    :attr:`queued` counts the tasks submitted and not yet started. A plain queue and counters
    rather than ``concurrent.futures``: a submission costs a put, not a ``Future`` with its
    callbacks (a third of the predict loop's own time per image with a fast model).
    """

    def __init__(self, threads: int, max_pending: int, name: str = "clasp-writer") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.threads = int(threads)
        self.max_pending = int(max_pending)
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._tasks: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._cond = threading.Condition(threading.Lock())
        self._pending = 0
        self._queued = 0
        self._error: BaseException | None = None
        self.peak_pending = 0
        self._workers = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(self.threads)]
        for t in self._workers:
            t.start()

    @property
    def queued(self) -> int:
        """Tasks submitted and not yet started."""
        return self._queued

    @property
    def pending(self) -> int:
        """Tasks submitted and not yet finished."""
        return self._pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the pool; blocks while ``max_pending`` tasks are pending."""
        if not self._workers:
            fn(*args)
            return
        self._slots.acquire()
        with self._cond:
            self._pending += 1
            self._queued += 1
            if self._pending > self.peak_pending:
                self.peak_pending = self._pending
        self._tasks.put((fn, args))

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, args = task
            with self._cond:
                self._queued -= 1
            try:
                fn(*args)
            except BaseException as exc:  # kept for drain(), like a Future's exception
                with self._cond:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._cond:
                    self._pending -= 1
                    if not self._pending:
                        self._cond.notify_all()
                self._slots.release()

    def drain(self) -> None:
        """Wait for every submitted task; re-raise the first task error (once)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending)
            err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self) -> None:
        """Let the queued tasks finish, then stop the threads."""
        for _ in self._workers:
            self._tasks.put(None)
        for t in self._workers:
            t.join()
        self._workers = []


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


class SegmentationWriter(BasePredictionWriter):
    """Writes each finished image off the predict loop, atomically.

    Args:
        out_dir: output folder.
        root: input root for records without a ``name`` (outputs keep its sub-folders).
        overlays: also write ``<name>_overlay.jpg`` (``png`` format).
        stats_json: also write ``<name>.json`` with K, K_opt and per-segment areas/boxes.
        format: ``"png"`` (``<name>.png`` label maps) or ``"parquet"`` (``part-NNNNN.parquet``,
            see :mod:`clasp_torch.io`).
        embeddings: Parquet rows carry each segment's mean patch feature.
        threads: encoder threads (``None``: :func:`default_writer_threads` of ``format``; ``0``: write in
            the predict loop, synchronously).
        max_pending: bound on images queued or being written.
        commit_files: ``png`` format: files per group commit at most (see the module notes).
        part_sizes: inputs per Parquet part for parts of files (shard parts end with a marker).
        log_name: per-rank JSON-lines log of every processed input (``<log_name>.rank<r>.jsonl``).
        report_failures: print each failed input on one line (``failed <path>: <reason>``).

    Per-rank logs record ``{"path", "name", "index", "ok", "error"?, "k"?}``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        root: str | None = None,
        overlays: bool = True,
        stats_json: bool = False,
        format: OutputFormat = "png",
        embeddings: bool = False,
        threads: int | None = None,
        max_pending: int = 64,
        commit_files: int = 64,
        part_sizes: dict[int, int] | None = None,
        log_name: str = ".clasp_log",
        report_failures: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in ("png", "parquet"):
            raise ValueError(f"format must be 'png' or 'parquet', got {format!r}")
        self.out_dir = Path(out_dir)
        self.root = root
        self.overlays = overlays
        self.stats_json = stats_json
        self.format: OutputFormat = format
        self.embeddings = embeddings
        self.threads = default_writer_threads(format) if threads is None else int(threads)
        self.max_pending = int(max_pending)
        self.commit_files = int(commit_files)
        self.committer = GroupCommitter(self.commit_files)
        self.part_sizes = dict(part_sizes or {})
        self.log_name = log_name
        self.report_failures = report_failures
        self.pool: BackgroundPool | None = None
        self._folder: OutputFolder | None = None
        self._log_fh: Any = None
        self._lock = threading.Lock()
        self._rank = 0
        self._parts: dict[int, list[dict[str, Any]]] = {}
        self._seen: dict[int, int] = {}
        self._expected: dict[int, int] = {}
        self.n_ok = 0
        self.failures: list[dict[str, Any]] = []
        self.parts_written: list[int] = []

    # ------------------------------------------------------------------ lifecycle
    def log_path(self, rank: int) -> Path:
        return self.out_dir / f"{self.log_name}.rank{rank}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._folder = OutputFolder(self.out_dir)
        self._rank = trainer.global_rank
        self._close_log()
        self._log_fh = open(self.log_path(self._rank), "w", encoding="utf-8", buffering=1)  # a write per line
        self.n_ok, self.failures, self.parts_written = 0, [], []
        self._parts, self._seen, self._expected = {}, {}, dict(self.part_sizes)
        self.pool = BackgroundPool(self.threads, self.max_pending)
        self.committer = GroupCommitter(self.commit_files)
        if self.format == "parquet":  # fail now, not after the first part's inputs, if pyarrow is missing
            import pyarrow.parquet  # noqa: F401

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish(complete=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Interrupted: finish what was queued (complete outputs); never write a partial part.
        self.finish(complete=False)

    def finish(self, complete: bool) -> None:
        """Drain the pool; with ``complete``, write the Parquet parts still open."""
        if self.pool is None:
            return
        try:
            self.pool.drain()
            if complete and self.format == "parquet":
                for part in sorted(self._parts):
                    self._write_part(part)
        finally:
            self.pool.close()
            self.pool = None
            self.committer.commit()  # every finished input, also after a task error (each is complete)
            self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # ------------------------------------------------------------------ per batch
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
        assert self.pool is not None, "on_predict_start was not called"
        for rec in prediction:
            self.pool.submit(self._process, rec)
        for end in (batch.get("part_ends", []) if isinstance(batch, dict) else []):
            with self._lock:
                self._expected[int(end["part"])] = int(end["count"])
            self.pool.submit(self._maybe_write_part, int(end["part"]))

    def _name(self, rec: dict[str, Any]) -> str:
        return rec.get("name") or output_stem(rec["path"], self.root)

    def _process(self, rec: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"path": rec["path"], "name": self._name(rec), "index": rec["index"]}
        if "error" in rec:
            entry.update(ok=False, error=rec["error"])
        elif self.format == "png":
            try:
                staged = self._write_files(rec, entry["name"])
            except (OSError, ValueError) as exc:
                entry.update(ok=False, error=f"could not write output: {exc}")
            else:
                ok = {"ok": True, "k": rec["k"], "k_opt": rec["k_opt"]}
                full = self.committer.add(staged, lambda exc: self._committed(entry, ok, exc))
                if full or self.pool is None or self.pool.queued == 0:  # nothing else to wait for
                    self.committer.commit()
                return
        else:
            try:
                self._add_row(rec, entry["name"])
                entry.update(ok=True, k=rec["k"], k_opt=rec["k_opt"])
            except (OSError, ValueError) as exc:
                entry.update(ok=False, error=f"could not write output: {exc}")
        self._log(entry)
        if self.format == "parquet" and rec.get("part") is not None:
            self._count(int(rec["part"]), entry)

    def _committed(self, entry: dict[str, Any], ok: dict[str, Any], exc: BaseException | None) -> None:
        """After an input's group commit: log it done, or failed with the commit's error."""
        if exc is None:
            entry.update(ok)
        else:
            entry.update(ok=False, error=f"could not write output: {exc}")
        self._log(entry)

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if entry["ok"]:
                self.n_ok += 1
            else:
                self.failures.append(entry)
            if self._log_fh is not None:
                self._log_fh.write(json.dumps(entry) + "\n")
            else:  # a writer used outside a run
                with open(self.log_path(self._rank), "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")
        if not entry["ok"] and self.report_failures:
            _report_line(f"failed {entry['path']}: {entry['error']}")

    # ------------------------------------------------------------------ png format
    def _write_files(self, rec: dict[str, Any], name: str) -> list[StagedFile]:
        """Encode an input's files and stage them (temporaries, in rename order: the label map
        last, as it marks the input done for ``--resume``); on an error nothing stays behind."""
        labels: Tensor = rec["labels"]
        # one containment check per input (the suffixes below stay in the same folder; os.replace
        # replaces a final-component symlink instead of following it)
        if self._folder is None:  # a writer used outside a run
            self._folder = OutputFolder(self.out_dir)
        base = self._folder.path(name, "")
        lab = _uint8_labels(labels)  # one narrowing for the overlay and the PNG (same values)
        staged: list[StagedFile] = []
        try:
            if self.overlays:
                ov = rec.get("overlay")  # composited on the GPU by the predictor, or here
                if ov is None:
                    ov = overlay_array(rec["image"], lab)
                staged.append(stage_bytes(base + "_overlay.jpg", encode_overlay_jpeg(ov)))
            if self.stats_json:
                info = {"path": rec["path"], "k": rec["k"], "k_opt": rec["k_opt"],
                        "segments": segment_statistics(labels)}
                staged.append(stage_bytes(base + ".json", json.dumps(info, indent=1).encode()))
            staged.append(stage_bytes(base + ".png", label_png_bytes(lab)))
        except BaseException:
            discard(staged)
            raise
        return staged

    # ------------------------------------------------------------------ parquet format
    def _add_row(self, rec: dict[str, Any], name: str) -> None:
        from .io import segment_rows

        labels: Tensor = rec["labels"]
        row = {
            "key": rec["path"], "name": name, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "k": int(rec["k"]), "k_opt": int(rec["k_opt"]),
            "segments": segment_rows(labels, rec.get("embeddings") if self.embeddings else None),
            "_index": int(rec["index"]),
        }
        with self._lock:
            self._parts.setdefault(int(rec.get("part") or 0), []).append(row)

    def _count(self, part: int, entry: dict[str, Any]) -> None:
        with self._lock:
            self._seen[part] = self._seen.get(part, 0) + 1
            if not entry["ok"]:
                self._parts.setdefault(part, [])
        self._maybe_write_part(part)

    def _maybe_write_part(self, part: int) -> None:
        with self._lock:
            ready = part in self._expected and self._seen.get(part, 0) >= self._expected[part]
            ready = ready and part not in self.parts_written
            if ready:
                self.parts_written.append(part)
        if ready:
            self._write_part(part, claimed=True)

    def _write_part(self, part: int, claimed: bool = False) -> None:
        from .io import part_path, write_parquet_part

        with self._lock:
            if not claimed:
                if part in self.parts_written:
                    return
                self.parts_written.append(part)
            rows = sorted(self._parts.pop(part, []), key=lambda r: r["_index"])
        for r in rows:
            r.pop("_index", None)
        write_parquet_part(part_path(self.out_dir, part), rows)


def _uint8_labels(labels: Tensor) -> Any:
    """``labels`` as a uint8 array when every value lies in [0, 255] (the label PNG's range), else
    unchanged (the PNG encoder then reports the range). Signed integers are checked in one pass,
    as unsigned (a negative value reads as a huge one)."""
    import numpy as np

    lab = labels.numpy() if labels.device.type == "cpu" else labels.cpu().numpy()
    if not lab.size:
        return labels
    if lab.dtype == np.uint8:
        return lab
    if lab.dtype.kind == "i":
        ok = lab.view(lab.dtype.str.replace("i", "u")).max() <= 255
    else:
        ok = 0 <= lab.min() and lab.max() <= 255
    return lab.astype(np.uint8) if ok else labels


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

