"""The dense CRF at a bounded working resolution, in batches planned under a pixel budget.

The dense CRF (:mod:`clasp_torch.crf`) costs time and memory in proportion to pixels x labels
(about 420 bytes per pixel plus 8 per pixel and label on the CPU), so at full resolution a
27-megapixel photo takes minutes and many GB although its features are capped at
``max_patches``. Here an image larger than ``max_pixels`` is refined at a *working
resolution* instead:

1. the image is downscaled to the largest size of at most ``max_pixels`` pixels with its aspect
   kept (:func:`crf_working_size`), bilinearly with antialiasing (:func:`resize_image`), and its
   labels by nearest sampling at the working pixels' centres (:func:`downscale_labels`);
2. the CRF runs there, its spatial bandwidths scaled by the downscale factor (at least
   :data:`MIN_SXY` working pixels) so its kernels cover the same part of the photo as at full
   resolution (``scale_bandwidths=False`` keeps them in working pixels);
3. its marginals ``Q`` are brought back to the input size by bilinear interpolation, then the
   argmax (:func:`upsample_marginals_argmax`, the default, ``upsample="marginals"``), or its
   labels by nearest upsampling (:func:`upsample_labels_nearest`, ``upsample="nearest"``).
   Both write straight into the full-size label map in row chunks: no full-size float buffer.

Images of at most ``max_pixels`` pixels are refined at their own size, exactly as
:func:`clasp_torch.crf.crf_refine_labels` does. The choices were measured against the CRF at
full resolution on the dev images upscaled 2x and 3x (``benchmarks/RESULTS.md`` section 8,
``python -m benchmarks.size_sweep --agreement``): scaled bandwidths agree on ~98 % of pixels
(kept in working pixels: 84-89 %), and the upsampled marginals on 0.1-0.2 points more than
nearest labels.

A batch's images are refined in chunks whose padded size, counted at working resolution, stays
within ``batch_pixels`` (:func:`plan_crf_batches`), so the CRF's working set on a GPU is
bounded whatever the batch holds. Images are independent in the CRF, so chunking never changes a
result.

Functional core: :func:`crf_refine_labels_bounded`; :class:`CRFRefiner`, the pipeline's refiner
stage, is a thin Module over it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .checks import check_choice, check_float, check_int
from .crf import crf_refine_labels, dense_crf, unary_from_labels
from .resample import downscale_labels, resize_image, upsample_labels_nearest, upsample_marginals_argmax

__all__ = [
    "DEFAULT_CRF_BATCH_PIXELS",
    "DEFAULT_CRF_MAX_PIXELS",
    "MIN_SXY",
    "CRFRefiner",
    "CRF_PARAMS",
    "chunk_cost",
    "crf_refine_labels_bounded",
    "crf_working_size",
    "downscale_labels",
    "plan_crf_batches",
    "resize_image",
    "upsample_labels_nearest",
    "upsample_marginals_argmax",
]

DEFAULT_CRF_MAX_PIXELS = 1 << 19
"""Working-resolution cap of the CRF: 524,288 pixels (e.g. 836 x 627, ~0.5 MP). The dev sets'
images (at most 778 x 512 = 0.4 MP) are below it, so their results are unchanged. More working
pixels cost time and memory in proportion for a little agreement with the full-resolution CRF
(0.27 -> 0.52 MP: 98.2 -> 98.8 % of pixels, ``benchmarks/RESULTS.md`` section 8)."""

DEFAULT_CRF_BATCH_PIXELS = 1 << 24
"""Budget of one CRF call: 16.8 M pixel-equivalents (:func:`chunk_cost`), about 7 GB of CRF
working set at the CPU's ~420 bytes per pixel. A batch of 32 dev images (padded to 640 x 640,
up to 12 labels) is one call, as before."""

LABEL_WEIGHT = 1.0 / 50.0
"""Cost of one label per pixel, relative to the pixel's label-independent cost (the lattice):
measured ~8 against ~420 bytes on the CPU (``crf_refine_labels`` on a 640 x 426 photo, C = 2..20)."""

MIN_SXY = 1.0
"""Smallest spatial bandwidth (working pixels) of a scaled kernel. A permutohedral lattice finer
than the pixel grid costs up to 3x the time (27 MP photo: ``sxy_gaussian`` 4 x 0.14 = 0.56 px
took 9.3 s, 1 px 3.5 s) and the grid cannot show finer smoothing: on dev photos upscaled 5x
(``sxy_gaussian`` 0.8 px) the floor agreed with the full-resolution CRF on 98.2 % of pixels,
the exact 0.8 px on 98.0 %."""

_CRF_DEFAULTS = {k: p.default for k, p in inspect.signature(dense_crf).parameters.items()}

def crf_working_size(H: int, W: int, max_pixels: int) -> tuple[int, int]:
    """The size ``(h, w)`` the CRF runs at for an ``H x W`` image.

    ``(H, W)`` itself when ``H * W <= max_pixels``; otherwise both sides scaled by one factor
    ``sqrt(max_pixels / (H W))`` and rounded down (aspect kept up to rounding, ``h * w <=
    max_pixels``, each side at least 1).

    Example:
        >>> crf_working_size(480, 640, 1 << 19), crf_working_size(4500, 6000, 1 << 19)
        ((480, 640), (627, 836))
    """
    H, W, max_pixels = int(H), int(W), int(max_pixels)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if H * W <= max_pixels:
        return H, W
    s = math.sqrt(max_pixels / (H * W))
    h, w = max(1, int(H * s)), max(1, int(W * s))
    while h * w > max_pixels:  # floating-point round-up
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w


def chunk_cost(sizes: Sequence[tuple[int, int]], n_labels: Sequence[int]) -> float:
    """Cost of one CRF call over images of ``sizes`` (working resolution) and label counts:
    the padded pixels ``len * H_max * W_max``, each weighted by ``1 + C_max * LABEL_WEIGHT``."""
    if len(sizes) == 0:
        return 0.0
    hm = max(int(s[0]) for s in sizes)
    wm = max(int(s[1]) for s in sizes)
    c = max(max(int(n) for n in n_labels), 2)
    return len(sizes) * hm * wm * (1.0 + c * LABEL_WEIGHT)


def plan_crf_batches(
    sizes: Sequence[tuple[int, int]],
    n_labels: Sequence[int] | int,
    budget_pixels: float,
    groups: Sequence[Hashable] | None = None,
) -> list[list[int]]:
    """Cut a batch into consecutive chunks whose CRF cost stays within a budget.

    Greedy in batch order: an image joins the current chunk while :func:`chunk_cost` of the
    chunk with it (padding to the chunk's largest size and label count included) is at most
    ``budget_pixels`` and its group equals the chunk's; otherwise it opens a new chunk. An image
    over the budget on its own is a chunk alone.

    Args:
        sizes: ``(h, w)`` of each image at the CRF's working resolution (:func:`crf_working_size`).
        n_labels: label count of each image (or one count for all).
        budget_pixels: budget in pixel-equivalents (see :func:`chunk_cost`).
        groups: optional key of each image; images of different keys never share a chunk (one
            CRF call has one set of kernel bandwidths).

    Returns:
        Chunks of image indices: every index exactly once, in order.

    Example:
        >>> plan_crf_batches([(100, 100), (100, 100), (300, 300), (10, 10)], 2, 25_000)
        [[0, 1], [2], [3]]
    """
    n = len(sizes)
    counts = [int(n_labels)] * n if isinstance(n_labels, int) else [int(c) for c in n_labels]
    if len(counts) != n:
        raise ValueError(f"n_labels has {len(counts)} entries for {n} images")
    if not budget_pixels > 0:
        raise ValueError(f"budget_pixels must be > 0, got {budget_pixels!r}")
    keys = [None] * n if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} entries for {n} images")
    chunks: list[list[int]] = []
    for i in range(n):
        if chunks and keys[chunks[-1][0]] == keys[i]:
            cand = chunks[-1] + [i]
            if chunk_cost([sizes[j] for j in cand], [counts[j] for j in cand]) <= budget_pixels:
                chunks[-1] = cand
                continue
        chunks.append([i])
    return chunks


def _image_sizes(mask: Tensor | None, B: int, H: int, W: int) -> list[tuple[int, int]]:
    if mask is None:
        return [(H, W)] * B
    rows = mask.any(2).sum(1).tolist()
    cols = mask.any(1).sum(1).tolist()
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def crf_refine_labels_bounded(
    images: Tensor,
    labels: Tensor,
    n_labels: Tensor | Sequence[int] | int,
    gt_prob: float = 0.8,
    mask: Tensor | None = None,
    *,
    max_pixels: int = DEFAULT_CRF_MAX_PIXELS,
    batch_pixels: float = DEFAULT_CRF_BATCH_PIXELS,
    upsample: Literal["marginals", "nearest"] = "marginals",
    scale_bandwidths: bool = True,
    **params: Any,
) -> Tensor:
    """Dense-CRF refinement of hard labels at a bounded working resolution, in planned chunks.

    Each image of more than ``max_pixels`` pixels is refined at :func:`crf_working_size` and
    brought back to its size (see the module docstring); smaller images at their own size. When
    every image is at most ``max_pixels`` and the batch fits ``batch_pixels``, this is exactly
    ``crf_refine_labels(images, labels, C, gt_prob, mask, label_mask)`` with ``C`` the largest
    label count (at least 2) and each image's own labels valid (bit for bit).

    Args:
        images: ``(B, 3, H, W)`` RGB, uint8 or float in ``[0, 255]``.
        labels: ``(B, H, W)`` integer labels, in ``[0, n_labels_b)`` on each image's pixels
            (anything, e.g. ``-1``, on padding).
        n_labels: ``(B,)`` label count of each image (or one count for all).
        gt_prob: confidence of the input labels.
        mask: optional ``(B, H, W)`` bool valid pixels; each image's valid pixels must be a
            top-left rectangle (as :func:`clasp_torch.pipeline.pad_images` makes) when it is
            larger than ``max_pixels``.
        max_pixels: working-resolution cap in pixels (:data:`DEFAULT_CRF_MAX_PIXELS`).
        batch_pixels: budget of one CRF call (:func:`plan_crf_batches`, :data:`DEFAULT_CRF_BATCH_PIXELS`).
        upsample: ``"marginals"`` (bilinear marginals, then argmax) or ``"nearest"`` (labels).
        scale_bandwidths: for a downscaled image, multiply the spatial bandwidths
            (``sxy_gaussian``, ``sxy_bilateral``) by its scale ``sqrt(h w / (H W))``, at least
            :data:`MIN_SXY` working pixels, so the kernels span the same part of the photo as at
            full resolution (the default: the labels agree with the full-resolution CRF's on ~98 %
            of pixels, against 80-89 % with ``False``, which keeps the bandwidths in working pixels;
            ``benchmarks/RESULTS.md`` section 8).
        **params: forwarded to :func:`clasp_torch.crf.dense_crf` (``n_iter``, ``sxy_gaussian``, ...).

    Returns:
        ``(B, H, W)`` int64 labels, ``-1`` outside ``mask``.
    """
    if (images.dim() != 4 or labels.dim() != 3 or images.shape[0] != labels.shape[0]
            or images.shape[-2:] != labels.shape[-2:]):
        raise ValueError(f"images (B, 3, H, W) and labels (B, H, W) expected, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if upsample not in ("marginals", "nearest"):
        raise ValueError(f"upsample must be 'marginals' or 'nearest', got {upsample!r}")
    B, _, Hm, Wm = (int(s) for s in images.shape)
    dev = labels.device
    counts = torch.as_tensor(n_labels, device="cpu").reshape(-1).expand(B).tolist()
    if mask is not None:
        mask = mask.to(device=dev, dtype=torch.bool)
    sizes = _image_sizes(mask, B, Hm, Wm)
    work = [crf_working_size(H, W, max_pixels) for H, W in sizes]
    scales = [math.sqrt(h * w / (H * W)) if scale_bandwidths and (h, w) != (H, W) else 1.0
              for (H, W), (h, w) in zip(sizes, work)]
    chunks = plan_crf_batches(work, counts, batch_pixels, groups=scales)

    def label_mask(idx: Sequence[int]) -> tuple[int, Tensor]:
        C = max(max(int(counts[i]) for i in idx), 2)
        n = torch.tensor([counts[i] for i in idx], device=dev)
        return C, torch.arange(C, device=dev).view(1, C) < n.view(-1, 1)

    if len(chunks) == 1 and work == sizes:  # nothing to plan: the full-resolution CRF of the batch
        C, lm = label_mask(range(B))
        return crf_refine_labels(images, labels, C, gt_prob, mask=mask, label_mask=lm, **params)

    out = torch.full((B, Hm, Wm), -1, dtype=torch.long, device=dev)
    for idx in chunks:
        hm = max(work[i][0] for i in idx)
        wm = max(work[i][1] for i in idx)
        img_c = torch.zeros(len(idx), 3, hm, wm, dtype=torch.uint8, device=images.device)
        if images.dtype != torch.uint8:
            img_c = img_c.to(images.dtype)
        lab_c = torch.zeros(len(idx), hm, wm, dtype=torch.long, device=dev)
        mask_c = torch.zeros(len(idx), hm, wm, dtype=torch.bool, device=dev)
        for j, i in enumerate(idx):
            (H, W), (h, w) = sizes[i], work[i]
            if (h, w) == (H, W):
                img_c[j, :, :h, :w] = images[i, :, :H, :W]
            else:
                img_c[j, :, :h, :w] = resize_image(images[i, :, :H, :W], (h, w))
            lab_c[j, :h, :w] = downscale_labels(labels[i, :H, :W], (h, w))
            mask_c[j, :h, :w] = mask[i, :h, :w] if mask is not None and (h, w) == (H, W) else True
        lab_c.masked_fill_(~mask_c, 0)  # labels outside the valid pixels are irrelevant (may be -1)
        C, lm = label_mask(idx)
        kw = dict(params)
        if scales[idx[0]] != 1.0:  # one scale per chunk (the planner's groups)
            for name in ("sxy_gaussian", "sxy_bilateral"):
                kw[name] = max(float(kw.get(name, _CRF_DEFAULTS[name])) * scales[idx[0]], MIN_SXY)
        if upsample == "nearest":
            refined = crf_refine_labels(img_c, lab_c, C, gt_prob, mask=mask_c, label_mask=lm, **kw)
            for j, i in enumerate(idx):
                (H, W), (h, w) = sizes[i], work[i]
                upsample_labels_nearest(refined[j, :h, :w], (H, W), out=out[i, :H, :W])
            continue
        Q = dense_crf(img_c, unary_from_labels(lab_c, C, gt_prob, label_mask=lm), mask=mask_c, label_mask=lm, **kw)
        del img_c, lab_c
        for j, i in enumerate(idx):
            (H, W), (h, w) = sizes[i], work[i]
            upsample_marginals_argmax(Q[j, :, :h, :w], (H, W), out=out[i, :H, :W])
        del Q
    if mask is not None:
        out.masked_fill_(~mask, -1)
    return out


#: the keyword arguments :class:`CRFRefiner` (``CLASP(crf_params=...)``) accepts: the dense CRF's
#: (:func:`clasp_torch.crf.dense_crf`), the unary's ``gt_prob`` and the working resolution's
CRF_PARAMS: tuple[str, ...] = tuple(k for k in _CRF_DEFAULTS if k not in ("image", "unary", "mask", "label_mask")) + (
    "gt_prob", "upsample", "scale_bandwidths")


class CRFRefiner(nn.Module):
    """The pipeline's refinement stage: the dense CRF at a bounded working resolution, a Module over
    :func:`crf_refine_labels_bounded`.

    Args:
        gt_prob: confidence of the input labels (pydensecrf's ``unary_from_labels``).
        max_pixels: working-resolution cap (:data:`DEFAULT_CRF_MAX_PIXELS`).
        batch_pixels: budget of one CRF call (:data:`DEFAULT_CRF_BATCH_PIXELS`).
        upsample, scale_bandwidths: see :func:`crf_refine_labels_bounded`.
        **params: the dense CRF's keyword arguments (``n_iter``, ``sxy_gaussian``, ...; see
            :data:`CRF_PARAMS`). Unknown names raise a ``ValueError`` listing the accepted ones;
            :class:`~clasp_torch.crf.DenseCRF`'s ``n_labels`` and ``clip`` do not apply here
            (each image's label count is its K; the unary comes from hard labels).

    Shape:
        - images: ``(B, 3, H, W)`` uint8, labels ``(B, H, W)`` int64 (anything on padding),
          n_labels ``(B,)``, mask ``(B, H, W)`` bool
        - output: ``(B, H, W)`` int64, ``-1`` outside ``mask``

    Example:
        >>> refiner = CRFRefiner(n_iter=5)
        >>> img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8); img[..., 4:] = 200
        >>> lab = torch.zeros(1, 8, 8, dtype=torch.long); lab[..., 5:] = 1
        >>> refiner(img, lab, torch.tensor([2]), torch.ones(1, 8, 8, dtype=torch.bool))[0, 0].tolist()
        [0, 0, 0, 0, 1, 1, 1, 1]
    """

    def __init__(
        self,
        gt_prob: float = 0.8,
        max_pixels: int = DEFAULT_CRF_MAX_PIXELS,
        batch_pixels: int = DEFAULT_CRF_BATCH_PIXELS,
        upsample: Literal["marginals", "nearest"] = "marginals",
        scale_bandwidths: bool = True,
        **params: Any,
    ) -> None:
        super().__init__()
        for name in ("n_labels", "clip"):
            if name in params:
                raise ValueError(
                    f"crf_params: {name!r} is a DenseCRF argument that does not apply to the pipeline's refiner "
                    "(each image's label count is its K, and the unary comes from hard labels); remove it")
        unknown = sorted(set(params) - set(CRF_PARAMS))
        if unknown:
            raise ValueError(f"crf_params: unknown argument(s) {', '.join(map(repr, unknown))}; "
                             f"accepted: {', '.join(CRF_PARAMS)}")
        self.gt_prob = check_float("gt_prob", gt_prob, minimum=0.0, maximum=1.0, open_interval=True)
        self.max_pixels = check_int("crf_max_pixels", max_pixels, 1)
        self.batch_pixels = check_int("crf_batch_pixels", batch_pixels, 1)
        self.upsample = check_choice("upsample", upsample, ("marginals", "nearest"))
        self.scale_bandwidths = bool(scale_bandwidths)
        if "n_iter" in params:
            params["n_iter"] = check_int("n_iter", params["n_iter"], 0)
        self.params = params

    def forward(self, images: Tensor, labels: Tensor, n_labels: Tensor, mask: Tensor) -> Tensor:
        return crf_refine_labels_bounded(
            images, labels, n_labels, self.gt_prob, mask, max_pixels=self.max_pixels,
            batch_pixels=self.batch_pixels, upsample=self.upsample,  # type: ignore[arg-type]
            scale_bandwidths=self.scale_bandwidths, **self.params,
        )

    def extra_repr(self) -> str:
        return (f"gt_prob={self.gt_prob}, max_pixels={self.max_pixels}, batch_pixels={self.batch_pixels}, "
                f"upsample={self.upsample!r}, params={self.params}")
