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
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["PARQUET_SCHEMA_FIELDS", "part_path", "segment_rows", "write_parquet_part", "iter_parquet_labels"]

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
        One dict per segment id present, ascending.
    """
    from pycocotools import mask as mask_utils

    lab = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    ids, rles = _label_rles(lab)
    if not ids:
        return []
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    emb = embeddings.detach().float().cpu().numpy() if embeddings is not None else None
    rows = []
    for j, (sid, rle) in enumerate(zip(ids, rles)):
        counts = rle["counts"]
        rows.append({
            "id": int(sid), "area": int(areas[j]), "bbox": [float(v) for v in boxes[j]],
            "rle": {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "embedding": emb[sid].tolist() if emb is not None else None,
        })
    return rows


def _label_rles(lab: np.ndarray) -> tuple[list[int], list[dict[str, Any]]]:
    """COCO compressed RLEs of every segment id ``>= 0`` of a label map, from one pass over its
    column-major runs (no ``(H, W, S)`` one-hot mask: 6x faster than ``mask.encode`` on it, same
    strings)."""
    from pycocotools import mask as mask_utils

    H, W = lab.shape
    seq = lab.T.ravel()  # column-major, as COCO RLE
    change = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [seq.size]])
    vals = seq[starts]
    ids = [int(v) for v in np.unique(vals) if v >= 0]
    raw = []
    for sid in ids:
        sel = vals == sid
        bounds = np.empty(2 * int(sel.sum()), dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts[sel], ends[sel]
        counts = np.diff(bounds, prepend=0)  # zeros before each run, then its length
        if bounds[-1] != seq.size:
            counts = np.append(counts, seq.size - bounds[-1])
        raw.append({"size": [H, W], "counts": counts.tolist()})
    return ids, (mask_utils.frPyObjects(raw, H, W) if raw else [])


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
