"""Connected components of label maps, on the device: labelling, adjacency, fragment merging, holes.

* :func:`label_components` splits every segment of a batch of label maps into its connected
  components in one pass (4- or 8-connectivity; neighbours join only when they carry the same
  label), exactly, by union-find: edges between equal-label neighbours (absent ones as
  self-loops, so nothing depends on the data's shape), root hooking with ``scatter_reduce_``
  (``amin``) and full pointer jumping until nothing changes. It is
  :func:`kornia.contrib.connected_components_union_find`'s method (which labels one binary mask)
  on a multi-label map: a map of ``K`` segments costs one pass instead of ``K`` binary planes.
  Components are numbered ``0..n_b-1`` per image in raster order of their first pixel (the order
  of ``scipy.ndimage.label``).

  ``backend="kornia"`` computes the same ids with kornia itself: each map one-hot encoded into
  one binary plane per label it holds, one :func:`~kornia.contrib.connected_components_union_find`
  call on all of them (kornia is 8-connected only; 4-connectivity runs it on a 2x grid in which no diagonal
  contact survives, :func:`_diagonal_free`), its ids renumbered. It is not the default, by
  measurement (``python -m benchmarks.components``, one thread, this 2-core CPU; RESULTS
  section 11): kornia / torch = 11-29x on 640 x 480 maps of 5-15 labels and 13x on the CRF label
  maps of the COCO dev images (8-connected; 82-328x 4-connected), 21x on one image's band of 17
  maps at the CRF's 2**14 pixels and 52x on the same band at image size (what ``clasp proposals``
  labels). The reason: ``K`` binary planes are ``K`` times the pixels and edges of one pass over
  the ``K``-label map, and kornia's union-find hooks four edges per 2x2 block where the run-based
  one keeps about one per touching pair of runs.
* :func:`component_adjacency` counts, for every pair of components of an image, the neighbouring
  pixel pairs across their common border (one ``bincount``); :func:`component_stats` sums cell
  weights (areas, image-border contact) and takes bounding boxes per component.
* :func:`merge_small` gives every component below a minimum area to its neighbour of the longest
  common border among the larger ones (chains resolved by pointer jumping); :func:`enclosed`
  finds, for every component, the components it encloses (its holes), by reachability from the
  image border in the component graph.

All functions take a *cell weight*: the number of image pixels a cell stands for (1 for a pixel
map; a patch's block of pixels for a patch map), so areas are in pixels either way.

Example:
    >>> lab = torch.tensor([[[0, 0, 1, 0], [1, 1, 1, 0], [0, 2, 2, 0]]])
    >>> comp, n = label_components(lab, connectivity=4)
    >>> comp[0].tolist(), n.tolist()
    ([[0, 0, 1, 2], [1, 1, 1, 2], [3, 4, 4, 2]], [5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BACKENDS", "MapGroups", "compact_ids", "component_adjacency", "component_stats", "enclosed", "label_components",
    "map_groups", "merge_small",
]

BACKENDS = ("torch", "kornia")
"""The implementations of :func:`label_components`."""


def _offsets(connectivity: int) -> list[tuple[int, int]]:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])


def _pairs(x: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """``(x[y, x'], x[y + dy, x' + dx])`` views over every in-bounds neighbour pair (``dy >= 0``)."""
    H, W = x.shape[-2:]
    x0, x1 = max(0, -dx), W - max(0, dx)
    return x[..., : H - dy, x0:x1], x[..., dy:, x0 + dx : x1 + dx]


def _union_find(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Roots of the graph on ``n`` nodes with edges ``src - dst``: every node's smallest connected index."""
    parent = torch.arange(n, device=src.device)
    while True:
        rs, rt = parent[src], parent[dst]
        merged = parent.clone()
        # hook the larger root under the smaller one (only roots are hooked: parents only decrease)
        merged.scatter_reduce_(0, torch.maximum(rs, rt), torch.minimum(rs, rt), reduce="amin")
        while True:  # full pointer jumping before the next hooking round
            jumped = merged[merged]
            if torch.equal(jumped, merged):
                break
            merged = jumped
        if torch.equal(merged, parent):
            return parent
        parent = merged


def compact_ids(parent: Tensor, exists: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber groups ``0..n-1`` per row, in increasing order of their root.

    Args:
        parent: ``(M, G)`` int64 root id of every slot (roots are their own parent).
        exists: ``(M, G)`` bool slots in use.

    Returns:
        ``new_id (M, G)`` int64 compact group id of every slot (``-1`` where not ``exists``),
        ``n (M,)`` int64 number of groups per row.
    """
    ids = torch.arange(parent.shape[1], device=parent.device).view(1, -1)
    is_root = (parent == ids) & exists
    rank = torch.cumsum(is_root.long(), 1) - 1
    new = rank.gather(1, parent)
    return torch.where(exists, new, torch.full_like(new, -1)), is_root.sum(1)


def _diagonal_free(planes: Tensor) -> Tensor:
    """``(..., H, W)`` binary masks -> ``(..., 2H, 2W)`` masks whose 8-components are the 4-components.

    Pixel ``(y, x)`` goes to ``(2y, 2x)``; ``(2y, 2x + 1)`` is set where ``(y, x)`` and ``(y, x + 1)``
    are both set, ``(2y + 1, 2x)`` where ``(y, x)`` and ``(y + 1, x)`` are; ``(2y + 1, 2x + 1)`` is never
    set. Every 8-neighbour pair of the result is a pixel and one of its own links, or two links that
    share a pixel, so no diagonal-only contact survives and every 4-contact does.
    """
    *lead, H, W = planes.shape
    out = planes.new_zeros((*lead, 2 * H, 2 * W))
    out[..., ::2, ::2] = planes
    out[..., ::2, 1:-1:2] = planes[..., :, :-1] & planes[..., :, 1:]
    out[..., 1:-1:2, ::2] = planes[..., :-1, :] & planes[..., 1:, :]
    return out


def _label_kornia(lab: Tensor, fg: Tensor, connectivity: int) -> tuple[Tensor, Tensor]:
    """:func:`label_components` by :func:`kornia.contrib.connected_components_union_find`.

    The labels are one-hot encoded into binary planes, one per (image, label) that occurs, all
    labelled in one call (4-connectivity through :func:`_diagonal_free`), and kornia's ids (the
    smallest 1-based 2x2-block index of each component) are renumbered in raster order of the
    components' first pixels, per image.
    """
    from kornia.contrib import connected_components_union_find

    B, H, W = lab.shape
    dev = lab.device
    values, inv = torch.unique(lab[fg], return_inverse=True)
    K = len(values)
    dense = torch.full_like(lab, -1)
    dense[fg] = inv
    present = torch.zeros(B * K, dtype=torch.bool, device=dev)
    b_fg = torch.arange(B, device=dev).view(B, 1, 1).expand(B, H, W)[fg]
    present[b_fg * K + inv] = True  # only the (image, label) planes that occur
    plane = torch.cumsum(present.long(), 0) - 1
    which = present.nonzero().squeeze(1)
    planes = dense[which // K] == (which % K).view(-1, 1, 1)  # (P, H, W)
    if connectivity == 4:
        planes = _diagonal_free(planes)
    cc = connected_components_union_find(planes.unsqueeze(1)).squeeze(1)
    if connectivity == 4:
        cc = cc[..., ::2, ::2]
    pix = torch.arange(B * H * W, device=dev).view(B, H, W)[fg]
    raw = cc.reshape(len(which), H * W)[plane[b_fg * K + inv], pix % (H * W)]  # kornia's id of every fg pixel
    roots, local = torch.unique(raw, return_inverse=True)
    first = torch.full((len(roots),), B * H * W, dtype=torch.long, device=dev).scatter_reduce_(0, local, pix, "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=dev)
    n = torch.bincount(first // (H * W), minlength=B)
    offset = torch.cumsum(n, 0) - n
    comp = torch.full((B, H, W), -1, dtype=torch.long, device=dev)
    comp[fg] = rank[local] - offset[pix // (H * W)]
    return comp, n


def label_components(labels: Tensor, connectivity: int = 8, backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Connected components of every segment of a batch of label maps.

    Two cells are connected when they are neighbours (4: sharing an edge; 8: an edge or a
    corner) and carry the same label ``>= 0``; negative labels (padding, dropped cells) are
    background and belong to no component.

    Method: each row is cut into runs of equal labels (a cumulative max over the row); the runs
    are the nodes of the union-find, and only the edges where the pair of runs above/below
    changes along a row are kept (one per touching pair of runs, up to repeats), so the hooking
    rounds work on a few edges per run instead of four per pixel.

    Args:
        labels: ``(B, H, W)`` integer label maps.
        connectivity: 4 or 8.
        backend: ``"torch"`` (the run-based union-find above) or ``"kornia"``
            (:func:`kornia.contrib.connected_components_union_find` on one binary plane per label;
            4-connectivity on a 2x grid without diagonal contacts). Both give the same ids.

    Returns:
        ``components (B, H, W)`` int64: component ids ``0..n_b-1`` of each image, numbered in
        raster order of their first cell, ``-1`` on background; ``n (B,)`` int64 counts.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    offsets = _offsets(connectivity)
    B, H, W = labels.shape
    dev = labels.device
    lab = labels.long()
    fg = lab >= 0
    if B * H * W == 0 or not bool(fg.any()):
        return torch.full((B, H, W), -1, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
    if backend == "kornia":
        return _label_kornia(lab, fg, connectivity)
    # runs: a new run starts where the label changes along the row (or at the row's start)
    starts = torch.ones_like(fg)
    starts[..., 1:] = lab[..., 1:] != lab[..., :-1]
    starts &= fg
    run = torch.cumsum(starts.reshape(-1).long(), 0).view(B, H, W) - 1  # run id of every cell (raster order)
    n_runs = int(run[-1, -1, -1]) + 1
    src, dst = [], []
    for dy, dx in offsets[1:]:  # the horizontal neighbours are joined by the runs themselves
        la, lb = _pairs(lab, dy, dx)
        ra, rb = _pairs(run, dy, dx)
        same = (la == lb) & (la >= 0)
        new = same.clone()  # keep an edge where the pair of runs differs from its left neighbour's
        new[..., 1:] &= (ra[..., 1:] != ra[..., :-1]) | (rb[..., 1:] != rb[..., :-1]) | ~same[..., :-1]
        src.append(ra[new])
        dst.append(rb[new])
    roots = _union_find(n_runs, torch.cat(src), torch.cat(dst))
    # number the root runs per image, in run order (= raster order of the components' first cells)
    is_root = roots == torch.arange(n_runs, device=dev)
    image_of = torch.arange(B, device=dev).view(B, 1, 1).expand(B, H, W)[starts]
    rank = torch.cumsum(is_root.long(), 0) - 1
    n = torch.bincount(image_of[is_root], minlength=B)
    first = torch.cumsum(n, 0) - n
    run_id = rank[roots] - first[image_of]
    comp = torch.where(fg, run_id[run.clamp_min(0)], torch.full_like(run, -1))
    return comp, n


def component_adjacency(comp: Tensor, n_max: int, connectivity: int = 8) -> Tensor:
    """Common-border lengths between the components of each image.

    Args:
        comp: ``(B, H, W)`` int64 component ids ``< n_max`` (``-1``: no component).
        n_max: ``G``, the number of component slots.
        connectivity: the neighbourhood that defines adjacency (4 or 8).

    Returns:
        ``(B, G, G)`` int64 symmetric: the number of neighbouring cell pairs ``(p, q)`` with ``p``
        in one component and ``q`` in the other (zero diagonal; pairs with a ``-1`` cell are not
        counted).
    """
    B = comp.shape[0]
    G = n_max
    base = (torch.arange(B, device=comp.device) * G * G).view(B, 1, 1)
    keys = []
    for dy, dx in _offsets(connectivity):
        a, b = _pairs(comp, dy, dx)
        ok = (a != b) & (a >= 0) & (b >= 0)
        k = base + a.clamp_min(0) * G + b.clamp_min(0)
        keys.append(torch.where(ok, k, torch.full_like(k, B * G * G)).reshape(-1))
    cnt = torch.bincount(torch.cat(keys), minlength=B * G * G + 1)[: B * G * G].view(B, G, G)
    return cnt + cnt.transpose(1, 2)


def component_stats(comp: Tensor, n_max: int, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted sizes and bounding boxes (in cells) of the components of each image.

    Args:
        comp: ``(B, H, W)`` int64 component ids ``< n_max`` (``-1``: none).
        n_max: ``G``.
        weight: ``(B, H, W)`` or ``(H, W)`` weight of every cell (e.g. its pixel count).

    Returns:
        ``size (B, G)`` (the summed weights, in the dtype of ``weight``), ``box (B, G, 4)`` int64
        inclusive ``(x1, y1, x2, y2)`` in cells (``[W, H, -1, -1]`` for an empty slot).
    """
    B, H, W = comp.shape
    G = n_max
    dev = comp.device
    ok = comp >= 0
    key = torch.where(ok, comp + (torch.arange(B, device=dev) * G).view(B, 1, 1), torch.full_like(comp, B * G))
    w = weight.expand(B, H, W)
    size = torch.zeros(B * G + 1, dtype=w.dtype, device=dev).index_add_(0, key.reshape(-1), w.reshape(-1))
    ys = torch.arange(H, device=dev).view(1, H, 1).expand(B, H, W).reshape(-1)
    xs = torch.arange(W, device=dev).view(1, 1, W).expand(B, H, W).reshape(-1)
    k = key.reshape(-1)
    lo = torch.tensor([W, H], device=dev).repeat(B * G + 1, 1)
    hi = torch.full((B * G + 1, 2), -1, dtype=torch.long, device=dev)
    xy = torch.stack([xs, ys], 1)
    lo.scatter_reduce_(0, k.view(-1, 1).expand(-1, 2), xy, reduce="amin")
    hi.scatter_reduce_(0, k.view(-1, 1).expand(-1, 2), xy, reduce="amax")
    box = torch.cat([lo, hi], 1)[: B * G].view(B, G, 4)
    return size[: B * G].view(B, G), box


def merge_small(area: Tensor, adjacency: Tensor, valid: Tensor, min_area: float) -> Tensor:
    """Groups after merging every component below ``min_area`` into a larger neighbour.

    A component smaller than ``min_area`` joins the neighbour with which it shares the longest
    border among those ranked above it (larger area; equal area and smaller id); chains are
    followed to their end, so a group is connected and has one component that is not merged.
    A small component without a larger neighbour stays on its own (the caller may drop it).

    Args:
        area: ``(B, G)`` component areas.
        adjacency: ``(B, G, G)`` common-border lengths (:func:`component_adjacency`).
        valid: ``(B, G)`` bool existing components.
        min_area: the minimum area.

    Returns:
        ``(B, G)`` int64 group of every component: the id of the component it ends up in
        (itself when not merged).
    """
    B, G = area.shape
    dev = area.device
    ids = torch.arange(G, device=dev)
    a = area.double()
    # rank[i, j]: j ranks above i (strictly larger area, or equal area and smaller id)
    above = (a.unsqueeze(1) > a.unsqueeze(2)) | ((a.unsqueeze(1) == a.unsqueeze(2)) & (ids.view(1, G) < ids.view(G, 1)))
    cand = torch.where(above & valid.unsqueeze(1) & (adjacency > 0), adjacency, torch.zeros_like(adjacency))
    best = cand.argmax(2)  # first maximum: the smallest id on ties
    small = valid & (a < min_area) & (cand.amax(2) > 0)
    parent = torch.where(small, best, ids.view(1, G).expand(B, G))
    while True:  # parents rank strictly higher: no cycles
        jumped = parent.gather(1, parent)
        if torch.equal(jumped, parent):
            return parent
        parent = jumped


def enclosed(adjacency: Tensor, border: Tensor, valid: Tensor) -> Tensor:
    """For every component, the components it encloses (its holes).

    Component ``d`` lies in a hole of ``c`` when every path of adjacent components from ``d`` to
    the image border passes through ``c``: the complement of ``c`` (the other components, which
    partition the rest of the image) is connected exactly along the component graph, so these are
    the pieces of ``scipy.ndimage.binary_fill_holes`` (with the same connectivity).

    Args:
        adjacency: ``(B, G, G)`` component adjacency (non-zero = adjacent).
        border: ``(B, G)`` bool components on the image border.
        valid: ``(B, G)`` bool existing components.

    Returns:
        ``(B, G, G)`` bool, ``[b, c, d]`` True when ``d`` is a hole of ``c`` (never ``d == c``).
    """
    B, G, _ = adjacency.shape
    dev = adjacency.device
    adj = (adjacency > 0).to(torch.float32)
    not_self = ~torch.eye(G, dtype=torch.bool, device=dev).unsqueeze(0)
    allowed = not_self & valid.unsqueeze(1)
    reach = (border & valid).unsqueeze(1) & allowed  # reach[b, c, d]: d reaches the border avoiding c
    while True:
        grown = reach | ((torch.bmm(reach.to(torch.float32), adj) > 0) & allowed)
        if torch.equal(grown, reach):
            break
        reach = grown
    return allowed & ~reach


@dataclass
class MapGroups:
    """The regions of ``M`` label maps (one row per map), ``G`` slots each (see :func:`map_groups`)."""

    ids: Tensor  # (M, R, C) int64 group of every cell, -1 outside
    area: Tensor  # (M, G) int64 pixels
    box: Tensor  # (M, G, 4) int64 inclusive (x1, y1, x2, y2) in cells
    border: Tensor  # (M, G) int64 image-border pixels
    exists: Tensor  # (M, G) bool
    valid: Tensor  # (M, G) bool: area >= min_area
    members: Tensor  # (M, G, G) bool: region g covers the groups members[g] (itself, and its holes when filled)


def map_groups(
    maps: Tensor, area_w: Tensor, border_w: Tensor, min_area: int, small: str = "merge", fill_holes: bool = False,
    connectivity: int = 8, backend: str = "torch",
) -> MapGroups:
    """Connected regions of ``(M, R, C)`` label maps: components, small fragments merged
    (``small="merge"``) or left to be dropped (``"drop"``), holes optionally filled.

    Args:
        maps: ``(M, R, C)`` integer labels (``< 0``: no label).
        area_w: ``(M, R, C)`` int64 pixels of every cell; ``border_w``: its image-border pixels.
        min_area: groups below this many pixels are not valid (and are merged first with
            ``"merge"``, into the neighbour sharing the most edge-adjacent cell pairs).
        small: ``"merge"`` or ``"drop"``.
        fill_holes: a region also covers the groups it encloses (:func:`enclosed`).
        connectivity: 4 or 8.
        backend: the implementation of :func:`label_components`.
    """
    comp, n = label_components(maps, connectivity, backend)
    dev = maps.device
    G = max(int(n.max()) if n.numel() else 0, 1)
    exists = torch.arange(G, device=dev).view(1, G) < n.view(-1, 1)
    if small == "merge" and min_area > 0:
        area, _ = component_stats(comp, G, area_w)
        parent = merge_small(area, component_adjacency(comp, G, 4), exists, min_area)
        new_id, n = compact_ids(parent, exists)
        comp = torch.where(comp >= 0, new_id.gather(1, comp.clamp_min(0).flatten(1)).view_as(comp), comp)
        G = max(int(n.max()), 1)
        exists = torch.arange(G, device=dev).view(1, G) < n.view(-1, 1)
    area, box = component_stats(comp, G, area_w)
    border = component_stats(comp, G, border_w)[0]
    members = torch.eye(G, dtype=torch.bool, device=dev).unsqueeze(0) & exists.unsqueeze(1)
    if fill_holes:
        holes = enclosed(component_adjacency(comp, G, connectivity), border > 0, exists)
        members = members | (holes & exists.unsqueeze(2))
    return MapGroups(comp, area, box, border, exists, exists & (area >= max(min_area, 1)), members)
