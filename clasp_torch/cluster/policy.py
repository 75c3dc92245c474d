"""Device-dependent cost choices of the clustering stage (no result depends on them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ClusterPolicy", "cluster_policy"]


@dataclass(frozen=True)
class ClusterPolicy:
    """Device-dependent cost choices of the clustering stage; no result depends on them.

    Attributes:
        compact_below: converged k-means restarts leave the working arrays once the live ones
            are at most this fraction of them (1.0: at once).
        max_groups: K groups whose restarts are scored separately (see :class:`KGroups`).
        max_block_elements: elements of one silhouette distance block.
    """

    compact_below: float
    max_groups: int
    max_block_elements: int


def cluster_policy(device: torch.device) -> ClusterPolicy:
    """The policy for ``device``: a CPU is bound by arithmetic (compact at once, 3 K groups, 2**25
    block elements); a GPU by operator launches and host syncs (compact when half are live, one
    K group, 2**27 block elements: a batch of 32 images of ~1500 patches in one block).
    ``benchmarks/launches.py`` counts both."""
    if device.type == "cpu":
        return ClusterPolicy(compact_below=1.0, max_groups=3, max_block_elements=2**25)
    return ClusterPolicy(compact_below=0.5, max_groups=1, max_block_elements=2**27)
