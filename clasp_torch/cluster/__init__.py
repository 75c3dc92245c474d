"""Clustering stage of CLASP: batched k-means, exact mean silhouette, K selection.

All K of every image's band, all images and all k-means restarts run as one batch of
"problems". A problem ``p`` is one (image, K) pair; it clusters the ``n_b`` real patches of its
image in the space of the first ``K`` eigenvectors into ``K`` clusters. Problems are not copied:
they refer to their image's embedding ``(B, N, D)`` (a point mask marks the real patches) and to
their number of coordinates. Each Lloyd step scores all active restarts of an image with one
GEMM (centres beyond a restart's ``K`` are masked, coordinates beyond its ``K`` are zero) and
moves only the points that changed cluster between float64 cluster sums. The silhouettes of all
K of an image share one accumulation of squared distances, coordinate by coordinate.

Randomness comes from a counter-based hash of ``(seed, K, restart, centre, trial)``
(:mod:`clasp_torch.rng`), and ties within rounding go to the first index, so the result of an
image depends only on the seed and its own data: the same image gives the same labels alone or
inside any batch, on any device.

Modules: :mod:`.kmeans` (Lloyd iterations, restarts, relocation), :mod:`.kmeanspp` (seeding),
:mod:`.layout` (restart layouts and the nearest-centre kernel), :mod:`.silhouette`,
:mod:`.select` (the K search and its Module), :mod:`.policy` (device cost choices).
"""

from __future__ import annotations

from ..rng import hash_uniform
from .kmeans import KMeansResult, canonical_labels, kmeans
from .policy import ClusterPolicy, cluster_policy
from .select import ClusterSelection, KBandClustering, best_in_band, select_k
from .silhouette import silhouette_samples, silhouette_score

__all__ = [
    "KMeansResult",
    "kmeans",
    "silhouette_score",
    "silhouette_samples",
    "ClusterSelection",
    "select_k",
    "best_in_band",
    "KBandClustering",
    "hash_uniform",
    "canonical_labels",
    "ClusterPolicy",
    "cluster_policy",
]
