"""Where the benchmarks find their inputs and put their outputs."""

from __future__ import annotations

import os

__all__ = ["ROOT", "SHARED_DATA", "DEFAULT_IMAGE_DIR", "OUT_DIR", "makedirs_for", "write_outputs"]

#: the repository root.
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
#: the shared data sets (``shared/data`` beside the checkout).
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
#: the COCO-Stuff dev photos.
DEFAULT_IMAGE_DIR = os.path.join(ROOT, "..", "shared", "data", "cocostuff-val-dev", "images")
#: default folder of benchmark outputs.
OUT_DIR = os.path.join(ROOT, "benchmarks", "out")


def makedirs_for(path: str) -> None:
    """Create the parent folder of ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_outputs(*pairs: tuple[str | None, str]) -> None:
    """Write each ``(path, text)`` whose path is set, creating parent folders."""
    for path, text in pairs:
        if path:
            makedirs_for(path)
            with open(path, "w") as fh:
                fh.write(text + "\n")
