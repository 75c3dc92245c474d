"""Parquet output of a collection run: one row per image, segments as COCO RLE (pyarrow, pycocotools).

Layout: ``OUT/part-NNNNN.parquet``, one part per input shard (or per 10,000 inputs for files and
lists), each written atomically (temporary file, then rename). Columns:

* ``key`` (string): the input's path, or ``SHARD.tar:KEY`` for a tar sample;
* ``name`` (string): its output name (:mod:`clasp_torch.inputs`);
* ``height``, ``width``, ``k``, ``k_opt`` (int32);
* ``segments``: list of struct ``id`` (int32), ``area`` (int64), ``bbox`` (list of 4 float64,
  COCO ``[x, y, w, h]``), ``rle`` (struct ``size`` [h, w] list of int32, ``counts`` string: COCO
  compressed RLE from ``pycocotools.mask.encode``), and ``embedding`` (list of float32, each
  segment's mean patch feature; null unless the run used ``--embeddings``).

Any Parquet reader opens the parts (``pyarrow.parquet.read_table(OUT)``, pandas, DuckDB, Spark);
:func:`iter_parquet_labels` gives the label maps back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PARQUET_SCHEMA_FIELDS", "part_path", "segment_rows", "label_segments", "write_parquet_part",
           "iter_parquet_labels"]

PARQUET_SCHEMA_FIELDS = ("key", "name", "height", "width", "k", "k_opt", "segments")


def _schema() -> Any:
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    seg = pa.struct([
        ("id", pa.int32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float64())), ("rle", rle),
        ("embedding", pa.list_(pa.float32())),
    ])
    return pa.schema([
        ("key", pa.string()), ("name", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
        ("k", pa.int32()), ("k_opt", pa.int32()), ("segments", pa.list_(seg)),
    ])


def part_path(out_dir: str | os.PathLike[str], part: int) -> Path:
    """``out_dir/part-NNNNN.parquet``."""
    return Path(out_dir) / f"part-{int(part):05d}.parquet"


def segment_rows(labels: Tensor | np.ndarray, embeddings: Tensor | None = None) -> list[dict[str, Any]]:
    """The ``segments`` of one label map: id, area, COCO bbox and compressed RLE per segment id.

    Args:
        labels: ``(H, W)`` integer labels (negative = no segment).
        embeddings: optional ``(S, D)`` float features, row ``s`` for segment id ``s``.

    Returns:
        One dict per segment id present, ascending (the strings, areas and boxes of
        ``pycocotools.mask.encode`` / ``area`` / ``toBbox`` of each segment's mask).
    """
    lab = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    ids, counts, areas, boxes = label_segments(lab)
    if not counts:
        return []
    H, W = (int(v) for v in lab.shape)
    emb = embeddings.detach().float().cpu().numpy() if embeddings is not None else None
    return [
        {"id": sid, "area": a, "bbox": b, "rle": {"size": [H, W], "counts": c.decode("ascii")},
         "embedding": emb[sid].tolist() if emb is not None else None}
        for sid, a, b, c in zip(ids.tolist(), areas.tolist(), boxes.tolist(), counts)
    ]


def label_segments(lab: np.ndarray) -> tuple[np.ndarray, list[bytes], np.ndarray, np.ndarray]:
    """COCO compressed RLE, area and bbox of every segment id ``>= 0`` of a label map, from its
    column-major runs, vectorised over all segments at once (no per-segment mask or pass).

    Equal to ``pycocotools.mask.encode`` / ``area`` / ``toBbox`` of each ``lab == id`` mask
    (tests compare them): the counts alternate background and foreground run lengths
    (column-major, starting with background), coded as in pycocotools' ``rleToString``: from
    the fourth count on, the difference to the count two before, in 5-bit groups (least
    significant first, ``0x20`` = more groups follow, the last group's ``0x10`` = sign), each
    ``+ 48`` as an ASCII character.

    Returns:
        ``ids`` ``(S,)`` int64 ascending, ``counts`` (``S`` ASCII ``bytes``), ``areas`` ``(S,)``
        int64, ``boxes`` ``(S, 4)`` float64 COCO ``[x, y, w, h]``.
    """
    lab = np.asarray(lab)
    H, W = (int(v) for v in lab.shape)
    N = H * W
    empty = (np.zeros(0, np.int64), [], np.zeros(0, np.int64), np.zeros((0, 4)))
    if N == 0:
        return empty
    if lab.dtype.itemsize > 2 and lab.dtype.kind in "iu":  # compare and sort 16-bit values when they fit
        lo, hi = int(lab.min()), int(lab.max())
        if -(1 << 15) <= lo and hi < (1 << 15):
            lab = lab.astype(np.int16)
    # run starts in column-major order, found on the row-major array (no transposed copy)
    new = np.empty((H, W), dtype=bool)
    np.not_equal(lab[1:], lab[:-1], out=new[1:])
    np.not_equal(lab[0, 1:], lab[H - 1, :-1], out=new[0, 1:])  # a column's first pixel vs the previous column's last
    new[0, 0] = True
    rm = np.flatnonzero(new)
    row, col = np.divmod(rm, W)
    pos = col * H + row
    order = np.argsort(pos)
    start, val = pos[order], lab.reshape(-1)[rm[order]]
    end = np.empty_like(start)
    end[:-1], end[-1] = start[1:], N
    fg = val >= 0
    if not fg.any():
        return empty
    by = np.argsort(val[fg], kind="stable")  # runs grouped by segment, in image order within each
    s, e, v = start[fg][by], end[fg][by], val[fg][by]
    n = s.size
    first = np.flatnonzero(np.concatenate(([True], v[1:] != v[:-1])))
    ids = v[first].astype(np.int64)
    v = v.astype(np.int64, copy=False)
    S = ids.size
    nruns = np.diff(np.append(first, n))
    last = first + nruns - 1
    prev_end = np.empty_like(e)
    prev_end[1:] = e[:-1]
    prev_end[first] = 0
    # counts per segment: (background gap, run length) per run, then the trailing background
    trail = e[last] != N
    ncounts = 2 * nruns + trail
    seg_off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(ncounts, out=seg_off[1:])
    total = int(seg_off[-1])
    cnt = np.empty(total, dtype=np.int64)
    at = np.repeat(seg_off[:-1] - 2 * first, nruns) + 2 * np.arange(n)
    cnt[at] = s - prev_end
    cnt[at + 1] = e - s
    t = np.flatnonzero(trail)
    cnt[seg_off[t + 1] - 1] = N - e[last[t]]
    # rleToString: delta to the count two before (from the fourth count of a segment on)
    x = cnt.copy()
    later = np.flatnonzero(np.arange(total) - np.repeat(seg_off[:-1], ncounts) > 2)
    x[later] -= cnt[later - 2]
    groups = np.ones(total, dtype=np.int64)
    k = 1
    while True:  # 5-bit groups needed: x must fit in 5k bits, sign included
        big = (x >= (1 << (5 * k - 1))) | (x < -(1 << (5 * k - 1)))
        if not big.any():
            break
        groups += big
        k += 1
    xr = np.repeat(x, groups)
    first_char = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(groups, out=first_char[1:])
    g = np.arange(xr.size) - np.repeat(first_char[:-1], groups)
    chars = ((xr >> (5 * g)) & 0x1F) + 48
    chars += (g < np.repeat(groups - 1, groups)) * 0x20
    text = chars.astype(np.uint8).tobytes()
    co = first_char[seg_off].tolist()
    counts = [text[co[i]:co[i + 1]] for i in range(S)]
    areas = np.add.reduceat(e - s, first).astype(np.int64)
    sx, sy = np.divmod(s, H)
    ex, ey = np.divmod(e - 1, H)
    x0, x1 = np.minimum.reduceat(sx, first), np.maximum.reduceat(ex, first)
    y0 = np.minimum.reduceat(np.minimum(sy, ey), first)
    y1 = np.maximum.reduceat(np.maximum(sy, ey), first)
    wraps = np.maximum.reduceat(ex > sx, first)  # a run over a column end covers the last and first rows
    y0, y1 = np.where(wraps, 0, y0), np.where(wraps, H - 1, y1)
    boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1).astype(np.float64)
    return ids, counts, areas, boxes


def _label_rles(lab: np.ndarray) -> tuple[list[int], list[dict[str, Any]]]:
    """``(ids, [{"size": [H, W], "counts": bytes}])``: the RLEs of :func:`label_segments` in
    pycocotools' dict form."""
    ids, counts, _, _ = label_segments(lab)
    H, W = (int(v) for v in np.shape(lab))
    return ids.tolist(), [{"size": [H, W], "counts": c} for c in counts]


def write_parquet_part(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with :data:`PARQUET_SCHEMA_FIELDS`) as one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .viz import atomic_path

    table = pa.Table.from_pylist(list(rows), schema=_schema())
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def iter_parquet_labels(path: str | os.PathLike[str]) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, label_map)`` for every row of a part file or of every part in a folder.

    ``label_map`` is an int64 ``(height, width)`` tensor: each pixel's segment id, ``-1`` where no
    segment covers it. Folders are read part by part in name order, a part's rows in order.
    """
    import pyarrow.parquet as pq
    from pycocotools import mask as mask_utils

    p = Path(path)
    files = sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=["key", "height", "width", "segments"]):
            for row in batch.to_pylist():
                lab = np.full((row["height"], row["width"]), -1, dtype=np.int64)
                for seg in row["segments"] or []:
                    rle = {"size": list(seg["rle"]["size"]), "counts": seg["rle"]["counts"].encode("ascii")}
                    lab[mask_utils.decode(rle).astype(bool)] = seg["id"]
                yield row["key"], torch.from_numpy(lab)
