"""Region proposals from CLASP segments: masks, boxes, areas, embeddings, background cue.

Every CLASP segment becomes one class-agnostic region proposal carrying its pixel mask, its
bounding box, its area, the mean backbone embedding of its patches and a background/stuff cue
(:func:`clasp_torch.selectors.background_score`). Results are batched and ragged in the usual
way: ``S`` = the largest number of segment slots in the batch, absent slots are marked by
``valid`` and hold zeros (NaN for ``background``).

Functional core :func:`region_proposals` (fully vectorised: one-hot masks, a single
``masks_to_boxes`` over all ``B*S`` masks, a ``bmm`` for the embeddings), ``nn.Module`` wrapper
:class:`RegionProposalLayer`, and COCO export :func:`to_coco_rle` (needs ``pycocotools``).

Example:
    >>> from clasp_torch.pipeline import CLASP  # doctest: +SKIP
    >>> model = CLASP("efficientnet_lite0", refiner=None)  # doctest: +SKIP
    >>> props = region_proposals(model(images))  # doctest: +SKIP
    >>> props.boxes[props.valid]  # (n_valid, 4) xyxy  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import masks_to_boxes

from .selectors import background_score

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CLASP, CLASPOutput, ImagesLike

__all__ = ["RegionProposalLayer", "RegionProposals", "proposals_from_labels", "region_proposals", "to_coco_rle"]


@dataclass
class RegionProposals:
    """Class-agnostic region proposals of a batch of ``B`` images, ``S`` segment slots each.

    Slot ``s`` of image ``b`` is CLASP segment id ``s``. Slots that the image does not use
    (fewer segments than ``S``, or a segment left without pixels by the refiner) have
    ``valid = False``, an empty mask, a zero box/area/embedding and NaN background.

    Attributes:
        masks: ``(B, S, H_max, W_max)`` bool pixel masks at input resolution (False on padding).
        boxes: ``(B, S, 4)`` float32 ``(x1, y1, x2, y2)`` from
            :func:`torchvision.ops.masks_to_boxes` (inclusive pixel coordinates, so a one-pixel
            mask has ``x1 == x2``); zero for absent slots.
        areas: ``(B, S)`` int64 mask areas in pixels.
        valid: ``(B, S)`` bool, ``areas > 0``.
        embeddings: ``(B, S, D)`` mean backbone feature of each segment's patches (zero when the
            segment has no patch).
        patch_counts: ``(B, S)`` int64 number of patches of each segment.
        background: ``(B, S)`` patch-feature dispersion (see
            :func:`clasp_torch.selectors.background_score`; high = background/stuff-like),
            NaN when the segment has no patch.
        image_sizes: ``(B, 2)`` int64 ``(H, W)`` of each image.
    """

    masks: Tensor
    boxes: Tensor
    areas: Tensor
    valid: Tensor
    embeddings: Tensor
    patch_counts: Tensor
    background: Tensor
    image_sizes: Tensor

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def num_slots(self) -> int:
        """``S``, the number of segment slots per image."""
        return int(self.masks.shape[1])

    def to(self, device: torch.device | str) -> RegionProposals:
        """Move every tensor to ``device``."""
        return RegionProposals(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def image(self, i: int) -> dict[str, Tensor]:
        """Valid proposals of image ``i``, masks cropped to its own size.

        Returns:
            ``{"segment_ids": (n,), "masks": (n, H_i, W_i), "boxes": (n, 4), "areas": (n,),
            "embeddings": (n, D), "patch_counts": (n,), "background": (n,)}``.
        """
        H, W = (int(v) for v in self.image_sizes[i])
        v = self.valid[i]
        return {
            "segment_ids": v.nonzero().flatten(),
            "masks": self.masks[i, v, :H, :W],
            "boxes": self.boxes[i, v],
            "areas": self.areas[i, v],
            "embeddings": self.embeddings[i, v],
            "patch_counts": self.patch_counts[i, v],
            "background": self.background[i, v],
        }


def proposals_from_labels(
    labels: Tensor, patch_labels: Tensor, features: Tensor, patch_mask: Tensor, n_slots: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Tensor-only core of :func:`region_proposals` (the part that ``torch.compile`` may take).

    Args:
        labels: ``(B, H, W)`` int64 pixel segment ids, ``-1`` on padding.
        patch_labels: ``(B, h, w)`` int64 patch segment ids, ``-1`` on padding.
        features: ``(B, h, w, D)`` backbone features.
        patch_mask: ``(B, h, w)`` bool real patches.
        n_slots: ``S``; every id must be ``< S``.

    Returns:
        ``(masks (B,S,H,W) bool, boxes (B,S,4), areas (B,S), valid (B,S), embeddings (B,S,D),
        patch_counts (B,S), background (B,S))``.
    """
    B, H, W = labels.shape
    _, h, w, D = features.shape
    S = n_slots
    slots = torch.arange(S, device=labels.device)
    masks = labels.unsqueeze(1) == slots.view(1, S, 1, 1)  # (B, S, H, W); -1 matches nothing
    areas = masks.sum((2, 3))
    valid = areas > 0
    boxes = masks_to_boxes(masks.reshape(B * S, H, W)).reshape(B, S, 4)
    # mean embedding per segment: one-hot (B, N, S) with a dump column for padding
    N = h * w
    f = features.reshape(B, N, D).float()
    pl = patch_labels.reshape(B, N)
    pm = patch_mask.reshape(B, N) & (pl >= 0)
    idx = torch.where(pm, pl, torch.full_like(pl, S))
    onehot = F.one_hot(idx, S + 1)[..., :S].to(f.dtype)  # (B, N, S)
    sums = torch.bmm(onehot.transpose(1, 2), f)  # (B, S, D)
    counts = onehot.sum(1)  # (B, S)
    emb = sums / counts.clamp_min(1).unsqueeze(-1)
    bg = background_score(f, pl, pm, S, validate=False)
    return masks, boxes, areas, valid, emb, counts.long(), bg


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled_core(backend: str = "inductor") -> Callable[..., Any]:
    """``torch.compile`` of :func:`proposals_from_labels` (built once per backend, dynamic shapes)."""
    fn = _COMPILED.get(backend)
    if fn is None:
        fn = torch.compile(proposals_from_labels, dynamic=True, backend=backend)
        _COMPILED[backend] = fn
    return fn


def region_proposals(
    out: CLASPOutput, use_pixel_labels: bool = True, *, compile: bool | str = False
) -> RegionProposals:
    """Region proposals from a :class:`~clasp_torch.pipeline.CLASPOutput`.

    Args:
        out: the CLASP output of a batch (``labels``, ``coarse_labels``, ``patch_labels``,
            ``features``, ``patch_mask``, ``k``, ``image_sizes`` are used).
        use_pixel_labels: masks from ``out.labels`` (after the refiner, e.g. the CRF) when True,
            from ``out.coarse_labels`` (nearest-upsampled patch labels) when False. Embeddings and
            the background cue always use the patch labels.
        compile: run the core (:func:`proposals_from_labels`, not the CLASP eigen step) through
            ``torch.compile``: ``True`` for the default inductor backend, or a backend name
            (e.g. ``"aot_eager"``). Optional: inductor needs a working toolchain (a C++ compiler
            on CPU) and its first call pays the compile time (~45 s on a 2-core CPU; new shapes
            recompile once with dynamic shapes, ~10 s). Results equal the eager path.

    Returns:
        :class:`RegionProposals` with ``S = max(max k, largest id + 1)`` slots.
    """
    labels = out.labels if use_pixel_labels else out.coarse_labels
    # slot count: one host sync, needed for the output shape
    S = max(int(out.k.max()) if out.k.numel() else 1, int(labels.max()) + 1, int(out.patch_labels.max()) + 1, 1)
    if compile:
        core = _compiled_core("inductor" if compile is True else str(compile))
    else:
        core = proposals_from_labels
    masks, boxes, areas, valid, emb, counts, bg = core(
        labels.long(), out.patch_labels.long(), out.features, out.patch_mask, S
    )
    return RegionProposals(
        masks=masks, boxes=boxes, areas=areas, valid=valid, embeddings=emb, patch_counts=counts,
        background=bg, image_sizes=out.image_sizes.to(masks.device).long(),
    )


class RegionProposalLayer(nn.Module):
    """``nn.Module`` wrapper: images → CLASP → :class:`RegionProposals`.

    Args:
        model: the :class:`~clasp_torch.pipeline.CLASP` segmenter to hold (optional; a model can
            also be passed to :meth:`forward`).
        use_pixel_labels: see :func:`region_proposals`.
        compile: compile the proposal core (not the eigen step) with ``torch.compile``; see
            :func:`region_proposals`.

    Shape:
        - images: ``(B, 3, H, W)`` or a list of ``(3, H_i, W_i)``, uint8 or float in [0, 1].
        - output: :class:`RegionProposals`.

    Example:
        >>> layer = RegionProposalLayer(CLASP("efficientnet_lite0", refiner=None))  # doctest: +SKIP
        >>> props = layer(images)  # doctest: +SKIP
    """

    def __init__(
        self, model: CLASP | None = None, use_pixel_labels: bool = True, compile: bool | str = False
    ) -> None:
        super().__init__()
        self.model = model
        self.use_pixel_labels = use_pixel_labels
        self.compile = compile

    @torch.no_grad()
    def forward(self, images: ImagesLike, model: CLASP | None = None) -> RegionProposals:
        m = model if model is not None else self.model
        if m is None:
            raise ValueError("RegionProposalLayer needs a CLASP model: pass one to __init__ or forward")
        out = m(images)
        return region_proposals(out, self.use_pixel_labels, compile=self.compile)

    def extra_repr(self) -> str:
        return f"use_pixel_labels={self.use_pixel_labels}, compile={self.compile}"


def to_coco_rle(
    proposals: RegionProposals, image_ids: Sequence[int | str], category_id: int = 1
) -> list[dict[str, Any]]:
    """COCO-style results (JSON serialisable) of the valid proposals, masks as compressed RLE.

    Each entry: ``{"image_id", "segment_id", "category_id", "segmentation": {"size": [H, W],
    "counts": str}, "bbox": [x, y, w, h], "area": int, "score": 1.0, "background": float | None}``
    with the mask cropped to the image's own size, ``bbox``/``area`` from
    ``pycocotools.mask.toBbox``/``area`` (COCO convention: ``w = x2 - x1 + 1``), ``score`` 1.0
    (proposals are unranked; ``background`` carries the dispersion cue, ``None`` when NaN).
    Decode with ``pycocotools.mask.decode(entry["segmentation"])`` (``counts`` may be given as
    ``str`` or ``bytes``).

    Args:
        proposals: :class:`RegionProposals`.
        image_ids: one id per image (``B`` entries).
        category_id: category written in every entry (class-agnostic proposals).

    Raises:
        ImportError: ``pycocotools`` is not installed.
    """
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "to_coco_rle needs pycocotools: pip install pycocotools (or pip install -e '.[dev]')"
        ) from e
    import numpy as np

    ids = list(image_ids)
    if len(ids) != len(proposals):
        raise ValueError(f"{len(ids)} image_ids for {len(proposals)} images")
    res: list[dict[str, Any]] = []
    masks = proposals.masks.cpu()
    valid = proposals.valid.cpu()
    bg = proposals.background.cpu()
    for b, image_id in enumerate(ids):  # export: a host-side loop is fine here
        H, W = (int(v) for v in proposals.image_sizes[b])
        seg_ids = valid[b].nonzero().flatten().tolist()
        if not seg_ids:
            continue
        m = np.asfortranarray(masks[b, seg_ids, :H, :W].permute(1, 2, 0).numpy().astype(np.uint8))
        rles = mask_utils.encode(m)
        bboxes = mask_utils.toBbox(rles)
        areas = mask_utils.area(rles)
        for j, (s, rle) in enumerate(zip(seg_ids, rles)):
            counts = rle["counts"]
            b_val = float(bg[b, s])
            res.append({
                "image_id": image_id,
                "segment_id": int(s),
                "category_id": int(category_id),
                "segmentation": {"size": [int(x) for x in rle["size"]],
                                 "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
                "bbox": [float(x) for x in bboxes[j]],
                "area": int(areas[j]),
                "score": 1.0,
                "background": None if math.isnan(b_val) else b_val,
            })
    return res
