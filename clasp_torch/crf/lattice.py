"""The permutohedral lattice of densecrf (Adams et al. 2010): construction, merging, ``K ⊛ 1``.

:func:`build_lattice` mirrors ``Permutohedral::init`` of ``densecrf/src/permutohedral.cpp`` in
float32: elevation, rounding to the nearest remainder-0 point, rank, barycentric weights,
enclosing-simplex vertex keys and blur neighbours. densecrf's hash table is replaced by one sort
of integer-packed vertex keys, which also gives the vertex-grouped order used for splatting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PermutohedralLattice", "build_lattice", "build_per_image", "merge_lattices", "lattice_filter_ones"]


@dataclass
class PermutohedralLattice:
    """A permutohedral lattice built over ``P`` points with ``d``-dim features.

    Attributes:
        offsets: ``(P, d+1)`` int64 vertex index of each point's enclosing simplex vertices.
        weights: ``(P, d+1)`` float32 barycentric weights.
        blur_n1: ``(d+1, M)`` int64 index of the "+" neighbour along each lattice direction
            (``M`` where the neighbour does not exist, i.e. contributes zero).
        blur_n2: ``(d+1, M)`` int64 index of the "-" neighbour.
        splat_perm: ``(P*(d+1),)`` int64 permutation of the flattened ``offsets`` sorting them by vertex.
        splat_bounds: ``(M+1,)`` int64 start of each vertex's run in ``splat_perm`` order.
        n_vertices: ``M``, the number of lattice vertices.
        d: feature dimension.
        alpha: slice scaling ``1 / (1 + 2^-d)``.
    """

    offsets: Tensor
    weights: Tensor
    blur_n1: Tensor
    blur_n2: Tensor
    splat_perm: Tensor
    splat_bounds: Tensor
    n_vertices: int
    d: int
    alpha: float


def _scale_factors(d: int) -> list[float]:
    """Diagonal of densecrf's elevation matrix, rounded exactly as the C++ code (float32)."""
    inv_std_dev = float(
        torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32, device="cpu")
    )
    vals = [1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)]
    return torch.tensor(vals, dtype=torch.float32, device="cpu").tolist()


@torch.no_grad()
def build_lattice(
    features: Tensor, batch_index: Tensor | None = None
) -> PermutohedralLattice:
    """Build a permutohedral lattice over points with features ``(P, d)``.

    Mirrors ``Permutohedral::init`` of densecrf in float32 (elevation, rounding to the nearest
    remainder-0 point, rank, barycentric weights, enclosing-simplex vertex keys, blur
    neighbours).  The hash table is replaced by one sort of the packed int64 vertex keys,
    which also yields the vertex-grouped order used for splatting.  Points with different
    ``batch_index (P,)`` never share a vertex, so one lattice holds several images.

    Args:
        features: ``(P, d)`` float features (already divided by the kernel bandwidths).
        batch_index: optional ``(P,)`` int64 image index of each point.

    Returns:
        The :class:`PermutohedralLattice`.
    """
    weights, held = _simplex(features)
    d = int(features.shape[-1])
    P = int(weights.shape[0])
    dp1 = d + 1
    device = weights.device
    keys, strides, total = _vertex_keys(held, batch_index, device)
    offsets, perm, bounds, uniq = _unique_vertices(keys, device)
    E = int(perm.numel())
    n1, n2 = _blur_neighbours(uniq, strides, total, d)
    M = int(uniq.numel())
    alpha = float(torch.tensor(1.0 / (1.0 + 2.0 ** (-d)), dtype=torch.float32, device="cpu"))
    itype = torch.int32 if E < 2**31 - 1 else torch.int64  # halves the per-point index memory
    return PermutohedralLattice(offsets.view(P, dp1).to(itype), weights, n1, n2, perm.to(itype), bounds.to(itype),
                                M, d, alpha)


def _simplex(features: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Elevation, enclosing simplex and barycentric weights of every point (densecrf's float32
    arithmetic): ``(weights (P, d+1), [q0 (d, P), rank (d+1, P)])``. The two index tensors come
    in a list that :func:`_vertex_keys` empties, so each is freed as early as in one function."""
    f = (
        features.to(torch.float32).t().contiguous()
    )  # (d, P): row-wise ops are contiguous
    d, P = f.shape
    dp1 = d + 1
    device = f.device
    scale = _scale_factors(d)
    # elevate (y = E f): elevated[j] = sm - j * cf[j-1], sm accumulated from the top
    elevated = f.new_empty(dp1, P)
    sm = f.new_zeros(P)
    for j in range(d, 0, -1):
        c = f[j - 1] * scale[j - 1]
        elevated[j] = sm - float(j) * c
        sm = sm + c
    elevated[0] = sm
    del f
    # closest remainder-0 point (round half to even, as _mm_round_ps / _mm_cvtps_epi32)
    inv = float(torch.tensor(1.0 / dp1, dtype=torch.float32, device="cpu"))
    v = torch.round(elevated * inv)
    rem0 = v * float(dp1)
    vsum = v[0].clone()
    for i in range(1, dp1):
        vsum += v[i]
    del v
    # rank[i] = #{j > i: d_j > d_i} + #{j < i: d_j >= d_i}   (densecrf's tie-breaking)
    diff = elevated - rem0
    rank = torch.zeros(dp1, P, dtype=torch.float32, device=device)
    for i in range(d):
        for j in range(i + 1, dp1):
            c = diff[i] < diff[j]
            rank[i] += c
            rank[j] += ~c
    del diff
    rank += vsum
    add = (rank < 0).to(torch.float32) * dp1
    sub = (rank >= dp1).to(torch.float32) * dp1
    adj = add - sub
    del add, sub
    rank += adj
    rem0 += adj
    del adj
    rank_i = rank.to(torch.int64)
    del rank
    # barycentric coordinates
    bv = (elevated - rem0) * inv
    del elevated
    bary = bv.new_zeros(d + 2, P)
    bary.scatter_add_(0, d - rank_i, bv)
    bary.scatter_add_(0, d + 1 - rank_i, -bv)
    del bv
    bary[0] += 1.0 + bary[d + 1]
    weights = bary[:dp1].t().contiguous()  # (P, d+1)
    del bary
    # Enclosing vertices: key_i(r) = rem0_i + r - (d+1)[rank_i > d - r]  (i < d).  All coordinates of a
    # remainder-r vertex are = r mod (d+1), so key = (d+1) q + r with q_i(r) = rem0_i/(d+1) - [rank_i > d-r];
    # pack (image, q, r) into one integer: ((b * Sq + sum_i (q_i - lo_i) stride_i) * (d+1) + r).
    q0 = torch.round(rem0[:d] * inv).to(
        torch.int64
    )  # (d, P), exact: rem0 is a multiple of d+1
    del rem0
    return weights, [q0, rank_i]


def _vertex_keys(held: list[Tensor], batch_index: Tensor | None, device: torch.device
                 ) -> tuple[list[Tensor], list[int], int]:
    """``[keys]``: the packed int64 key of every point's ``d+1`` enclosing vertices, ``(P*(d+1),)`` (entry
    ``p*(d+1) + r``; int32 on the CPU when the key space allows), with the coordinate strides and
    their sum. ``held`` is ``[q0, rank]`` from :func:`_simplex` (emptied here)."""
    rank_i = held.pop()
    q0 = held.pop()
    d, P = q0.shape
    dp1 = d + 1
    lo = (
        (q0.amin(1) - 2).tolist() if P > 0 else [0] * d
    )  # margin: vertex q >= q0-1, neighbours +-1
    hi = (q0.amax(1) + 2).tolist() if P > 0 else [0] * d
    strides: list[int] = []
    s = 1
    for a, b in zip(lo, hi):
        strides.append(s)
        s *= int(b - a + 1)
    n_batch = (
        int(batch_index.max().item()) + 1 if (batch_index is not None and P > 0) else 1
    )
    key_space = s * n_batch * dp1
    if key_space >= 2**62:
        raise ValueError(
            "permutohedral lattice keys do not fit in int64; features span too large a range"
        )
    total = sum(strides)
    base = torch.zeros(P, dtype=torch.int64, device=device)
    for i in range(d):
        base += (q0[i] - int(lo[i])) * strides[i]
    del q0
    if batch_index is not None:
        base += batch_index.to(torch.int64) * s
    # stride of the coordinate holding each rank (coordinate d is not part of the key)
    st = (
        torch.tensor(strides + [0], dtype=torch.int64, device=device)
        .view(dp1, 1)
        .expand(dp1, P)
    )
    by_rank = torch.zeros(dp1 + 1, P, dtype=torch.int64, device=device)
    by_rank.scatter_(0, rank_i, st)
    del rank_i
    suffix = (
        by_rank.flip(0).cumsum(0).flip(0)
    )  # suffix[k] = sum_{k' >= k} by_rank[k'], suffix[d+1] = 0
    del by_rank
    r = torch.arange(dp1, device=device)
    packed = (base.view(1, P) - suffix[d + 1 - r]) * dp1 + r.view(dp1, 1)  # (d+1, P)
    del suffix, base
    packed = packed.t().reshape(-1)  # entry e = p*(d+1) + r
    if key_space < 2**31 and device.type == "cpu":
        packed = packed.to(torch.int32)  # sorting 32-bit keys is ~2x faster on CPU
    return [packed], strides, total


def _unique_vertices(keys: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One sort of the packed keys (``[keys]`` from :func:`_vertex_keys`, emptied here):
    ``(offsets (E,) vertex of each entry, perm (E,) entries in
    vertex order, bounds (M+1,) start of each vertex's run, uniq (M,) the sorted keys)``."""
    packed = keys.pop()
    sorted_keys, perm = torch.sort(packed, stable=True)  # equal keys keep point order: chunking-independent
    del packed
    E = sorted_keys.numel()
    is_new = torch.ones(E, dtype=torch.bool, device=device)
    if E > 1:
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=is_new[1:])
    vid_sorted = torch.cumsum(is_new, 0) - 1
    starts = is_new.nonzero().squeeze(1)
    uniq = sorted_keys.index_select(0, starts).to(torch.int64)
    del sorted_keys
    offsets = torch.empty(E, dtype=torch.int64, device=device)
    offsets.scatter_(0, perm, vid_sorted)
    del vid_sorted, is_new
    bounds = torch.cat([starts, torch.tensor([E], dtype=torch.int64, device=device)])
    return offsets, perm, bounds, uniq


def _blur_neighbours(uniq: Tensor, strides: list[int], total: int, d: int) -> tuple[Tensor, Tensor]:
    """The "+" and "-" neighbour of every vertex along each of the ``d+1`` lattice directions,
    ``(d+1, M)`` each (``M`` where there is none)."""
    device = uniq.device
    dp1 = d + 1
    M = int(uniq.numel())
    # blur neighbours: n1 = key - 1 on all coordinates but j, key_j + d (j < d); n2 is its inverse
    r0 = (uniq % dp1) == 0
    ar = torch.arange(M, device=device)
    n1s, n2s = [], []
    for j in range(dp1):
        sj = strides[j] if j < d else 0
        q = torch.where(r0, uniq + d - dp1 * (total - sj), uniq - 1 + dp1 * sj)
        idx = torch.searchsorted(uniq, q).clamp_max_(max(M - 1, 0))
        found = uniq.index_select(0, idx) == q
        n1 = torch.where(found, idx, torch.full_like(idx, M))
        n2 = torch.full_like(idx, M)
        n2[idx[found]] = ar[found]
        n1s.append(n1)
        n2s.append(n2)
    return torch.stack(n1s), torch.stack(n2s)


def merge_lattices(lats: list[PermutohedralLattice]) -> PermutohedralLattice:
    """Concatenate lattices built over disjoint point sets (e.g. one per image) into one."""
    if len(lats) == 1:
        return lats[0]
    d, alpha = lats[0].d, lats[0].alpha
    M_tot = sum(lat.n_vertices for lat in lats)
    E_tot = sum(int(lat.splat_perm.numel()) for lat in lats)
    itype = torch.int32 if max(E_tot, M_tot) < 2**31 - 1 else torch.int64
    offs, ws, n1s, n2s, perms, bounds = [], [], [], [], [], []
    vbase, ebase = 0, 0
    for lat in lats:
        M = lat.n_vertices
        offs.append(lat.offsets.to(itype) + vbase)
        ws.append(lat.weights)
        n1s.append(torch.where(lat.blur_n1 < M, lat.blur_n1 + vbase, M_tot))
        n2s.append(torch.where(lat.blur_n2 < M, lat.blur_n2 + vbase, M_tot))
        perms.append(lat.splat_perm.to(itype) + ebase)
        bounds.append(lat.splat_bounds[:-1].to(itype) + ebase)
        vbase += M
        ebase += lat.splat_perm.numel()
    lats.clear()  # drop the per-image lattices before concatenating
    bounds.append(torch.tensor([ebase], dtype=itype, device=offs[0].device))
    return PermutohedralLattice(
        torch.cat(offs),
        torch.cat(ws),
        torch.cat(n1s, 1),
        torch.cat(n2s, 1),
        torch.cat(perms),
        torch.cat(bounds),
        M_tot,
        d,
        alpha,
    )


def build_per_image(features: Tensor, counts: list[int], max_points: int = 0) -> PermutohedralLattice:
    """The lattice of a batch whose images never share a vertex; ``features`` is ``(P, d)``
    grouped by image, ``counts`` the points of each image.

    Consecutive images are built together (image index in the vertex keys) while their points
    sum to at most ``max_points``; each chunk's temporaries are freed before the next, and the
    chunks are merged. ``max_points = 0``: one image per build (the least temporary memory;
    the CPU default). Larger chunks launch ~480 fewer operators per image (the GPU default).
    The result does not depend on the chunking: the image index is the most significant part of
    the packed keys, so vertices come out in the same order.
    """
    chunks: list[list[int]] = []
    filled = 0  # points of the last chunk
    for b, c in enumerate(counts):
        if c == 0:
            continue
        if chunks and filled + c <= max_points:
            chunks[-1].append(b)
            filled += c
        else:
            chunks.append([b])
            filled = c
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    lats = []
    for ch in chunks:
        f = features[starts[ch[0]]:starts[ch[-1] + 1]]
        if len(ch) == 1:
            lats.append(build_lattice(f))
        else:
            local = torch.tensor([counts[i] for i in ch], device=features.device)
            bi = torch.repeat_interleave(torch.arange(len(ch), device=features.device), local, output_size=f.shape[0])
            lats.append(build_lattice(f, bi))
    return merge_lattices(lats)


def lattice_filter_ones(lat: PermutohedralLattice) -> Tensor:
    """``K ⊛ 1`` for the lattice's points: ``(P,)`` float32 (densecrf's norm computation)."""
    M = lat.n_vertices
    w = lat.weights.to(torch.float32)
    g = torch.zeros(M + 1, dtype=torch.float32, device=w.device)
    g.index_add_(0, lat.offsets.reshape(-1), w.reshape(-1))
    for j in range(lat.d + 1):
        nb = g.index_select(0, lat.blur_n1[j]) + g.index_select(0, lat.blur_n2[j])
        g = torch.cat([g[:M] + 0.5 * nb, g.new_zeros(1)])
    return (g[lat.offsets] * w).sum(1) * lat.alpha
