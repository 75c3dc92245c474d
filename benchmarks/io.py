"""Host path of ``clasp segment``: cost per image by part, and sustained images/s with a stub model.

``python -m benchmarks.io [--json FILE] [--images N] [--device cpu|cuda] [--out-root memory|disk|DIR]
[--settings disk,...]``

1. **Parts** (one thread, median over the images, COCO dev photos): decoding (Pillow on the CPU;
   on CUDA also ``torchvision.io.decode_jpeg`` on the GPU), the label PNG, the overlay (today's
   float blend + Pillow JPEG; the integer blend + Pillow JPEG now used; ``overlay_tensor`` +
   ``torchvision.io.encode_jpeg``), and a Parquet row (COCO RLE of every segment).
2. **Throughput**: the real ``clasp segment`` path (:func:`clasp_torch.segment_run.build_segment_run`:
   the same loaders, predictor, writer and trainer as the CLI) with CLASP replaced by a
   constant-time **stub model** (it sleeps 1 ms per batch and returns cheap patchy labels), so
   the figure is the host path alone, as on a GPU host where the model is fast. Formats
   ``png --no-overlay``, ``png`` and ``parquet``, each under
   * ``before``: main as it was before this change (commit 62a77b9): 0 DataLoader workers, the
     writer encoding synchronously in the predict loop, its decoder (Pillow for every file) and
     encoders (float overlay blend, label PNG at zlib level 6); for ``parquet``, which did not
     exist, the same old settings and decoder with today's row encoder;
   * ``after``: the new defaults (``--num-workers auto``, the writer's thread pool).
   Sustained images/s: images after the first batch over the time from the end of the first
   batch to the last output on disk.
3. **Bound**: usable cores / the summed host CPU time per image of the parts each format runs
   (decode + PNG [+ overlay], or decode + Parquet row), with ``after``'s encoders. The parts are
   measured at the start and at the end of each round and averaged (the runs lie in between;
   this VM's speed drifts within minutes); ``after_over_bound_rounds`` gives each round's fraction.

4. **Where the outputs go** (``--out-root``): ``memory`` (the default: ``/dev/shm`` where it is a
   writable folder, else the temp folder) or ``disk`` (the temp folder's file system) or a folder.
   The bound counts the encoders and the decoder, not the file system, and on this VM's ext4
   creating a file costs 0.03-0.96 ms of kernel CPU, varying from minute to minute (0.015 ms on
   tmpfs): with outputs on disk ``after`` moved between 62 and 75 % of the bound from one round
   to the next, with the same code. So ``after`` writes to memory by default, as the bound
   assumes, and the part ``file_write`` (stage, group-sync and rename one label PNG) is measured
   on each root; ``bound_with_files`` adds it (one file per input for ``png --no-overlay``,
   two for ``png``, none for Parquet's parts of 10,000 rows) for the runs of ``--settings disk``
   (``after`` with outputs on disk: ``after_disk_over_bound_with_files``).

``after_over_bound`` and ``ratio_after_before`` are medians over the rounds of ratios taken within a
round (figures measured minutes apart on this VM differ by up to 30 %); ``before``, ``after`` and
``bound`` are the medians of the rounds' images/s, and ``after_over_bound_of_medians`` their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from benchmarks.run import DEFAULT_IMAGE_DIR, write_outputs
from clasp_torch.commit import GroupCommitter, stage_bytes
from clasp_torch.data import ImageLoadError, load_image
from clasp_torch.inputs import safe_output_path
from clasp_torch.io import segment_rows
from clasp_torch.segment_run import SegmentConfig, build_segment_run, default_loading
from clasp_torch.sources import FileSource, decode_image
from clasp_torch.viz import (
    atomic_path,
    boundaries,
    colorize,
    encode_overlay_jpeg,
    label_png_bytes,
    overlay_array,
    overlay_tensor,
    palette,
)
from clasp_torch.writers import SegmentationWriter, _uint8_labels, default_writer_threads

PALETTE = palette(256).reshape(-1).tolist()


def dev_image_paths(tmp: str) -> list[str]:
    """The COCO dev photos (or skimage's sample photos saved as JPEG under ``tmp``)."""
    import glob

    files = sorted(glob.glob(os.path.join(DEFAULT_IMAGE_DIR, "*.jpg")))
    if files:
        return files
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        out.append(os.path.join(tmp, f"{name}.jpg"))
        Image.fromarray(getattr(data, name)()[..., :3]).save(out[-1], quality=90)
    return out


def stub_labels(image: Tensor) -> Tensor:
    """Cheap patchy labels (5 grey-level classes of the 16x downscaled image), ``(H, W)`` int64."""
    H, W = image.shape[-2:]
    small = F.avg_pool2d(image.float().mean(0)[None, None], 16, ceil_mode=True)
    q = (small / 52).long().clamp(0, 4)
    return q[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:H, :W]


class _StubOutput:
    """The parts of :class:`~clasp_torch.pipeline.CLASPOutput` that ``predict_step`` reads."""

    def __init__(self, labels: list[Tensor], k: Tensor) -> None:
        self.labels_list = labels
        self.k = k
        self.k_opt = k

    def label_map(self, i: int) -> Tensor:
        return self.labels_list[i]


class StubCLASP(nn.Module):
    """A stand-in for CLASP that takes a constant time per batch (``sleep_s``, as a GPU model
    would leave the host idle) and returns a cached patchy label map per image size; a
    benchmark stub, not a model."""

    def __init__(self, sleep_s: float = 0.001) -> None:
        super().__init__()
        self.sleep_s = sleep_s
        self.backbone = nn.Identity()
        self.backbone.patch_size, self.backbone.name = 16, "stub"  # type: ignore[assignment]
        self.max_patches = 2500
        self._cache: dict[tuple[int, int], Tensor] = {}
        self._k: dict[int, Tensor] = {}

    def warm(self, paths: list[str]) -> None:
        """Compute the labels of every image size in ``paths`` now, so that ``forward`` takes
        constant time during a timed run."""
        for p in paths:
            self._labels(decode_image(Path(p).read_bytes(), p))

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def _labels(self, image: Tensor) -> Tensor:
        key = (int(image.shape[1]), int(image.shape[2]))
        if key not in self._cache:
            self._cache[key] = stub_labels(image)
        return self._cache[key]

    def forward(self, images: list[Tensor]) -> _StubOutput:
        time.sleep(self.sleep_s)
        n = len(images)
        if n not in self._k:
            self._k[n] = torch.full((n,), 5)
        return _StubOutput([self._labels(im) for im in images], self._k[n])


def pillow_jpeg(im: Image.Image | np.ndarray) -> bytes:
    """The overlay JPEG as main encoded it before (Pillow, q90; it holds the GIL)."""
    import io

    buf = io.BytesIO()
    (im if isinstance(im, Image.Image) else Image.fromarray(np.ascontiguousarray(im))).save(buf, format="JPEG",
                                                                                           quality=90)
    return buf.getvalue()


def pillow_overlay(image: Tensor, labels: Any) -> Image.Image:
    """The overlay as the writer composited it before the GIL-free path (Pillow's C code: palette
    image, ``Image.blend``, white ``paste`` on the boundaries; the same pixels, but holding the GIL)."""
    img = image.permute(1, 2, 0).numpy()
    lab = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    neg = lab < 0
    n = int(lab.max()) + 1 if lab.size else 1
    if n > 255:  # beyond one palette: the general path
        col = Image.fromarray(colorize(lab))
    else:
        small = np.where(neg, 255, lab).astype(np.uint8) if neg.any() else lab.astype(np.uint8, copy=False)
        col = Image.fromarray(small, "L")
        col.putpalette(palette(n).reshape(-1).tolist() + [0, 0, 0] * (256 - n))  # index 255: black
        col = col.convert("RGB")
    out = Image.blend(Image.fromarray(np.ascontiguousarray(img)), col, 0.5)
    out.paste((255, 255, 255), mask=Image.fromarray(boundaries(lab)))
    return out


def pillow_label_png(labels: Tensor | np.ndarray, compress_level: int) -> bytes:
    """The label PNG as main encoded it before (Pillow's PNG encoder, palette image)."""
    import io

    lab = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    im = Image.fromarray(lab.astype(np.uint8), "L")
    im.putpalette(PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=compress_level)
    return buf.getvalue()


class LegacyFileSource(FileSource):
    """Main's decoding before this change (62a77b9): every file through Pillow (``load_image``)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self.files[index]
        item: dict[str, Any] = {"path": f.path, "name": f.name, "index": index, "part": self.part_of(index)}
        try:
            item["image"] = load_image(f.path)
        except ImageLoadError as exc:
            item.update(image=None, error=exc.reason)
        return item


def legacy_atomic_write(path: str, data: bytes) -> None:
    """``atomic_write_bytes`` as main had it before (62a77b9): ``mkstemp``, ``chmod``, write, fsync
    of each file, rename."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class LegacyWriter(SegmentationWriter):
    """The PNG writer of main before this change (62a77b9), for the ``before`` figures: float
    overlay blend and Pillow JPEG (q90), label PNG at Pillow's default zlib level (6)."""

    def _write_files(self, rec: dict[str, Any], name: str) -> list[Any]:
        labels = rec["labels"]
        base = str(safe_output_path(self.out_dir, name, ""))
        if self.overlays:
            img = rec["image"].permute(1, 2, 0).numpy()
            lab = labels.numpy()
            out = 0.5 * img.astype(np.float32) + 0.5 * colorize(lab).astype(np.float32)
            out[boundaries(lab)] = 255
            legacy_atomic_write(base + "_overlay.jpg", pillow_jpeg(out.clip(0, 255).astype(np.uint8)))
        legacy_atomic_write(base + ".png", pillow_label_png(labels, compress_level=6))
        return []  # written and fsynced file by file, as then: nothing left to commit


def _median_ms(fn: Any, items: list[Any], repeats: int = 3) -> float:
    fn(items[0])
    runs = []
    for _ in range(repeats):
        ts = []
        for it in items:
            t0 = time.perf_counter()
            fn(it)
            ts.append(time.perf_counter() - t0)
        runs.append(statistics.median(ts))
    return 1000 * statistics.median(runs)


MEMORY_ROOT_MIN_FREE = 1 << 30
"""Free bytes ``/dev/shm`` needs to hold the runs' outputs (containers often give it 64 MiB)."""


def out_root(where: str) -> str | None:
    """The folder that holds the runs' output folders: ``memory`` (``/dev/shm`` where it is a
    writable folder with :data:`MEMORY_ROOT_MIN_FREE` free, else the temp folder), ``disk`` (None:
    the temp folder), or a path. The JSON's ``host.out_root`` says which was used."""
    if where == "memory":
        import shutil

        shm = "/dev/shm"
        ok = os.path.isdir(shm) and os.access(shm, os.W_OK)
        return shm if ok and shutil.disk_usage(shm).free >= MEMORY_ROOT_MIN_FREE else None
    if where == "disk":
        return None
    return where


def file_write_ms(data: bytes, root: str | None, n: int = 256, group: int = 64) -> float:
    """This thread's CPU ms (user + kernel) per output file of the ``png`` writer's way of writing
    ``data``: staged in a new folder under ``root``, committed in groups of ``group``
    (one sync, then the renames); median of 3 runs of ``n`` files."""
    runs = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(dir=root) as d:
            committer = GroupCommitter(group)
            t0 = time.thread_time()
            for i in range(n):
                if committer.add([stage_bytes(os.path.join(d, "sub", f"{i:06d}.png"), data)], lambda exc: None):
                    committer.commit()
            committer.commit()
            runs.append(time.thread_time() - t0)
    return 1000 * statistics.median(runs) / n


def measure_parts(paths: list[str], device: str, root: str | None = None) -> dict[str, float]:
    """Host ms per image of each part (one thread); ``file_write`` on ``root`` (see
    :func:`file_write_ms`), ``file_write_disk`` on the temp folder's file system."""
    imgs = [decode_image(Path(p).read_bytes(), p) for p in paths]  # as the loaders give them
    labs = [stub_labels(im) for im in imgs]
    pairs = list(zip(imgs, labs))

    def legacy_overlay(pair: tuple[Tensor, Tensor]) -> bytes:
        img, lab = pair[0].permute(1, 2, 0).numpy(), pair[1].numpy()
        out = 0.5 * img.astype(np.float32) + 0.5 * colorize(lab).astype(np.float32)
        out[boundaries(lab)] = 255
        return pillow_jpeg(out.clip(0, 255).astype(np.uint8))

    def tv_overlay(pair: tuple[Tensor, Tensor]) -> bytes:
        from torchvision.io import encode_jpeg

        return encode_jpeg(overlay_tensor(*pair), quality=90).numpy().tobytes()

    parts = {
        "decode_cpu": _median_ms(lambda p: decode_image(Path(p).read_bytes(), p), paths),
        "decode_cpu_before": _median_ms(load_image, paths),
        "label_png": _median_ms(lambda p: label_png_bytes(_uint8_labels(p[1])), pairs),
        "label_png_pillow": _median_ms(lambda p: pillow_label_png(_uint8_labels(p[1]), 1), pairs),
        "label_png_zlib6_before": _median_ms(lambda p: pillow_label_png(p[1], compress_level=6), pairs),
        "overlay": _median_ms(lambda p: encode_overlay_jpeg(overlay_array(p[0], _uint8_labels(p[1]))), pairs),
        "overlay_pillow": _median_ms(lambda p: pillow_jpeg(pillow_overlay(p[0], _uint8_labels(p[1]))), pairs),
        "overlay_before": _median_ms(legacy_overlay, pairs),
        "overlay_torch_encode_jpeg": _median_ms(tv_overlay, pairs),
        "parquet_row": _median_ms(lambda p: segment_rows(p[1]), pairs),
    }
    png = label_png_bytes(_uint8_labels(labs[0]))
    parts["file_write"] = file_write_ms(png, root)  # on the runs' output file system
    parts["file_write_disk"] = parts["file_write"] if root is None else file_write_ms(png, None)
    if device == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        data = [read_file(p) for p in paths]

        def gpu_decode(d: Tensor) -> None:
            decode_jpeg(d, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()

        parts["decode_gpu"] = _median_ms(gpu_decode, data)
    return parts


def _format_work(fmt: str) -> Any:
    """The host work of one image of ``fmt`` without the pipeline (no loop, no files): decode its
    bytes, then the format's encoders on its (cached) stub labels."""

    def work(item: tuple[bytes, str, Tensor]) -> None:
        data, name, lab = item
        img = decode_image(data, name)
        if fmt == "parquet":
            segment_rows(lab)
            return
        lab8 = _uint8_labels(lab)
        if fmt == "png":
            encode_overlay_jpeg(overlay_array(img, lab8))
        label_png_bytes(lab8)

    return work


def _loop(work: Any, items: list[Any], go: Any = None) -> None:
    if go is not None:
        go.wait()
    for it in items:
        work(it)


def parts_ceiling(paths: list[str], n_images: int, cores: int) -> dict[str, dict[str, float]]:
    """Images/s of the parts alone on all cores: ``processes`` (one forked process per core, each
    looping over its share: what the hardware gives when the parts run side by side) and
    ``threads`` (one thread per core in this process: the same with the GIL shared). Between
    the bound (single-thread part times x cores) and ``after`` (the whole pipeline)."""
    import multiprocessing as mp

    datas = [(Path(p).read_bytes(), p) for p in paths]
    labs = {p: stub_labels(decode_image(d, p)) for d, p in datas}
    items = [(d, p, labs[p]) for d, p in (datas[i % len(datas)] for i in range(n_images))]
    shares = [items[i::cores] for i in range(cores)]
    out: dict[str, dict[str, float]] = {"processes": {}, "threads": {}}
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    for fmt in FORMATS:
        work = _format_work(fmt)
        _loop(work, items[:4])  # warm-up
        if ctx is not None:
            go = ctx.Event()
            procs = [ctx.Process(target=_loop, args=(work, sh, go)) for sh in shares]
            for pr in procs:
                pr.start()
            time.sleep(0.2)  # the children are forked and waiting
            t0 = time.perf_counter()
            go.set()
            for pr in procs:
                pr.join()
            out["processes"][fmt] = len(items) / (time.perf_counter() - t0)
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(cores) as ex:
            list(ex.map(lambda sh: _loop(work, sh), shares))
        out["threads"][fmt] = len(items) / (time.perf_counter() - t0)
    return out


class _Clock:
    """Lightning callback: time at the end of the first batch, image counts."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        outer = self

        class CB(pl.Callback):
            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
                if outer.t_first is None:
                    outer.t_first, outer.n_first = time.perf_counter(), len(outputs)
                    outer.cpu_first = _own_cpu_s()
                    outer.busy_first, outer.steal_first = _machine_s()

        self.callback = CB()
        self.t_first: float | None = None
        self.n_first = 0
        self.cpu_first = 0.0
        self.busy_first: float | None = None
        self.steal_first: float | None = None


def _loading(setting: str) -> dict[str, Any]:
    """SegmentConfig fields of a setting: ``before`` (0 workers, synchronous writer, CPython's
    switch interval), ``after`` (the defaults), or ``after`` changed by ``_``-joined tokens:
    ``procN`` (N DataLoader worker processes), ``threadsN`` (no worker process, N decode
    threads), ``wN`` (N writer threads), ``swN`` (GIL switch interval N microseconds)."""
    if setting == "before":
        return {"num_workers": 0, "writer_threads": 0, "switch_interval": None}
    cfg: dict[str, Any] = {"num_workers": "auto"}
    for tok in setting.split("_"):
        if tok == "after":
            continue
        if tok.startswith("proc"):
            cfg.update(num_workers=int(tok[4:]), decode_threads=None)
        elif tok.startswith("threads"):
            cfg.update(num_workers=0, decode_threads=int(tok[7:]))
        elif tok.startswith("sw"):
            cfg["switch_interval"] = float(tok[2:]) * 1e-6
        elif tok.startswith("w"):
            cfg["writer_threads"] = int(tok[1:])
        else:
            raise ValueError(f"unknown setting {setting!r}")
    return cfg


def _machine_s() -> tuple[float | None, float | None]:
    """``(busy, steal)`` CPU seconds of the whole machine from one read of ``/proc/stat``: time
    it has been busy, and time the hypervisor gave this VM's CPUs to someone else (part of
    busy); None off Linux."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:  # pragma: no cover
        return None, None
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v[:8]) - v[3] - v[4]) / tick, (v[7] / tick if len(v) >= 8 else None)


def _own_cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def throughput(inputs: list[str], fmt: str, setting: str, batch_size: int, sleep_s: float,
               root: str | None = None) -> dict[str, float]:
    """Sustained images/s of one configuration (see the module docstring), with the host CPU ms
    per image of this run (this process and its workers) and of every other process meanwhile
    (``others_cpu_ms``: another job on the machine makes the figure unreliable; ``steal_ms``, part
    of it: CPU time the hypervisor gave to other guests while this VM wanted it). Outputs go to a
    new folder under ``root`` (None: the temp folder); a ``disk`` token in ``setting`` puts them
    on the temp folder's file system (``disk`` alone: ``after`` there)."""
    tokens = setting.split("_")
    if "disk" in tokens:  # outputs on the temp folder's file system whatever the root
        root, setting = None, "_".join(t for t in tokens if t != "disk") or "after"
    with tempfile.TemporaryDirectory(dir=root) as out:
        cfg = SegmentConfig(
            inputs=inputs, out=out, format="parquet" if fmt == "parquet" else "png", overlays=fmt == "png",
            batch_size=batch_size, progress=False, **_loading(setting),
        )
        clock = _Clock()
        stub = StubCLASP(sleep_s)
        stub.warm(sorted(set(os.path.realpath(p) for p in inputs)))
        run = build_segment_run(cfg, stub)
        if setting == "before":
            old = run.data.files
            run.data.files = LegacyFileSource(old.files, old.part_size, old.part_offset)
        if setting == "before" and fmt != "parquet":
            legacy = LegacyWriter(out, overlays=cfg.overlays, threads=0, format="png")
            run.trainer.callbacks = [c for c in run.trainer.callbacks if c is not run.writer] + [legacy]
            run.writer = legacy
        run.trainer.callbacks.append(clock.callback)
        run.run()
        t_end = time.perf_counter()
        cpu = _own_cpu_s() - clock.cpu_first
        busy, steal = _machine_s()
        n = len(run.plan.files)
        assert clock.t_first is not None
        m = n - clock.n_first  # the images of the timed window
        res = {"images_per_s": m / (t_end - clock.t_first), "cpu_ms": 1000 * cpu / m,
               "cores_busy": cpu / (t_end - clock.t_first)}
        if busy is not None and clock.busy_first is not None:
            res["others_cpu_ms"] = 1000 * (busy - clock.busy_first - cpu) / m
        if steal is not None and clock.steal_first is not None:  # part of others_cpu_ms
            res["steal_ms"] = 1000 * (steal - clock.steal_first) / m
        return res


FORMATS = ("png_no_overlay", "png", "parquet")


FILES_PER_IMAGE = {"png_no_overlay": 1, "png": 2, "parquet": 0}
"""Output files per input of each format (a Parquet part holds 10,000 rows)."""


def _bound(parts: dict[str, float], cores: int, files: str | None = None) -> dict[str, float]:
    """``cores`` / the summed ms per image of each format's parts; with ``files`` (a part name:
    ``file_write`` or ``file_write_disk``) also its output files' writing."""
    sums = {
        "png_no_overlay": parts["decode_cpu"] + parts["label_png"],
        "png": parts["decode_cpu"] + parts["label_png"] + parts["overlay"],
        "parquet": parts["decode_cpu"] + parts["parquet_row"],
    }
    if files is not None:
        sums = {k: v + FILES_PER_IMAGE[k] * parts[files] for k, v in sums.items()}
    return {k: cores / (v / 1000) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400, help="images per throughput run (dev photos, repeated)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stub-ms", type=float, default=1.0, help="the stub model's time per batch")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of parts + every format's before/after, interleaved; figures are medians")
    ap.add_argument("--settings", default="",
                    help="comma-separated extra settings measured beside after, e.g. proc1,threads1,sw5000 "
                         "(see _loading)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-root", default="memory",
                    help="where the runs' outputs go: memory (/dev/shm where writable), disk (the temp folder) "
                         "or a folder; --settings disk adds after-runs with outputs on disk")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    photo_dir = tempfile.TemporaryDirectory()
    paths = dev_image_paths(photo_dir.name)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    formats = [f for f in args.formats.split(",") if f]
    settings = ["before", "after"] + [s for s in args.settings.split(",") if s]
    root = out_root(args.out_root)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []  # the dev photos repeated under distinct names (r0/…, r1/…)
        for r in range(max(1, -(-args.images // len(paths)))):
            d = Path(tmp) / f"r{r}"
            d.mkdir()
            for p in paths:
                if len(inputs) < args.images:
                    (d / Path(p).name).symlink_to(Path(p).resolve())
                    inputs.append(str(d / Path(p).name))
        for rep in range(args.repeats):
            rnd: dict[str, Any] = {"parts_ms_start": measure_parts(paths[:20], args.device, root)}
            rnd["parts_ceiling"] = parts_ceiling(paths, args.images, cores)
            for fmt in formats:
                for setting in settings:
                    r = throughput(inputs, fmt, setting, args.batch_size, args.stub_ms / 1000, root)
                    rnd.setdefault(setting, {})[fmt] = r
                    print(f"round {rep} {fmt:15s} {setting:12s} {r['images_per_s']:7.1f} images/s  "
                          f"cpu {r['cpu_ms']:.2f} ms/image  cores {r['cores_busy']:.2f}  "
                          f"others {r.get('others_cpu_ms', float('nan')):.2f} "
                          f"(steal {r.get('steal_ms', float('nan')):.2f})",
                          file=sys.stderr, flush=True)
            # the parts again at the end of the round: this VM's speed drifts by 10-30 % within minutes,
            # so the round's bound uses the mean of the two measurements (the runs lie between them)
            rnd["parts_ms_end"] = measure_parts(paths[:20], args.device, root)
            rnd["parts_ms"] = {k: (v + rnd["parts_ms_end"][k]) / 2 for k, v in rnd["parts_ms_start"].items()}
            rnd["bound"] = _bound(rnd["parts_ms"], cores)
            rnd["after_over_bound"] = {f: rnd["after"][f]["images_per_s"] / rnd["bound"][f] for f in formats}
            rnd["bound_with_files"] = _bound(rnd["parts_ms"], cores, "file_write")
            rnd["bound_with_files_disk"] = _bound(rnd["parts_ms"], cores, "file_write_disk")
            print(f"round {rep} bound {rnd['bound']} (start {_bound(rnd['parts_ms_start'], cores)}, end "
                  f"{_bound(rnd['parts_ms_end'], cores)})  after/bound {rnd['after_over_bound']}  "
                  f"parts ceiling {rnd['parts_ceiling']}", file=sys.stderr, flush=True)
            rounds.append(rnd)
    med = statistics.median
    res: dict[str, Any] = {}
    for setting in settings:
        res[setting] = {f: med(r[setting][f]["images_per_s"] for r in rounds) for f in formats}
    res["bound"] = {f: med(r["bound"][f] for r in rounds) for f in formats}
    res["parts_ceiling"] = {k: {f: med(r["parts_ceiling"][k][f] for r in rounds) for f in formats}
                            for k in ("processes", "threads")}
    res["after_over_parts_ceiling"] = {f: res["after"][f] / res["parts_ceiling"]["processes"][f] for f in formats}
    # ratios within a round (the same minutes of this VM), then their median over the rounds
    res["ratio_after_before"] = {f: med(r["after"][f]["images_per_s"] / r["before"][f]["images_per_s"]
                                        for r in rounds) for f in formats}
    res["after_over_bound"] = {f: med(r["after_over_bound"][f] for r in rounds) for f in formats}
    res["after_over_bound_rounds"] = {f: [r["after_over_bound"][f] for r in rounds] for f in formats}
    res["after_over_bound_of_medians"] = {f: res["after"][f] / res["bound"][f] for f in formats}
    res["bound_with_files"] = {f: med(r["bound_with_files"][f] for r in rounds) for f in formats}
    res["bound_with_files_disk"] = {f: med(r["bound_with_files_disk"][f] for r in rounds) for f in formats}


    def by_round(setting: str, bound: str) -> dict[str, list[float]]:
        """Each round's images/s of ``setting`` over its ``bound``, per format."""
        return {f: [r[setting][f]["images_per_s"] / r[bound][f] for r in rounds] for f in formats}

    res["after_over_bound_with_files"] = {f: med(v) for f, v in by_round("after", "bound_with_files").items()}
    if "disk" in settings:
        res["after_disk_over_bound"] = {f: med(v) for f, v in by_round("disk", "bound").items()}
        res["after_disk_over_bound_with_files_rounds"] = by_round("disk", "bound_with_files_disk")
        res["after_disk_over_bound_with_files"] = {
            f: med(v) for f, v in res["after_disk_over_bound_with_files_rounds"].items()}
    res["cpu_ms_per_image"] = {s: {f: med(r[s][f]["cpu_ms"] for r in rounds) for f in formats} for s in settings}
    res["parts_ms"] = {k: med(r["parts_ms"][k] for r in rounds) for k in rounds[0]["parts_ms"]}
    res["rounds"] = rounds
    workers, threads = default_loading()
    res["host"] = {"usable_cores": cores, "auto_worker_processes": workers, "auto_decode_threads": threads,
                   "writer_threads": {f: default_writer_threads(f) for f in ("png", "parquet")},
                   "images": args.images, "batch_size": args.batch_size,
                   "stub_ms_per_batch": args.stub_ms, "repeats": args.repeats,
                   "out_root": root or tempfile.gettempdir()}
    text = json.dumps(res, indent=1)
    print(text)
    write_outputs((args.json, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
