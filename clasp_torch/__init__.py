"""clasp_torch: CLASP (Clustering via Adaptive Spectral Processing) in pure PyTorch.

Main entry point: :class:`CLASP`, an ``nn.Module`` mapping a batch of images to per-image
segmentations. Each stage lives in its own module (``spectral``, ``cluster``, ``crf``, ...).
"""

from .backbones import Backbone, WeightsUnavailableError, get_backbone
from .pipeline import CLASP, CLASPOutput

__version__ = "0.1.0"

__all__ = ["CLASP", "CLASPOutput", "Backbone", "WeightsUnavailableError", "get_backbone", "__version__"]
