"""Instance-level region proposals: connected components of every K of the band, scored, de-duplicated.

CLASP segments are semantic within an image (two people side by side are one segment). This
module turns a :class:`~clasp_torch.pipeline.CLASPOutput` into instance-level, ranked proposals:

1. **Label maps**: the refined pixel labels of the chosen K (the CRF's), and, with the K-band
   *hierarchy*, every K of the band (``CLASP(keep_band_labels=True)``: the k-means runs the
   silhouette compared, so coarse and fine regions at no extra clustering cost), either refined by
   the CRF (``band_labels`` from :func:`clasp_torch.band.refine_band_labels`, what ``clasp
   proposals`` does) or as nearest-upsampled patch labels.
2. **Regions**: every segment of every map is split into its connected components
   (:func:`clasp_torch.components.label_components`, exact, batched; patch maps on the patch grid,
   which is exact for their nearest-upsampled pixels), fragments below ``min_area`` pixels are
   merged into their longest-border larger neighbour (``small="merge"``) or dropped, and holes
   (regions enclosed by another) optionally filled.
3. **Exact overlaps without masks**: the overlay of all maps cuts each image into *cells* (pixels
   in the same region of every map; exact tuple ids, :func:`tuple_ids`); every region is a union
   of cells, so areas, boxes and the intersection of every pair of regions that share a cell are
   sums over cells (sparse joins, :mod:`clasp_torch.sparse`), and pixel masks are built only for
   the proposals kept.
4. **Scores**: a linear score of per-region cues (:data:`DEFAULT_SCORE_WEIGHTS`, fitted on the
   dev set by ``benchmarks/proposals.py --fit``): persistence across the band (mean best IoU with
   the other maps' regions), the background cue (feature dispersion), the silhouette of its K,
   compactness, size and image-border contact (:func:`clasp_torch.ranking.proposal_cues`).
5. **De-duplication**: greedy non-maximum suppression by mask IoU in score order
   (:func:`clasp_torch.ranking.mask_nms`, the exact greedy result), then the top ``max_proposals``.

Everything runs on the device, batched over the images of a batch (loops only over the label
maps of the band, a handful).

Example:
    >>> model = CLASP("efficientnet_lite0", keep_band_labels=True)  # doctest: +SKIP
    >>> props = instance_proposals(model(images), max_proposals=100)  # doctest: +SKIP
    >>> props.image(0)["masks"].shape, props.image(0)["scores"][:3]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from . import sparse
from .components import map_groups
from .overlay import MapSet, block_counts, pixel_cells, reduce_by, side_weights, slots, sum_by, tuple_ids
from .proposals import RegionProposals
from .ranking import mask_nms, proposal_cues, score_cues

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CLASP, CLASPOutput, ImagesLike

__all__ = [
    "DEFAULT_IOU_THRESHOLD", "DEFAULT_MIN_AREA", "DEFAULT_SCORE_WEIGHTS", "InstanceProposalLayer",
    "InstanceProposals", "instance_proposals", "pixel_cells",
]

DEFAULT_MIN_AREA = 64
"""Fragments below this many pixels are merged into a neighbour (dev-set sweep: RESULTS section 11)."""
DEFAULT_IOU_THRESHOLD = 0.8
"""Mask IoU above which a lower-scored proposal is suppressed (dev-set sweep: 0.5-0.9, best AR@100 at 0.8)."""
DEFAULT_SCORE_WEIGHTS: dict[str, float] = {
    "persistence": 4.0, "objectness": -14.5, "silhouette": 3.7, "fill": 1.9, "log_area": 0.06, "border": -9.9,
    "refined": 0.8,
}
"""Weights of the cues of :func:`clasp_torch.ranking.proposal_cues`: a logistic regression of "matches a
thing instance at IoU >= 0.5" on the cues of every candidate of the 50 COCO-Stuff dev images
(``benchmarks/proposals.py --fit``), rounded; ``refined`` from the fit without the band's CRF (it is a
constant when every map is refined). Negative ``objectness`` means that regions of dispersed features
(large, textured) rank above small uniform fragments; ``border`` penalises regions along the image
border (background and stuff)."""

SmallPolicy = Literal["merge", "drop"]


@dataclass
class InstanceProposals(RegionProposals):
    """Ranked instance proposals of ``B`` images, ``S`` slots each, best first.

    The fields of :class:`~clasp_torch.proposals.RegionProposals` (``masks``, ``boxes``,
    ``areas``, ``valid``, ``embeddings``, ``patch_counts`` = patches the mask touches,
    ``background`` = the weighted feature dispersion of its patches, ``image_sizes``), plus:

    Attributes:
        scores: ``(B, S)`` float32 score, descending over each image's valid slots (``-inf`` on
            invalid slots).
        k: ``(B, S)`` int64 the K of the label map the proposal comes from (0 on invalid slots).
        refined: ``(B, S)`` bool, True when it comes from the refined pixel labels (the CRF's).
    """

    scores: Tensor
    k: Tensor
    refined: Tensor

    def image(self, i: int) -> dict[str, Tensor]:
        """Valid proposals of image ``i``, best first, masks cropped to its own size (the keys
        of :meth:`RegionProposals.image` plus ``scores``, ``k``, ``refined``)."""
        d = super().image(i)
        v = self.valid[i]
        d.update(scores=self.scores[i, v], k=self.k[i, v], refined=self.refined[i, v])
        return d


def _map_sets(
    out: CLASPOutput, band_labels: tuple[Tensor, Tensor] | None, hierarchy: bool, use_pixel_labels: bool,
    ry: Tensor, rx: Tensor, opts: tuple[int, str, bool, int, str],
) -> list[MapSet]:
    """The regions of every label map of the batch (pixel maps at pixel level, patch maps on the grid)."""
    dev = ry.device
    B, H, W = out.labels.shape
    _, h, w, _ = out.features.shape
    isz, gsz = out.image_sizes.to(dev).long(), out.grid_sizes.to(dev).long()
    k_chosen = out.k.to(dev).long().view(B, 1)
    sets = []
    pix: list[tuple[Tensor, Tensor]] = []
    if use_pixel_labels:
        pix.append((out.labels.to(dev).long().unsqueeze(1), k_chosen))
    if hierarchy and band_labels is not None:
        pix.append((band_labels[0].to(dev).long(), band_labels[1].to(dev).long()))
    if pix:
        m, k = torch.cat([p[0] for p in pix], 1), torch.cat([p[1] for p in pix], 1)
        J = m.shape[1]
        aw = (m >= 0).long().reshape(B * J, H, W)
        bw = side_weights(isz, (H, W)).unsqueeze(1).expand(B, J, H, W).reshape(B * J, H, W)
        sets.append(MapSet(map_groups(m.reshape(B * J, H, W), aw, bw, *opts), J, k, True))
    if (hierarchy and band_labels is None) or not pix:  # patch labels: every K of the band, or the chosen K's
        if hierarchy:
            m, k = out.band_patch_labels.to(dev).long(), out.k_values.to(dev).long().view(1, -1).expand(B, -1)
        else:
            m, k = out.patch_labels.to(dev).long().unsqueeze(1), k_chosen
        J = m.shape[1]
        rows, cols = block_counts(ry, h), block_counts(rx, w)
        aw = (rows.unsqueeze(2) * cols.unsqueeze(1)).unsqueeze(1).expand(B, J, h, w).reshape(B * J, h, w)
        bw = side_weights(gsz, (h, w), rows, cols).unsqueeze(1).expand(B, J, h, w).reshape(B * J, h, w)
        sets.append(MapSet(map_groups(m.reshape(B * J, h, w), aw, bw, *opts), J, k, False))
    return sets



def _assemble(
    out: CLASPOutput, sets: list[MapSet], ry: Tensor, rx: Tensor, thr: float, max_p: int | None,
    weights: Mapping[str, float], return_cues: bool,
) -> InstanceProposals | tuple[InstanceProposals, dict[str, Tensor]]:
    """Regions of every map -> overlay cells -> candidates -> IoUs, cues, score, NMS, top-k, masks."""
    dev = ry.device
    B, H, W = out.labels.shape
    _, h, w, D = out.features.shape
    N, HW = h * w, H * W
    isz = out.image_sizes.to(dev).long()
    sl = slots(sets, ry, rx, out)
    tab, (mb, ms_c, ms_m) = sl.table, sl.members
    S = tab["valid"].shape[1]
    Jp, Jq = sl.pixel.shape[1], sl.patch.shape[1]
    n_maps = Jp + Jq
    # ---- cells: the overlay of every map (patches in the same region of every patch map, then pixels
    # of the same such patch cell in the same region of every pixel map); exact tuple ids
    bN = torch.arange(B, device=dev).view(B, 1).expand(B, N).reshape(-1)
    pslot = sl.patch.permute(0, 2, 1).reshape(B * N, Jq)  # slot of every patch in every patch map
    pcols = [bN] + [torch.where(pslot[:, j] >= 0, pslot[:, j] + 1 - sl.offsets[Jp + j], 0) for j in range(Jq)]
    pcell = tuple_ids(pcols, [B] + sl.sizes[Jp:])  # (B * N,) patch cell, sorted by image first
    inside = (ry.unsqueeze(2) >= 0) & (rx.unsqueeze(1) >= 0)
    pb, pq = inside.view(B, HW).nonzero().unbind(1)  # image and flat pixel index of every pixel inside
    ys, xs = pq // W, pq % W
    patch = ry[pb, ys] * w + rx[pb, xs]
    n_pcell = int(pcell.max()) + 1
    ccols = [pcell[pb * N + patch]] + [torch.where(sl.pixel[pb, j, pq] >= 0, sl.pixel[pb, j, pq] + 1 - sl.offsets[j], 0)
                                       for j in range(Jp)]
    pix_cell = tuple_ids(ccols, [n_pcell] + sl.sizes[:Jp])  # cell of every pixel inside, sorted by image first
    NC = int(pix_cell.max()) + 1
    rep = torch.full((NC,), B * HW, dtype=torch.long, device=dev).scatter_reduce_(0, pix_cell, pb * HW + pq, "amin")
    cell_b, rq = rep // HW, rep % HW
    rpatch = ry[cell_b, rq // W] * w + rx[cell_b, rq % W]
    cell_slot = torch.cat([sl.pixel[cell_b, :, rq], pslot[cell_b * N + rpatch]], 1)  # (NC, J_total) region in every map
    cell_area = torch.bincount(pix_cell, minlength=NC).double()
    hs, ws = isz[pb, 0], isz[pb, 1]
    edge = (ys == 0).long() + (ys == hs - 1).long() + (xs == 0).long() + (xs == ws - 1).long()
    cell_border = sum_by(pix_cell, edge, NC)
    xy = torch.stack([xs, ys], 1)
    cell_lo = reduce_by(pix_cell, xy, NC, "amin", torch.iinfo(torch.long).max)
    cell_hi = reduce_by(pix_cell, xy, NC, "amax", -1)
    n_cells = torch.bincount(cell_b, minlength=B)
    first = torch.cumsum(n_cells, 0) - n_cells
    cell = torch.full((B, HW), -1, dtype=torch.long, device=dev)
    cell[pb, pq] = pix_cell
    # ---- candidates: the valid regions, each the union of its member regions (itself, its holes)
    valid = tab["valid"]
    vb, vs = valid.nonzero().unbind(1)
    NQ = len(vb)
    q_of = torch.full((B, S), -1, dtype=torch.long, device=dev)
    q_of[vb, vs] = torch.arange(NQ, device=dev)
    keep = valid[mb, ms_c]
    mq, mkey = q_of[mb[keep], ms_c[keep]], mb[keep] * S + ms_m[keep]
    xc, xj = (cell_slot >= 0).nonzero().unbind(1)
    i, j = sparse.join(cell_b[xc] * S + cell_slot[xc, xj], mkey)
    ex, eq = xc[i], mq[j]  # cell ex lies in candidate eq
    area = sum_by(eq, cell_area[ex], NQ)
    border = sum_by(eq, cell_border[ex], NQ)
    box = torch.cat([reduce_by(eq, cell_lo[ex], NQ, "amin", torch.iinfo(torch.long).max),
                     reduce_by(eq, cell_hi[ex], NQ, "amax", -1)], 1)
    fsum, usum = sum_by(mq, sl.group_f[mkey], NQ), sum_by(mq, sl.group_u[mkey], NQ)  # member regions are disjoint
    # ---- pairwise intersections: candidates sharing a cell (both orders)
    e1, e2 = sparse.group_pairs(ex)
    pkey, pinv = torch.unique(eq[e1] * NQ + eq[e2], return_inverse=True)
    inter = sum_by(pinv, cell_area[ex[e1]], len(pkey))
    p1, p2 = pkey // NQ, pkey % NQ
    iou = inter / (area[p1] + area[p2] - inter)
    # ---- cues
    qmap, qb = tab["map"][vb, vs], vb
    best = torch.zeros(NQ * n_maps, dtype=torch.float64, device=dev).scatter_reduce_(
        0, p1 * n_maps + qmap[p2], iou, "amax").view(NQ, n_maps)
    best[torch.arange(NQ, device=dev), qmap] = 1.0
    present = torch.zeros(B, n_maps, dtype=torch.bool, device=dev)
    present[qb, qmap] = True
    n_present = present.sum(1)[qb].double()
    persistence = ((best * present[qb]).sum(1) - 1) / (n_present - 1).clamp_min(1)
    background = 1 - torch.linalg.vector_norm(usum, dim=1) / area.clamp_min(1)
    qrefined = tab["refined"][vb, vs]
    cues = proposal_cues(area, (box[:, 2] - box[:, 0] + 1) * (box[:, 3] - box[:, 1] + 1), border, persistence,
                         background, tab["sil"][vb, vs], qrefined, isz[qb])
    score = score_cues(cues, weights)
    if return_cues == "candidates":  # every candidate before NMS (for tuning a ranking; see benchmarks/proposals.py)
        return {"image": qb, "cues": cues, "pairs": (p1, p2, iou), "cell": cell, "first": first, "members": (ex, eq),
                "area": area, "k": tab["k"][vb, vs]}  # type: ignore[return-value]
    # ---- greedy NMS in score order per image, top-k
    order = torch.argsort(score.double(), descending=True, stable=True)
    order = order[torch.argsort(qb[order], stable=True)]  # by image, then by score
    rank = torch.empty_like(order)
    rank[order] = torch.arange(NQ, device=dev)
    over = (iou > thr) & (rank[p1] < rank[p2])
    keep = mask_nms(p1[over], p2[over], NQ)
    kept = order[keep[order]]  # kept candidates by image, then score
    n_keep = torch.bincount(qb[kept], minlength=B)
    pos = torch.arange(len(kept), device=dev) - (torch.cumsum(n_keep, 0) - n_keep)[qb[kept]]
    K = max(int(n_keep.max()), 1) if max_p is None else max(min(int(n_keep.max()), max_p), 1)
    kept, pos = kept[pos < K], pos[pos < K]
    kb = qb[kept]
    # ---- outputs (B, K)
    def put(x: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
        o = torch.full((B, K) + x.shape[1:], fill, dtype=dtype, device=dev)
        o[kb, pos] = x[kept].to(dtype)
        return o

    slot_of = torch.full((NQ,), -1, dtype=torch.long, device=dev)
    slot_of[kept] = pos
    C = int(n_cells.max())
    table = torch.zeros(B, K, C + 1, dtype=torch.bool, device=dev)  # the cells of every kept proposal
    sel = slot_of[eq] >= 0
    table[cell_b[ex[sel]], slot_of[eq[sel]], ex[sel] - first[cell_b[ex[sel]]]] = True
    local = torch.where(cell >= 0, cell - first.view(B, 1), torch.full_like(cell, C))
    masks = table.gather(2, local.unsqueeze(1).expand(B, K, HW)).view(B, K, H, W)
    touched = torch.zeros(B, K, N + 1, dtype=torch.bool, device=dev)  # patches each mask touches
    touched.scatter_(2, torch.where(inside, ry.unsqueeze(2) * w + rx.unsqueeze(1), N).view(B, 1, HW).expand(B, K, HW),
                     masks.view(B, K, HW))
    res = InstanceProposals(
        masks=masks, boxes=put(box, 0, torch.float32), areas=put(area, 0, torch.long),
        valid=put(torch.ones(NQ, dtype=torch.bool, device=dev), False, torch.bool),
        embeddings=put(fsum / area.clamp_min(1).unsqueeze(1), 0, torch.float32),
        patch_counts=touched[..., :N].sum(2), background=put(background, float("nan"), torch.float32),
        image_sizes=isz, scores=put(score, float("-inf"), torch.float32), k=put(tab["k"][vb, vs], 0, torch.long),
        refined=put(qrefined, False, torch.bool),
    )
    if return_cues:
        return res, {n: put(v, float("nan"), torch.float32) for n, v in cues.items()}
    return res


# ------------------------------------------------------------------------------- entry points
def instance_proposals(
    out: CLASPOutput,
    *,
    band_labels: tuple[Tensor, Tensor] | None = None,
    hierarchy: bool = True,
    use_pixel_labels: bool = True,
    min_area: int = DEFAULT_MIN_AREA,
    small: SmallPolicy = "merge",
    fill_holes: bool = False,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_proposals: int | None = 100,
    score_weights: Mapping[str, float] | None = None,
    connectivity: int = 8,
    components_backend: str = "torch",
    return_cues: bool = False,
) -> InstanceProposals | tuple[InstanceProposals, dict[str, Tensor]]:
    """Ranked instance proposals from a CLASP output (see the module docstring).

    Args:
        out: a :class:`~clasp_torch.pipeline.CLASPOutput`; with ``hierarchy`` and no
            ``band_labels`` it must carry ``band_patch_labels`` (``CLASP(keep_band_labels=True)``).
        band_labels: ``(labels (B, J, H, W), k (B, J))`` pixel label maps of the band's K, e.g.
            from :func:`clasp_torch.band.refine_band_labels` (the CRF on every K); used instead of
            the nearest-upsampled patch labels.
        hierarchy: add the components of every K of each image's band.
        use_pixel_labels: add the components of ``out.labels`` (the refiner's pixel labels of the
            chosen K). With neither this nor ``hierarchy``, the chosen K's patch labels are used.
        min_area: fragments below this many pixels are merged (``small="merge"``) or dropped;
            no proposal is smaller.
        small: ``"merge"`` (into the neighbour of the longest common border among the larger
            ones; dropped if still small) or ``"drop"``.
        fill_holes: a proposal also covers the regions it encloses.
        iou_threshold: greedy NMS threshold on mask IoU (``>= 1``: only identical masks merge).
        max_proposals: keep the best this many per image (``None``: all).
        score_weights: weights of the cues of :func:`clasp_torch.ranking.proposal_cues`
            (default :data:`DEFAULT_SCORE_WEIGHTS`).
        connectivity: 4 or 8, for components, merging and holes.
        components_backend: ``"torch"`` or ``"kornia"``, the implementation of the connected
            components (:func:`clasp_torch.components.label_components`; the same result).
        return_cues: also return the cues of the returned proposals (``(B, S)`` each).

    Returns:
        :class:`InstanceProposals` (``S`` = the most proposals kept in one image), and the cues
        when ``return_cues``.
    """
    if small not in ("merge", "drop"):
        raise ValueError(f"small must be 'merge' or 'drop', got {small!r}")
    if hierarchy and band_labels is None and out.band_patch_labels is None:
        raise ValueError("hierarchy=True needs the labels of every K of the band: build the model with "
                         "CLASP(..., keep_band_labels=True), pass band_labels, or pass hierarchy=False")
    if max_proposals is not None and max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1 or None, got {max_proposals}")
    dev = out.labels.device
    _, H, W = out.labels.shape
    _, h, w, _ = out.features.shape
    ry, rx = pixel_cells(out.grid_sizes.to(dev).long(), out.image_sizes.to(dev).long(), (h, w), (H, W))
    opts = (min_area, small, fill_holes, connectivity, components_backend)
    sets = _map_sets(out, band_labels, hierarchy, use_pixel_labels, ry, rx, opts)
    return _assemble(out, sets, ry, rx, iou_threshold, max_proposals,
                     DEFAULT_SCORE_WEIGHTS if score_weights is None else score_weights, return_cues)


class InstanceProposalLayer(nn.Module):
    """``nn.Module`` wrapper: images -> CLASP -> :class:`InstanceProposals`.

    Args:
        model: the :class:`~clasp_torch.pipeline.CLASP` model to hold (optional; it can also be
            passed to :meth:`forward`). With ``hierarchy`` (the default) it must be built with
            ``keep_band_labels=True``.
        refine_band: refine every K of the band with the dense CRF
            (:func:`clasp_torch.band.refine_band_labels`) before taking its components.
        **options: keyword arguments of :func:`instance_proposals` (``min_area``,
            ``max_proposals``, ``iou_threshold``, ...).

    Shape:
        - images: ``(B, 3, H, W)`` or a list of ``(3, H_i, W_i)``, uint8 or float in [0, 1].
        - output: :class:`InstanceProposals`.
    """

    def __init__(self, model: CLASP | None = None, refine_band: bool = False, **options: Any) -> None:
        super().__init__()
        self.model = model
        self.refine_band = refine_band
        self.options = dict(options)

    @torch.no_grad()
    def forward(self, images: ImagesLike, model: CLASP | None = None) -> InstanceProposals:
        m = model if model is not None else self.model
        if m is None:
            raise ValueError("InstanceProposalLayer needs a CLASP model: pass one to __init__ or forward")
        out = m(images)
        band = None
        if self.refine_band and self.options.get("hierarchy", True):
            from .band import refine_band_labels

            band = refine_band_labels(images, out)
        res = instance_proposals(out, band_labels=band, **self.options)
        assert isinstance(res, InstanceProposals)
        return res

    def extra_repr(self) -> str:
        return ", ".join([f"refine_band={self.refine_band}"] + [f"{k}={v!r}" for k, v in self.options.items()])
