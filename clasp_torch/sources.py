"""Datasets of a collection run: image files (map-style) and tar shards (streamed), split over ranks.

Items are the dicts of :func:`clasp_torch.data.collate_images`, plus:

* ``name``: the output name (:mod:`clasp_torch.inputs`), ``path``: what reports show (the file
  path, or ``SHARD:KEY`` for a tar sample), ``part``: the output part the item belongs to;
* ``encoded``: ``uint8 (n_bytes,)`` JPEG bytes instead of ``image`` when ``raw_jpeg=True`` (decoded
  later on the model's device by :func:`decode_batch`);
* a shard ends with a marker item ``{"part_end": part, "count": n}`` (no image), so a writer knows
  when every sample of the part has passed.

Tar shards are read as a stream (``tarfile`` mode ``r|*``: never extracted, never seeked, so a
shard can be a pipe or a network mount), grouped WebDataset-style (key = member name up to the
first dot of its file name; the image is the first member of the key with an image suffix; other
members ignored). We use the standard library's ``tarfile`` rather than the ``webdataset``
package because a run needs per-sample failures (a corrupt member, a key without an image, an
unsafe name) to be reported and the rest of the shard kept, the shard-to-(rank, worker) split to
be an exact, checkable partition, and the output names to follow :mod:`clasp_torch.inputs`;
``webdataset``'s pipeline stages would have to be re-wrapped for each of these.
"""

from __future__ import annotations

import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from .data import IMAGE_EXTENSIONS, ImageLoadError, load_image, load_image_bytes
from .inputs import FileInput, ShardInput, check_member_name, member_key

__all__ = [
    "JPEG_EXTENSIONS",
    "FileSource",
    "ThreadedFiles",
    "ShardSource",
    "RankSampler",
    "ordered_map",
    "decode_batch",
    "decode_image",
]

JPEG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jpe", ".jfif")

_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], threads: int, ahead: int) -> Iterator[_R]:
    """``fn(x)`` for each ``x`` of ``items``, computed by ``threads`` threads of this process with at
    most ``ahead`` results in flight, yielded in input order (``items`` is read in the caller's
    thread). For decoding in the main process: libjpeg-turbo, zlib and Pillow release the GIL,
    so the threads decode in parallel with the predict loop without a worker process's
    hand-over of every image (measured in ``benchmarks/io.py``). An error of ``fn`` is raised
    where its result would be yielded."""
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="clasp-decode")
    window: deque = deque()
    try:
        for x in items:
            window.append(ex.submit(fn, x))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for fut in window:
            fut.cancel()
        ex.shutdown(wait=True)


def _call(thunk: Callable[[], _R]) -> _R:
    return thunk()


def _read_error(path: str, exc: BaseException) -> str:
    if isinstance(exc, ImageLoadError):
        return exc.reason
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def decode_image(data: bytes, name: str) -> Tensor:
    """Decode an image file's bytes to ``uint8 (3, H, W)`` RGB: JPEGs with
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo, EXIF orientation applied: 4.5 against 6.6 ms
    for a 640x480 photo with Pillow, and pixel-identical on all 50 COCO dev photos), everything
    else, and any JPEG it rejects (CMYK, progressive oddities, corrupt data), with
    :func:`clasp_torch.data.load_image_bytes` (Pillow). Thread-safe (no warning filters are
    touched), and the decoding itself runs without the GIL.

    Raises:
        ImageLoadError: the bytes are not a decodable image.
    """
    if name.lower().endswith(JPEG_EXTENSIONS) and data[:2] == b"\xff\xd8":
        try:
            op = _jpeg_op()
            arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = op(arr)
            if img.ndim == 3 and img.shape[0] == 3 and img.shape[1] and img.shape[2]:
                return img
        except (RuntimeError, ImportError, ValueError):
            pass
    return load_image_bytes(data, name)


_JPEG_OP: Callable[[Tensor], Tensor] | None = None


def _jpeg_op() -> Callable[[Tensor], Tensor]:
    """``decode_jpeg(data, RGB, apply_exif_orientation=True)`` on the CPU: torchvision's registered
    operator itself where present (the Python wrapper adds a deprecation warning per call,
    torchvision 0.29, and filtering it per call is neither cheap nor thread-safe), else the
    wrapper under a warning filter."""
    global _JPEG_OP
    if _JPEG_OP is None:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        rgb = ImageReadMode.RGB
        raw = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)
        if raw is not None:
            _JPEG_OP = lambda arr: raw(arr, rgb.value, True)  # noqa: E731
        else:  # pragma: no cover - other torchvision builds

            def _wrapped(arr: Tensor) -> Tensor:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return decode_jpeg(arr, mode=rgb, apply_exif_orientation=True)

            _JPEG_OP = _wrapped
    return _JPEG_OP


class FileSource(Dataset):
    """Map-style dataset over image files.

    Args:
        files: the files and their output names.
        part_size: inputs per output part (part ``part_offset + index // part_size``).
        part_offset: id of the first part (parts of shards come first).
        raw_jpeg: return JPEG files as bytes (``encoded``) for decoding on the GPU.

    Items: ``{"image" | "encoded", "path", "name", "index", "part"}``, or ``"error"`` instead
    of the image for an unreadable file.
    """

    def __init__(
        self, files: Sequence[FileInput], part_size: int = 10_000, part_offset: int = 0, raw_jpeg: bool = False
    ) -> None:
        self.files = list(files)
        self.part_size = int(part_size)
        self.part_offset = int(part_offset)
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.files)

    def part_of(self, index: int) -> int:
        return self.part_offset + index // self.part_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self.files[index]
        item: dict[str, Any] = {"path": f.path, "name": f.name, "index": index, "part": self.part_of(index)}
        try:
            if self.raw_jpeg and f.path.lower().endswith(JPEG_EXTENSIONS):
                data = Path(f.path).read_bytes()
                if not data:
                    raise ImageLoadError(f.path, "empty file")
                item["image"] = None
                item["encoded"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                data = Path(f.path).read_bytes()
                item["image"] = decode_image(data, f.path) if data else load_image(f.path)
        except (ImageLoadError, OSError) as exc:
            item.update(image=None, error=_read_error(f.path, exc))
        return item


class ThreadedFiles(IterableDataset):
    """The items ``source[i]`` for ``i`` in ``indices``, in that order, read and decoded by
    ``threads`` threads of the loading process (:func:`ordered_map`, ``ahead`` items in flight):
    a :class:`FileSource` for a DataLoader without worker processes."""

    def __init__(self, source: FileSource, indices: Sequence[int], threads: int, ahead: int = 32) -> None:
        super().__init__()
        self.source, self.indices = source, list(indices)
        self.threads, self.ahead = int(threads), int(ahead)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return ordered_map(self.source.__getitem__, self.indices, self.threads, self.ahead)


class RankSampler(Sampler[int]):
    """Indices of a :class:`FileSource` for one process of ``world`` (an exact partition).

    ``by_part=True`` gives each rank whole parts (part ``p`` to rank ``p % world``), so each part
    is written by one process; otherwise inputs go round-robin. ``skip`` leaves out indices.
    """

    def __init__(
        self, source: FileSource, rank: int = 0, world: int = 1, by_part: bool = False, skip: Sequence[int] = ()
    ) -> None:
        skipped = set(skip)
        if by_part:
            self.indices = [i for i in range(len(source)) if source.part_of(i) % world == rank and i not in skipped]
        else:
            self.indices = [i for i in range(len(source)) if i % world == rank and i not in skipped]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardSource(IterableDataset):
    """Samples of tar shards, streamed; shard ``i`` goes to global worker ``i % (world * workers)``.

    Args:
        shards: the shards and their name prefixes; shard ``i`` is output part ``i``.
        rank, world: this process and the number of processes.
        skip_part: parts to leave out (already written, ``--resume``).
        skip_name: a sample name to leave out (its outputs exist, ``--resume``), or ``None``.
        raw_jpeg: return JPEG samples as bytes (``encoded``).
        decode_threads: decode in this many threads of the reading process (:func:`ordered_map`,
            ``ahead`` samples in flight; the tar is still read in order by one thread); 0: decode
            as each sample is read.

    Items: as :class:`FileSource` (``path`` is ``SHARD:KEY``), a failure item per unsafe name,
    corrupt member, key without an image member or duplicate key, one for an unreadable or
    truncated shard, and the end marker ``{"part_end": i, "count": n, "path": SHARD}`` after
    each shard (``n``: the items given for it, marker excluded).
    """

    def __init__(
        self,
        shards: Sequence[ShardInput],
        rank: int = 0,
        world: int = 1,
        skip_part: Sequence[int] = (),
        skip_name: Callable[[str], bool] | None = None,
        raw_jpeg: bool = False,
        decode_threads: int = 0,
        ahead: int = 32,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.rank, self.world = int(rank), int(world)
        self.skip_part = set(skip_part)
        self.skip_name = skip_name
        self.raw_jpeg = raw_jpeg
        self.decode_threads, self.ahead = int(decode_threads), int(ahead)

    def assigned(self, worker: int = 0, n_workers: int = 1) -> list[int]:
        """Shard indices read by ``worker`` of ``n_workers`` in this rank."""
        slot, slots = self.rank * n_workers + worker, self.world * n_workers
        return [i for i in range(len(self.shards)) if i % slots == slot and i not in self.skip_part]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        thunks = self._thunks(self.assigned(worker, n_workers))
        items = (ordered_map(_call, thunks, self.decode_threads, self.ahead) if self.decode_threads
                 else map(_call, thunks))
        counter = 0
        for item in items:
            if "part_end" not in item:
                item["index"] = counter
                counter += 1
            yield item

    def _thunks(self, shard_ids: Sequence[int]) -> Iterator[Callable[[], dict[str, Any]]]:
        """One zero-argument callable per item, in order: reading the tar happens here, the
        decoding when the callable runs."""
        for i in shard_ids:
            n = 0
            for thunk in self._samples(self.shards[i], i):
                n += 1
                yield thunk
            yield partial(dict, part_end=i, count=n, path=self.shards[i].path, image=None)

    def _sample(self, shard: ShardInput, part: int, key: str,
                members: list[tuple[str, bytes | None]]) -> dict[str, Any]:
        item: dict[str, Any] = {"path": f"{shard.path}:{key}", "name": f"{shard.name}/{key}", "part": part,
                                "image": None}
        bad = check_member_name(key)
        if bad is not None:
            item["error"] = bad
            return item
        images = [(n, d) for n, d in members if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            item["error"] = "no image member (" + ", ".join(n for n, _ in members)[:200] + ")"
            return item
        mname, data = images[0]
        try:
            if data is None:
                raise ImageLoadError(mname, "not a regular file in the tar")
            if self.raw_jpeg and mname.lower().endswith(JPEG_EXTENSIONS) and data:
                item["encoded"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                item["image"] = decode_image(data, mname)
        except ImageLoadError as exc:
            item["error"] = exc.reason
        return item

    def _samples(self, shard: ShardInput, part: int) -> Iterator[Callable[[], dict[str, Any]]]:
        seen: set[str] = set()
        key: str | None = None
        members: list[tuple[str, bytes | None]] = []

        def flush() -> Iterator[Callable[[], dict[str, Any]]]:
            if key is None:
                return
            if key in seen:
                yield partial(dict, path=f"{shard.path}:{key}", name=f"{shard.name}/{key}", part=part, image=None,
                              error="duplicate key (its members are not consecutive in the shard)")
                return
            seen.add(key)
            if self.skip_name is not None and check_member_name(key) is None and self.skip_name(f"{shard.name}/{key}"):
                return
            yield partial(self._sample, shard, part, key, members)

        try:
            with tarfile.open(shard.path, mode="r|*") as tf:
                for m in tf:
                    if m.isdir():
                        continue
                    k, _ = member_key(m.name)
                    if k != key:
                        yield from flush()
                        key, members = k, []
                    data = None
                    wanted = m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS) and not any(
                        n.lower().endswith(IMAGE_EXTENSIONS) for n, _ in members
                    )
                    if wanted:
                        fh = tf.extractfile(m)
                        data = fh.read() if fh is not None else None
                    members.append((m.name, data))
                yield from flush()
        except (tarfile.TarError, OSError, EOFError) as exc:  # the key being read is lost with it
            yield partial(dict, path=shard.path, name=shard.name, part=part, image=None,
                          error=f"unreadable or truncated tar shard ({type(exc).__name__}: {exc})", shard_error=True)


def decode_batch(encoded: Sequence[Tensor], names: Sequence[str], device: torch.device) -> list[Tensor | str]:
    """Decode JPEG bytes on ``device`` (``torchvision.io.decode_jpeg``, GPU when CUDA), RGB, EXIF
    orientation applied; an image the device decoder rejects falls back to the CPU decoder
    (Pillow). Returns, per input, ``uint8 (3, H, W)`` on ``device`` or a one-line error."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Tensor | str] = []
    try:
        dec = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return list(dec)
    except RuntimeError:
        pass  # one bad image fails the batched call: decode one by one
    for data, name in zip(encoded, names):
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
        except RuntimeError:
            try:
                out.append(load_image_bytes(data.numpy().tobytes(), name).to(device))
            except ImageLoadError as exc:
                out.append(exc.reason)
    return out


def file_done(out_dir: str | os.PathLike[str], suffix: str = ".png") -> Callable[[str], bool]:
    """A picklable ``name -> bool``: does ``out_dir/name+suffix`` exist (``--resume``)."""
    return _Exists(str(out_dir), suffix)


class _Exists:
    def __init__(self, out_dir: str, suffix: str) -> None:
        self.out_dir, self.suffix = out_dir, suffix

    def __call__(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.out_dir, name + self.suffix))
