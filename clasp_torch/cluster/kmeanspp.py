"""Greedy k-means++ initialisation of every restart of a batch of k-means problems."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rng import hash_uniform
from .layout import TIE_RTOL, Layout, scatter_slots

__all__ = ["kmeanspp"]


def kmeanspp(xi: Tensor, x2: Tensor, pmask: Tensor, img: Tensor, colmask: Tensor, n: Tensor, k: Tensor,
              n_init: int, seed: int) -> Tensor:
    """Greedy k-means++ initialisation of every restart of every problem.

    Args:
        xi: ``(B, N, D)`` image embeddings (zero on padded points); x2 ``(P, N)`` squared norms
            in each problem's space; pmask ``(B, N)``; img ``(P,)`` image of each problem;
            colmask ``(P, D)`` the problem's coordinates; n ``(P,)`` points; k ``(P,)`` clusters.

    Returns:
        centres ``(P, I, C, D)`` (zero beyond each problem's coordinates and clusters).

    The distances of every candidate of all problems of an image come from one GEMM per image.
    """
    B = xi.shape[0]
    # every per-problem tensor goes to padded slots grouped by image (S = B * M), where one GEMM
    # per image serves all its problems; padding slots have k = n = 1 and are dropped at the end.
    # Inside an image the problems are sorted by K descending, so the problems still adding a
    # centre at step c (K > c) are a prefix of every image's row: later steps skip the others.
    perm = torch.sort(-k, stable=True).indices
    perm = perm[torch.sort(img[perm], stable=True).indices]  # (image, -K) order
    img, k, n, colmask, x2 = img[perm], k[perm], n[perm], colmask[perm], x2[perm]
    layout = Layout(img, B)
    if layout.identity:
        slots = (img, k, n, colmask, x2)
    else:
        S = layout.rows * layout.M
        img_s = torch.arange(S, device=xi.device) // layout.M
        if layout.row_img is not None:
            img_s = layout.row_img[img_s]
        slots = (img_s, scatter_slots(k, layout.slot, S).clamp_min(1), scatter_slots(n, layout.slot, S).clamp_min(1),
                 scatter_slots(colmask, layout.slot, S), scatter_slots(x2, layout.slot, S))
    centres = _seed_slots(xi, pmask, layout, *slots, int(k.max()), n_init, seed)
    centres = centres if layout.identity else centres[layout.slot]
    return torch.empty_like(centres).index_copy_(0, perm, centres)


def _seed_slots(xi: Tensor, pmask: Tensor, layout: Layout, img_s: Tensor, k_s: Tensor, n_s: Tensor, col_s: Tensor,
                x2_s: Tensor, C: int, n_init: int, seed: int) -> Tensor:
    """k-means++ of the problems laid out in ``layout``'s slots (``(S,)`` / ``(S, D)`` / ``(S, N)``
    slot tensors): centres ``(S, I, C, D)``."""
    B, N, D = xi.shape
    dev, dt = xi.device, xi.dtype
    I = n_init
    # sklearn's 2 + log(K) local trials, per problem (trials_s below): with the batch's largest K
    # instead, an image's result would depend on the other images of its batch
    trials = 2 + int(math.log(max(C, 2)))
    rows = xi.reshape(B * N, D)
    xT = xi.transpose(1, 2)
    if layout.row_img is not None:  # some images have no problem: rows for the others only
        xT = xT.index_select(0, layout.row_img)
    B, M = layout.rows, layout.M  # from here on, B counts GEMM rows
    S = B * M
    # active prefix length of the rows at each step c = 1 .. C-1 (one host sync)
    prefix = (k_s.view(B, M, 1) > torch.arange(1, max(C, 2), device=dev).view(1, 1, -1)).sum(1).amax(0).tolist()
    trials_s = 2 + torch.log(k_s.clamp_min(2).double()).floor().long()  # (S,)
    ar_i = torch.arange(I, device=dev).view(1, I)
    kk = k_s.view(S, 1)
    zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
    base = (img_s * N).view(S, 1)
    colf = col_s.view(S, 1, D).to(dt)
    # first centre: uniform among the real points
    u0 = hash_uniform(seed, kk, ar_i, zero, zero)
    first = (u0 * n_s.view(S, 1).double()).long().clamp(max=N - 1)  # (S, I)
    pts = rows[base + first] * colf  # (S, I, D)
    centres = torch.zeros(S, I, C, D, dtype=dt, device=dev)
    centres[:, :, 0] = pts
    pm = pmask[img_s].to(dt).unsqueeze(1)  # (S, 1, N)
    # Distances live in "score space", d² − ||x||² = ||c||² − 2 x·c: one GEMM with the ||c||² bias
    # and no pass to add ||x||², which is constant over the candidates of a point (so it changes
    # no choice). Padded points have x = 0, hence score-space closest = 0 = their true distance.
    closest = torch.baddbmm((pts * pts).sum(-1, keepdim=True).expand(S, I, 1).reshape(B, M * I, 1),
                            pts.view(B, M * I, D), xT, alpha=-2).view(B, M, I, N) * pm.view(B, M, 1, N)
    x2b = x2_s.view(B, M, 1, N)
    ar_t = torch.arange(trials, device=dev).view(1, 1, 1, trials)
    cen_b = centres.view(B, M, I, C, D)
    # the draws of every step at once (one hash instead of one per step: fewer kernel launches);
    # u_all[..., c - 1, t] is the draw of centre c, trial t
    u_all = hash_uniform(seed, k_s.view(B, M, 1, 1, 1), ar_i.view(1, 1, I, 1, 1),
                         torch.arange(1, max(C, 2), device=dev).view(1, 1, 1, -1, 1), ar_t.view(1, 1, 1, 1, trials))
    for c in range(1, C):
        m = prefix[c - 1]  # the first m problems of every image still add a centre
        cl = closest[:, :m]  # (B, m, I, N), score space
        x2c = x2b[:, :m]
        dist = (cl + x2c).clamp_min_(0)  # true squared distances
        pot = dist.sum(-1, keepdim=True)  # (B, m, I, 1)
        kc = k_s.view(B, M)[:, :m]
        u = u_all[:, :m, :, c - 1]  # (B, m, I, trials)
        cum = dist.cumsum(-1)
        target = u.to(dt) * pot  # (B, m, I, T)
        cand = torch.searchsorted(cum, target).clamp(max=N - 1)
        cand = torch.minimum(cand, n_s.view(B, M)[:, :m].view(B, m, 1, 1) - 1)
        cpts = rows[base.view(B, M)[:, :m].view(B, m, 1, 1) + cand] * colf.view(B, M, 1, 1, D)[:, :m]  # (B, m, I, T, D)
        c2 = (cpts * cpts).sum(-1, keepdim=True)
        # squared distances (score space) of every point to every candidate: (B, m, I, T, N)
        cd = torch.baddbmm(c2.view(B, m * I * trials, 1), cpts.view(B, m * I * trials, D), xT,
                           alpha=-2).view(B, m, I, trials, N)
        newc = torch.minimum(cd, cl.unsqueeze(3), out=cd)
        # potential of each trial, up to the constant sum of ||x||² (padded points add 0)
        pot_t = newc.sum(-1).masked_fill(ar_t >= trials_s.view(B, M)[:, :m].view(B, m, 1, 1), float("inf"))
        # first trial within rounding of the best potential (ties never decided by rounding)
        near = pot_t <= pot_t.amin(-1, keepdim=True) + TIE_RTOL[dt] * (pot + x2c.sum(-1, keepdim=True))
        best = near.to(torch.int8).argmax(-1)  # (B, m, I)
        closest[:, :m] = newc.gather(3, best.view(B, m, I, 1, 1).expand(B, m, I, 1, N)).squeeze(3)
        chosen = cpts.gather(3, best.view(B, m, I, 1, 1).expand(B, m, I, 1, D)).squeeze(3)
        active = (kc > c).view(B, m, 1, 1).to(dt)
        cen_b[:, :m, :, c] = chosen * active
    return centres
