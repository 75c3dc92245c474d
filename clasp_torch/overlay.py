"""Label maps of a batch as slots, and their overlay: the bookkeeping behind instance proposals.

* :func:`pixel_cells`: the patch row/column of every pixel row/column (the nearest-upsampling rule
  of :func:`clasp_torch.pipeline.upsample_labels`), and the pixel counts and image-border pixels
  of patch cells (:func:`block_counts`, :func:`side_weights`).
* :class:`MapSet` / :func:`slots`: the regions of every label map of a batch numbered as the slots
  ``0..S-1`` of their image, with their K, silhouette, memberships (a region and its holes) and
  pixel-weighted feature sums.
* :func:`tuple_ids`: exact compact ids of tuples of small integers (packed 62-bit keys, one
  ``torch.unique`` whenever the next column would not fit): the cells of the overlay of all maps.

Example:
    >>> tuple_ids([torch.tensor([0, 1, 0, 1]), torch.tensor([2, 0, 2, 1])], [2, 3]).tolist()
    [0, 1, 0, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .components import MapGroups

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CLASPOutput

__all__ = ["MapSet", "Slots", "block_counts", "chosen_silhouette", "pixel_cells", "reduce_by", "side_weights",
           "slots", "sum_by", "tuple_ids"]


def pixel_cells(
    grid_sizes: Tensor, image_sizes: Tensor, hw_max: tuple[int, int], HW_max: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Patch row of every pixel row and patch column of every pixel column (nearest upsampling).

    Same rule as :func:`clasp_torch.pipeline.upsample_labels` (pixel ``y`` takes patch row
    ``floor(y * h / H)``).

    Returns:
        ``ry (B, H_max)``, ``rx (B, W_max)`` int64, ``-1`` beyond each image.
    """
    dev = grid_sizes.device
    gs, isz = grid_sizes.double(), image_sizes.to(dev).double()
    out = []
    for d in (0, 1):
        pos = torch.arange(HW_max[d], device=dev).double().view(1, -1)
        cell = torch.floor(pos * (gs[:, d : d + 1] / isz[:, d : d + 1])).long().clamp(max=hw_max[d] - 1)
        out.append(torch.where(pos < isz[:, d : d + 1], cell, torch.full_like(cell, -1)))
    return out[0], out[1]


def block_counts(cells: Tensor, n: int) -> Tensor:
    """``(B, n)`` number of pixel rows (columns) in each patch row (column)."""
    B = cells.shape[0]
    ok = cells >= 0
    return torch.zeros(B, n + 1, dtype=torch.long, device=cells.device).scatter_add_(
        1, torch.where(ok, cells, torch.full_like(cells, n)), ok.long()
    )[:, :n]


def side_weights(
    sizes: Tensor, shape: tuple[int, int], along_y: Tensor | None = None, along_x: Tensor | None = None
) -> Tensor:
    """``(B, R, C)`` image-border pixels of every cell (corners on two sides count twice).

    ``sizes`` ``(B, 2)`` is each image's size in cells; ``along_y``/``along_x`` the pixel rows
    (columns) of every cell row (column), ``None`` for a pixel map (1 each).
    """
    B = sizes.shape[0]
    R, C = shape
    dev = sizes.device
    ys = torch.arange(R, device=dev).view(1, R, 1)
    xs = torch.arange(C, device=dev).view(1, 1, C)
    h, w = sizes[:, 0].view(B, 1, 1), sizes[:, 1].view(B, 1, 1)
    inside = (ys < h) & (xs < w)
    cy = torch.ones(B, R, 1, dtype=torch.long, device=dev) if along_y is None else along_y.view(B, R, 1)
    cx = torch.ones(B, 1, C, dtype=torch.long, device=dev) if along_x is None else along_x.view(B, 1, C)
    top_bottom = ((ys == 0).long() + (ys == h - 1).long()) * cx
    left_right = ((xs == 0).long() + (xs == w - 1).long()) * cy
    return (top_bottom + left_right) * inside



@dataclass
class MapSet:
    """``J`` label maps of every image, their regions (``groups``: ``B * J`` rows) and their K."""

    groups: MapGroups
    J: int
    k: Tensor  # (B, J)
    refined: bool  # pixel labels of a refiner (else nearest-upsampled patch labels)


def chosen_silhouette(out: CLASPOutput, k: Tensor) -> Tensor:
    """``(B, J)`` silhouette of each K in ``k (B, J)`` (NaN where it is not in the band)."""
    kv = out.k_values.to(k.device)
    hit = k.unsqueeze(-1) == kv.view(1, 1, -1)  # (B, J, Kc)
    sil = out.silhouette.to(k.device).unsqueeze(1).expand_as(hit)
    best = torch.where(hit, sil, torch.full_like(sil, -2.0)).amax(-1)
    return best.masked_fill(~hit.any(-1), float("nan"))



@dataclass
class Slots:
    """Every region of every map as a slot ``0..S-1`` of its image."""

    pixel: Tensor  # (B, Jp, H*W) slot of every pixel in every pixel map (-1: none)
    patch: Tensor  # (B, Jq, N) slot of every patch in every patch map (-1: none)
    table: dict[str, Tensor]  # (B, S) valid, k, sil, refined, map
    members: tuple[Tensor, Tensor, Tensor]  # (b, slot, member slot)
    sizes: list[int]  # groups + 1 per map, pixel maps first
    offsets: list[int]  # first slot of every map, pixel maps first
    group_f: Tensor  # (B * S, D) pixel-weighted feature sums of every region
    group_u: Tensor  # (B * S, D) the same of the unit features


def slots(sets: list[MapSet], ry: Tensor, rx: Tensor, out: CLASPOutput) -> Slots:
    """Slots, memberships and per-region feature sums of every map of the batch."""
    dev = ry.device
    B, H, W = out.labels.shape
    _, h, w, D = out.features.shape
    N = h * w
    f = out.features.to(dev).reshape(B * N, D).double()
    u = torch.nn.functional.normalize(f, dim=-1) * out.patch_mask.to(dev).reshape(B * N, 1)
    inside = (ry.unsqueeze(2) >= 0) & (rx.unsqueeze(1) >= 0)
    patch_of = (ry.clamp_min(0).unsqueeze(2) * w + rx.clamp_min(0).unsqueeze(1)).view(B, H * W)
    S = sum(ms.J * ms.groups.area.shape[1] for ms in sets)
    group_f = torch.zeros(B * S, D, dtype=torch.float64, device=dev)
    group_u = torch.zeros_like(group_f)
    pix, pat, sizes, offs, pix_offs = [], [], [], [], []
    tab: dict[str, list[Tensor]] = {n: [] for n in ("valid", "k", "sil", "refined", "map")}
    mems = []
    off = n_maps = 0
    bi = torch.arange(B, device=dev).view(B, 1)
    for ms in sets:
        g, J = ms.groups, ms.J
        G = g.area.shape[1]
        ids = g.ids.view(B, J, -1)
        slot0 = (off + torch.arange(J, device=dev) * G).view(1, J, 1)
        if ms.refined:
            ids = torch.where(inside.view(B, 1, -1), ids, torch.full_like(ids, -1))
            for j in range(J):  # pixels of every region in every patch: one bincount per map
                key = (bi * (G + 1) + ids[:, j] + 1) * N + patch_of
                key = torch.where(ids[:, j] >= 0, key, torch.zeros_like(patch_of))
                cnt = torch.bincount(key.view(-1), minlength=B * (G + 1) * N).view(B, G + 1, N)[:, 1:]
                eb, eg, ep = cnt.nonzero().unbind(1)
                wgt = cnt[eb, eg, ep].double().unsqueeze(1)
                row = eb * S + off + j * G + eg
                group_f.index_add_(0, row, wgt * f[eb * N + ep])
                group_u.index_add_(0, row, wgt * u[eb * N + ep])
            pix.append(torch.where(ids >= 0, ids + slot0, torch.full_like(ids, -1)))
        else:
            rows, cols = block_counts(ry, h), block_counts(rx, w)
            area = (rows.unsqueeze(2) * cols.unsqueeze(1)).view(B, N).double()
            eb, ej, ep = (ids >= 0).nonzero().unbind(1)
            row = eb * S + off + ej * G + ids[eb, ej, ep]
            group_f.index_add_(0, row, area[eb, ep].unsqueeze(1) * f[eb * N + ep])
            group_u.index_add_(0, row, area[eb, ep].unsqueeze(1) * u[eb * N + ep])
            pat.append(torch.where(ids >= 0, ids + slot0, torch.full_like(ids, -1)))
        sizes += [G + 1] * J
        (pix_offs if ms.refined else offs).extend(off + j * G for j in range(J))
        tab["valid"].append(g.valid.view(B, J * G))
        tab["k"].append(ms.k.view(B, J, 1).expand(B, J, G).reshape(B, J * G))
        tab["sil"].append(chosen_silhouette(out, ms.k).view(B, J, 1).expand(B, J, G).reshape(B, J * G))
        tab["refined"].append(torch.full((B, J * G), ms.refined, device=dev))
        tab["map"].append((n_maps + torch.arange(J, device=dev)).view(1, J, 1).expand(B, J, G).reshape(B, J * G))
        m, g1, g2 = g.members.nonzero().unbind(1)
        mems.append((m // J, off + (m % J) * G + g1, off + (m % J) * G + g2))
        off += J * G
        n_maps += J
    empty = torch.zeros(B, 0, 1, dtype=torch.long, device=dev)
    return Slots(
        pixel=torch.cat(pix, 1) if pix else empty.expand(B, 0, H * W),
        patch=torch.cat(pat, 1) if pat else empty.expand(B, 0, N),
        table={n: torch.cat(v, 1) for n, v in tab.items()}, members=tuple(torch.cat(x) for x in zip(*mems)),  # type: ignore[arg-type]
        sizes=sizes, offsets=pix_offs + offs, group_f=group_f, group_u=group_u,
    )


def tuple_ids(columns: list[Tensor], sizes: list[int]) -> Tensor:
    """Exact compact ids of the tuples ``(columns[0][e], columns[1][e], ...)``, in their
    lexicographic order; ``columns[i]`` holds values in ``[0, sizes[i])``.

    The columns are packed into 62-bit keys, compacted with one ``torch.unique`` whenever the
    next column would not fit.
    """
    base = torch.zeros_like(columns[0])
    bound = 1
    for col, n in zip(columns, sizes):
        if bound * n >= 2**62:
            base = torch.unique(base, return_inverse=True)[1]
            bound = int(base.max()) + 1 if base.numel() else 1
        base = base * n + col
        bound *= n
    return torch.unique(base, return_inverse=True)[1]


def sum_by(index: Tensor, values: Tensor, n: int) -> Tensor:
    """``out[i] = sum of values[index == i]`` (``values (m,)`` or ``(m, D)``), float64."""
    out = torch.zeros((n,) + values.shape[1:], dtype=torch.float64, device=values.device)
    return out.index_add_(0, index, values.double())


def reduce_by(index: Tensor, values: Tensor, n: int, how: str, init: int) -> Tensor:
    """``amin``/``amax`` of ``values (m, F)`` per ``index``: ``(n, F)``."""
    out = torch.full((n, values.shape[1]), init, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index.view(-1, 1).expand_as(values), values, how)


