"""Joins and groupings of index lists on the device (the sparse algebra of region proposals).

Example:
    >>> i, j = group_pairs(torch.tensor([5, 7, 5, 5]))
    >>> sorted(zip(i.tolist(), j.tolist()))
    [(0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2)]
    >>> join(torch.tensor([1, 2]), torch.tensor([2, 1, 2]))
    (tensor([0, 1, 1]), tensor([1, 0, 2]))
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_pairs", "join", "segment_ids"]


def _expand(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For ``n`` runs ``[starts[r], starts[r] + counts[r])``: the run and the position of every element."""
    run = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return run, starts[run] + torch.arange(len(run), device=counts.device) - first[run]


def group_pairs(key: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``(e1, e2)``, ``e1 != e2``, of the entries of ``key (n,)`` that are equal."""
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    grp = torch.repeat_interleave(torch.arange(len(counts), device=key.device), counts)  # group of each sorted entry
    e1, e2 = _expand(starts[grp], counts[grp])  # every sorted entry against every entry of its group
    ok = e1 != e2
    return order[e1[ok]], order[e2[ok]]


def join(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """All index pairs ``(i, j)`` with ``left[i] == right[j]`` (``(n,)`` and ``(m,)`` int64)."""
    order = torch.argsort(right, stable=True)
    r = right[order]
    lo = torch.searchsorted(r, left)
    n = torch.searchsorted(r, left, right=True) - lo
    i, pos = _expand(lo, n)
    return i, order[pos]


def segment_ids(key: Tensor) -> tuple[Tensor, Tensor]:
    """Compact ids of the distinct values of ``key (n,)`` (in increasing order) and those values."""
    values, inv = torch.unique(key, return_inverse=True)
    return inv, values
