"""COCO-format pseudo-label datasets from region proposals (class-agnostic, like MaskCut's output).

A dataset file holds ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations``
(``id``, ``image_id``, ``category_id`` 1, ``segmentation`` as COCO compressed RLE with ``str``
counts, ``area``, ``bbox`` ``[x, y, w, h]``, ``iscrowd`` 0, ``score``) and ``categories``
``[{"id": 1, "name": "object"}]``: ``pycocotools.coco.COCO``, Detectron2's
``register_coco_instances`` and MMDetection's ``CocoDataset`` load it as it is.

* :func:`image_ids`: the ids of a run's images (the integer of a numeric file stem, else a running
  index after the largest numeric one).
* :func:`proposal_annotations`: the annotations of a batch of proposals (masks encoded by
  ``pycocotools.mask.encode``; ``bbox`` and ``area`` equal ``pycocotools.mask.toBbox``/``area``
  of the RLE, taken from the proposals' own boxes and areas).
* :func:`write_coco_dataset`: the file, streamed from an iterable of annotations and written
  atomically (temporary file, then rename).

Needs ``pycocotools`` (``pip install 'clasp-torch[collection]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

__all__ = ["CATEGORIES", "image_ids", "proposal_annotations", "write_coco_dataset", "encode_masks"]

CATEGORIES: list[dict[str, Any]] = [{"id": 1, "name": "object"}]
"""The one class-agnostic category."""


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("COCO export needs pycocotools: pip install 'clasp-torch[collection]'") from e
    return mask_utils


def image_ids(names: Sequence[str]) -> list[int]:
    """COCO image ids of a run's images, one per name (a path or output name).

    A name whose file stem is all digits gets that integer (``000000139.jpg`` -> 139); every
    other name, and every later name repeating a numeric id already given, gets a running index
    counting up from the largest numeric id + 1, in input order. Ids are unique.

    Example:
        >>> image_ids(["a/000000139.jpg", "b/cat.png", "c/139.jpg", "d/7.jpg"])
        [139, 140, 141, 7]
    """
    stems = [PurePosixPath(str(n).replace("\\", "/")).name.split(".")[0] for n in names]
    numeric = [int(s) if s.isdigit() else None for s in stems]
    nxt = max([v for v in numeric if v is not None], default=0) + 1
    seen: set[int] = set()
    out = []
    for v in numeric:
        if v is None or v in seen:
            v, nxt = nxt, nxt + 1
        seen.add(v)
        out.append(v)
    return out


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """COCO compressed RLEs (``{"size": [H, W], "counts": str}``) of ``(n, H, W)`` bool masks."""
    if masks.shape[0] == 0:
        return []
    mu = _mask_utils()
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mu.encode(arr)
    for r in rles:
        if isinstance(r["counts"], bytes):
            r["counts"] = r["counts"].decode("ascii")
    return rles


def proposal_annotations(proposals: Any, ids: Sequence[int], start_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations of the valid proposals of a batch.

    Args:
        proposals: :class:`~clasp_torch.instances.InstanceProposals` (``score`` = its scores) or
            :class:`~clasp_torch.proposals.RegionProposals` (``score`` 1.0).
        ids: the image id of each of the ``B`` images.
        start_id: id of the first annotation (the next ones count up).

    Returns:
        One dict per proposal, in slot order (best first for instance proposals).
    """
    if len(ids) != len(proposals):
        raise ValueError(f"{len(ids)} image ids for {len(proposals)} images")
    scores = getattr(proposals, "scores", None)
    # COCO boxes [x, y, w, h] with w = x2 - x1 + 1 (pycocotools.mask.toBbox), from the inclusive xyxy boxes
    xyxy = proposals.boxes.cpu().double()
    xywh = torch.cat([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2] + 1], -1)
    res: list[dict[str, Any]] = []
    for b, image_id in enumerate(ids):  # export: a host-side loop over images
        H, W = (int(v) for v in proposals.image_sizes[b])
        v = proposals.valid[b].cpu()
        rles = encode_masks(proposals.masks[b, :, :H, :W].cpu()[v])
        boxes, areas = xywh[b, v].tolist(), proposals.areas[b].cpu()[v].tolist()
        sc = scores[b].cpu()[v].tolist() if scores is not None else [1.0] * len(rles)
        for j, rle in enumerate(rles):
            res.append({
                "id": start_id + len(res), "image_id": int(image_id), "category_id": 1,
                "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"]},
                "area": int(areas[j]), "bbox": boxes[j], "iscrowd": 0, "score": round(float(sc[j]), 6),
            })
    return res


def write_coco_dataset(
    path: str | os.PathLike[str], images: Sequence[dict[str, Any]], annotations: Iterable[dict[str, Any]],
    info: dict[str, Any] | None = None,
) -> int:
    """Write a COCO dataset file atomically, streaming the annotations (never all in memory).

    Args:
        path: the ``.json`` file.
        images: ``{"id", "file_name", "height", "width"}`` per image.
        annotations: annotation dicts (e.g. from :func:`proposal_annotations`).
        info: optional ``info`` block.

    Returns:
        The number of annotations written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if info is not None:
                f.write('{"info": ' + json.dumps(info) + ",\n")
            else:
                f.write("{")
            f.write('"categories": ' + json.dumps(CATEGORIES) + ',\n"images": [')
            f.write(",\n".join(json.dumps(im) for im in images))
            f.write('],\n"annotations": [')
            for ann in annotations:
                f.write((",\n" if n else "\n") + json.dumps(ann))
                n += 1
            f.write("]}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n
