"""Device-dependent cost choices of the dense CRF (no result depends on them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CRFPolicy", "crf_policy"]


@dataclass(frozen=True)
class CRFPolicy:
    """Attributes:
        lattice_chunk_points: images are put in one lattice build while their valid pixels sum
            to at most this (``0``: one build per image).
    """

    lattice_chunk_points: int


def crf_policy(device: torch.device) -> CRFPolicy:
    """The policy for ``device``: one lattice build per image on the CPU (the least temporary
    memory); builds of up to ``2**22`` points on a GPU (a batch of 32 640x480 images in 3 builds:
    fewer kernel launches; ``benchmarks/launches.py`` counts them).

    Example:
        >>> crf_policy(torch.device("cpu")).lattice_chunk_points
        0
    """
    return CRFPolicy(lattice_chunk_points=0 if device.type == "cpu" else 2**22)
