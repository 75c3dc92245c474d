"""Shared harness of the benchmark scripts, one module per concept:

* :mod:`.paths` - ``ROOT``, ``SHARED_DATA``, ``DEFAULT_IMAGE_DIR``, ``OUT_DIR``, :func:`write_outputs`;
* :mod:`.images` - :func:`load_images` (the photos every timing runs on);
* :mod:`.machine` - :func:`machine_description`, :func:`describe`, :func:`thread_limits`,
  :func:`pinned_cluster_policy`;
* :mod:`.timing` - :func:`sync`, :func:`timed`;
* :mod:`.memory` - :class:`PeakRSS`, :class:`TensorPeak`, :class:`PeakMemory`, :func:`tensor_peak`;
* :mod:`.stages` - the pipeline stage by stage (:func:`run_stages`, :func:`probe_stages`, the
  k-means / silhouette problems of ``select_k``);
* :mod:`.references` - :func:`run_reference` (the literal and Gram-path references on our features).

The scripts (``benchmarks/run.py``, ``memory.py``, ``launches.py``, ...) are entry points over it.
"""

from __future__ import annotations

from .images import load_images
from .machine import describe, machine_description, pinned_cluster_policy, thread_limits
from .memory import PeakMemory, PeakRSS, TensorPeak, tensor_peak
from .paths import DEFAULT_IMAGE_DIR, OUT_DIR, ROOT, SHARED_DATA, makedirs_for, write_outputs
from .references import REFERENCE_VARIANTS, run_reference
from .stages import SPECTRAL_STAGES, STAGES, kmeans_of, probe_stages, problems_of, run_stages, silhouette_of
from .timing import sync, timed

__all__ = [
    "ROOT", "SHARED_DATA", "DEFAULT_IMAGE_DIR", "OUT_DIR", "makedirs_for", "write_outputs",
    "load_images",
    "machine_description", "describe", "thread_limits", "pinned_cluster_policy",
    "sync", "timed",
    "PeakRSS", "TensorPeak", "PeakMemory", "tensor_peak",
    "STAGES", "SPECTRAL_STAGES", "problems_of", "kmeans_of", "silhouette_of", "run_stages", "probe_stages",
    "REFERENCE_VARIANTS", "run_reference",
]  # fmt: skip
