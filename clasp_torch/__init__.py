"""clasp_torch: CLASP (Clustering via Adaptive Spectral Processing) in pure PyTorch."""

__version__ = "0.1.0"
