"""Helpers shared by the ``clasp`` commands: the user-error type, quiet third-party logging,
device arguments, the model from the common flags, the output-folder check."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "quiet_third_party", "default_batch_size", "build_model", "device_args",
           "prepare_out_dir"]


class CLIError(Exception):
    """An error explained to the user in one paragraph (exit code 2)."""


# ----------------------------------------------------------------------------------- helpers
_NOISY_MODULES = (r"(lightning|lightning_fabric|pytorch_lightning|lightning_utilities|torch|torchvision|timm"
                  r"|torchmetrics)(\.|$)")
_LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed",
)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """The CLI's terminal filter: hides Lightning's info lines and tips ("GPU available", "Tip: ...
    litlogger") and deprecation warnings raised inside the dependencies; anything else (our own
    warnings, other warnings of the dependencies, errors) still reaches the user. Only the CLI
    uses it: the library itself never filters warnings globally."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _LIGHTNING_INFO_LOGGERS)]
    with warnings.catch_warnings():
        for cat in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=cat, module=_NOISY_MODULES)
        for lg, _ in saved:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in saved:
                lg.setLevel(level)


def device_args(device: str, devices: int | None) -> dict[str, Any]:
    import torch

    dev = device.lower()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device} was requested but no CUDA GPU is available; use --device cpu")
        if ":" in dev:
            return {"accelerator": "gpu", "devices": [int(dev.split(":")[1])]}
        return {"accelerator": "gpu", "devices": devices or 1}
    if dev == "cpu":
        return {"accelerator": "cpu", "devices": devices or 1}
    raise CLIError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")


def default_batch_size(device: str) -> int:
    """1 on a CPU (the clustering problems of a batch are padded, so batching costs time there), 8
    on a GPU (``device``: auto, cpu, cuda or cuda:N)."""
    import torch

    dev = device.lower()
    on_gpu = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    return 8 if on_gpu else 1


def build_model(args: argparse.Namespace, refiner: str | None, **extra: Any):
    from .backbones import WeightsUnavailableError
    from .pipeline import CLASP

    try:
        return CLASP(
            args.backbone,
            weights=args.weights,
            refiner=refiner,
            max_patches=args.max_patches,
            fixed_k=getattr(args, "fixed_k", None),
            seed=args.seed,
            k_selector=getattr(args, "k_selector", "eigengap"),
            preset=getattr(args, "preset", "paper"),
            **({"crf_max_pixels": args.crf_max_pixels} if getattr(args, "crf_max_pixels", None) else {}),
            **extra,
        )
    except WeightsUnavailableError as exc:
        raise CLIError(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


def prepare_out_dir(out: Path) -> None:
    """Create the output folder and make sure files can be written in it (else CLIError)."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clasp_write_test.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"cannot write to the output folder {str(out)!r}: {exc.strerror or exc}") from None
