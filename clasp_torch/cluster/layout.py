"""Restart layouts and the nearest-centre kernel shared by k-means++ and the Lloyd steps.

k-means restarts of many (image, K) problems are laid out in rows of slots so that one batched
GEMM per row scores all restarts of an image (:class:`Layout`, :func:`nearest_code`); restarts
of similar K are scored together (:class:`KGroups`). None of these choices changes a result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TIE_RTOL", "KGroups", "Layout", "ScoreBuffers", "nearest_code", "rank_in_group", "scatter_slots"]


#: relative tolerance under which two squared distances count as tied (see :func:`nearest_code`)
TIE_RTOL: dict[torch.dtype, float] = {
    torch.float32: 32 * torch.finfo(torch.float32).eps,
    torch.float64: 32 * torch.finfo(torch.float64).eps,
    torch.float16: 32 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 32 * torch.finfo(torch.bfloat16).eps,
}


def rank_in_group(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Position of every item inside its group (items keep their order) and the group sizes:
    ``(rank (A,), counts (n_groups,))``."""
    counts = torch.bincount(group, minlength=n_groups)
    order = torch.argsort(group, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return rank, counts


def scatter_slots(t: Tensor, slot: Tensor, S: int) -> Tensor:
    """Scatter per-item rows ``t (A, ...)`` into ``S`` zero-initialised slots."""
    out = t.new_zeros((S,) + tuple(t.shape[1:]))
    out[slot] = t
    return out


class ScoreBuffers:
    """Reusable score and hit buffers of :func:`nearest_code` (on the CPU, a fresh large
    allocation at every Lloyd step costs page faults)."""

    def __init__(self) -> None:
        self.score: Tensor | None = None
        self.hit: Tensor | None = None

    def get(self, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
        numel = math.prod(shape)
        if self.score is None or self.hit is None or self.score.numel() < numel or self.score.dtype != like.dtype:
            self.score = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.hit = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.score[:numel].view(shape), self.hit[:numel].view(shape)


class Layout:
    """Restarts laid out in rows of ``M`` slots for the batched GEMM of :func:`nearest_code`.

    Without ``chunk``, a row is an image that has restarts here (``M`` = the largest number of
    restarts of an image); ``identity`` when that is the restarts' own order (one image, or
    equal counts in image order). With ``chunk``, each image's restarts fill rows of ``chunk``
    slots, so that images with few restarts waste at most ``chunk − 1`` slots each, and
    ``row_img`` names each row's image.
    """

    def __init__(self, img: Tensor, n_images: int, chunk: int | None = None) -> None:
        A = img.numel()
        dev = img.device
        if chunk is None or n_images == 1:
            present = torch.unique(img)  # sorted; rows only for images that have restarts here
            self.row_img = None if present.numel() == n_images else present  # None: row b is image b
            row = img if self.row_img is None else torch.searchsorted(present, img)
            self.rows = present.numel()
            rank, counts = rank_in_group(row, self.rows)
            self.M = max(int(counts.max()), 1) if A else 1
            self.slot = row * self.M + rank
            self.identity = (self.row_img is None and A == n_images * self.M
                             and bool((self.slot == torch.arange(A, device=dev)).all()))
            return
        rank, counts = rank_in_group(img, n_images)
        per = (counts + chunk - 1) // chunk  # rows of each image
        first = per.cumsum(0) - per
        self.slot = (first[img] + rank // chunk) * chunk + rank % chunk
        self.M = chunk
        self.rows = int(per.sum())
        self.row_img = torch.repeat_interleave(torch.arange(n_images, device=dev), per)
        self.identity = False


def nearest_code(cen: Tensor, pad: Tensor, layout: Layout, xT: Tensor, tie: Tensor, tie_rtol_c: Tensor,
                  bufs: ScoreBuffers, with_min: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest centre of every point, for restarts laid out by image.

    ``cen (A, C, D)`` centres, ``pad (A, C)`` True on padding centres (index ``>= K``),
    ``xT (B, D, N)`` points, ``tie (B, 1, N) = TIE_RTOL ||x||²`` and ``tie_rtol_c = TIE_RTOL``
    (a 0-d tensor). One GEMM per image scores ``||c||² − 2 x·c`` for all its restarts at once.
    Scores within ``TIE_RTOL (||x||² + max ||c||²)`` of the minimum count as ties and go to the
    first centre, so that exact ties (a point equidistant from two centres, e.g. an all-zero
    feature row) never depend on rounding, hence on the batch.

    Returns the float code ``C − index`` of the nearest centre ``(A, N)`` and, with
    ``with_min``, the score at the minimum ``(A, N)``.
    """
    A, C, D = cen.shape
    B, M = layout.rows, layout.M  # rows of the batched GEMM (xT holds one (D, N) per row)
    N = xT.shape[-1]
    c2 = (cen * cen).sum(-1)
    c2max = c2.masked_fill(pad, 0).amax(-1)  # (A,)
    c2.masked_fill_(pad, float("inf"))
    if layout.identity:
        c2s, cs = c2, cen
    else:
        c2s = torch.full((B * M, C), float("inf"), dtype=cen.dtype, device=cen.device)
        c2s[layout.slot] = c2
        cs = scatter_slots(cen, layout.slot, B * M)
        c2max = scatter_slots(c2max, layout.slot, B * M)
    score, hit = bufs.get((B, M * C, N), cen)
    torch.baddbmm(c2s.reshape(B, M * C, 1), cs.reshape(B, M * C, D), xT, alpha=-2, out=score)
    score = score.view(B * M, C, N)
    # (on the CPU, min-with-index over a strided dim is ~20x slower than the value-only amin, and
    # a comparison into bool ~5x slower than into float: float ops only)
    mind = score.amin(1)  # (B*M, N)
    thr = torch.addcmul(mind.view(B, M, N) + tie, c2max.view(B, M, 1), tie_rtol_c)  # mind + rtol (x2 + c2max)
    hit = torch.le(score, thr.view(B * M, 1, N), out=hit.view(B * M, C, N))
    hit.mul_(torch.arange(C, 0, -1, dtype=score.dtype, device=score.device).view(1, C, 1))
    code = hit.amax(1)
    if not layout.identity:
        code = code[layout.slot]
        mind = mind[layout.slot] if with_min else mind
    return code, mind


class KGroups:
    """Restarts sorted by K, cut into contiguous groups of similar K.

    Each group is scored on its own (one GEMM per image and group), padded only to the group's
    largest K (centres) and number of coordinates, instead of the batch's. The cut minimises
    the padded work ``sum(A_g * Cm_g * (D_g + 8))`` plus a fixed cost per group (the work of
    about 3 restarts of K = 10 on this image size, i.e. the launch overhead of a group's ops).
    Results do not depend on the cut.
    """

    def __init__(self, k: Tensor, dims: Tensor, img: Tensor, n_images: int, n_points: int,
                 max_groups: int) -> None:
        kl, dl = k.tolist(), dims.tolist()
        A = len(kl)
        starts = [0] + [i for i in range(1, A) if kl[i] != kl[i - 1]]
        ends = starts[1:] + [A]
        G = len(starts)
        dmax = [max(dl[s:e]) for s, e in zip(starts, ends)]
        fixed = 3 * 10 * 18 * max(1, 1500 // max(n_points, 1))

        def cost(a: int, b: int) -> float:  # distinct-K runs a .. b-1
            return (ends[b - 1] - starts[a]) * kl[ends[b - 1] - 1] * (max(dmax[a:b]) + 8) + fixed

        inf = float("inf")
        best = [[inf] * (G + 1) for _ in range(max_groups + 1)]
        arg = [[0] * (G + 1) for _ in range(max_groups + 1)]
        best[0][0] = 0.0
        for j in range(1, max_groups + 1):
            for b in range(1, G + 1):
                for a in range(j - 1, b):
                    c = best[j - 1][a] + cost(a, b)
                    if c < best[j][b]:
                        best[j][b], arg[j][b] = c, a
        ng = min(range(1, min(max_groups, G) + 1), key=lambda j: best[j][G])
        cuts = []
        b = G
        for j in range(ng, 0, -1):
            a = arg[j][b]
            cuts.append((starts[a], ends[b - 1], kl[ends[b - 1] - 1], max(dmax[a:b])))
            b = a
        ar = torch.arange(max(kl) if kl else 1, device=k.device)
        self.groups = [(s, e, cm, dg, Layout(img[s:e], n_images, self._chunk(img[s:e], n_images)),
                        ar[:cm].view(1, cm) >= k[s:e].view(-1, 1)) for s, e, cm, dg in reversed(cuts)]
        self._rows: dict[int, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _chunk(img: Tensor, n_images: int) -> int | None:
        """Rows of 16 restarts when one row per image (with restarts here) would pad more than 25 %
        (images with very different numbers of restarts), else one row per image."""
        if n_images == 1:
            return None
        counts = torch.bincount(img, minlength=n_images)
        present, most = int((counts > 0).sum()), int(counts.max())
        return None if present * most <= 1.25 * img.numel() else 16

    def nearest(self, cen: Tensor, xT: Tensor, tie: tuple[Tensor, Tensor], bufs: ScoreBuffers,
                with_min: bool = False) -> tuple[Tensor, Tensor] | Tensor:
        """Index of the nearest centre as float ``(A, N)`` (and the score at it, ``with_min``)."""
        A, N = cen.shape[0], xT.shape[-1]
        lab = torch.empty(A, N, dtype=cen.dtype, device=cen.device)
        mind = torch.empty(A, N, dtype=cen.dtype, device=cen.device) if with_min else None
        for gi, (s, e, cm, dg, layout, pad) in enumerate(self.groups):  # a few groups, not a per-K loop
            if layout.row_img is None:
                xg, tg = xT[:, :dg], tie[0]
            else:  # the points (and ties) of each row's image, gathered once per grouping
                if gi not in self._rows:
                    self._rows[gi] = (xT[:, :dg].index_select(0, layout.row_img),
                                      tie[0].index_select(0, layout.row_img))
                xg, tg = self._rows[gi]
            code, m = nearest_code(cen[s:e, :cm, :dg], pad, layout, xg, tg, tie[1], bufs, with_min)
            torch.sub(cm, code, out=lab[s:e])
            if mind is not None:
                mind[s:e] = m
        return (lab, mind) if mind is not None else lab
