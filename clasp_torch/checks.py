"""Argument checks shared by every stage (in the style of ``kornia.core.check``).

Each check raises a ``ValueError`` whose message names the argument, what was expected and what
was given, so that a wrong call fails at the stage's entry with one clear line instead of deep
inside a tensor operation. Shapes are checked by named dimensions: ``check_shape(x, "B N D")``
binds ``B``, ``N`` and ``D`` to ``x``'s sizes and returns them, and ``check_shape(m, "B N",
sizes=dims)`` then requires the same ``B`` and ``N``.

Example:
    >>> import torch
    >>> dims = check_shape(torch.zeros(2, 5, 3), "B N D", "features")
    >>> dims
    {'B': 2, 'N': 5, 'D': 3}
    >>> check_shape(torch.zeros(2, 4), "B N", "mask", sizes=dims)
    Traceback (most recent call last):
    ...
    ValueError: mask must have shape (B, N) = (2, 5), got (2, 4)
    >>> check_int("n_init", 3, minimum=1)
    3
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "check_int",
    "check_float",
    "check_choice",
    "check_shape",
    "check_integer_tensor",
    "check_bool_mask",
    "check_floating",
    "check_finite",
    "check_same_device",
]


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (a Python, NumPy or 0-d torch integer; not a bool or a float).

    Raises:
        ValueError: not an integer, or outside ``[minimum, maximum]``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_interval: bool = False,
) -> float:
    """``value`` as a finite ``float`` (an int or float, not a bool) inside the given bounds.

    Args:
        open_interval: the bounds themselves are excluded (``(minimum, maximum)``).

    Raises:
        ValueError: not a real number, NaN/Inf, or out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_ok = minimum is None or (v > minimum if open_interval else v >= minimum)
    hi_ok = maximum is None or (v < maximum if open_interval else v <= maximum)
    if not (lo_ok and hi_ok):
        lb, rb = ("(", ")") if open_interval else ("[", "]")
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (strings), else a ``ValueError`` listing them."""
    opts = tuple(choices)
    if not isinstance(value, str) or value not in opts:
        listed = ", ".join(repr(c) for c in opts)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_shape(t: object, dims: str, name: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Check that ``t`` is a tensor of the named dimensions ``dims`` (e.g. ``"B N D"``).

    Args:
        t: the argument.
        dims: space-separated dimension names; a name already in ``sizes`` must match it, an
            integer literal must match exactly.
        name: the argument's name, for the message.
        sizes: dimensions bound so far (not modified).

    Returns:
        ``sizes`` extended with this tensor's dimensions.
    """
    names = dims.split()
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({', '.join(names)}), got {type(t).__name__}")
    bound = dict(sizes or {})
    shape = tuple(t.shape)
    expected = tuple(bound.get(n, int(n) if n.isdigit() else n) for n in names)
    ok = len(shape) == len(names)
    if ok:
        for n, s in zip(names, shape):
            want = int(n) if n.isdigit() else bound.get(n)
            if want is not None and want != s:
                ok = False
                break
            if not n.isdigit():
                bound[n] = s
    if not ok:
        label = ", ".join(names)
        if all(isinstance(e, int) for e in expected):
            raise ValueError(f"{name} must have shape ({label}) = {tuple(expected)}, got {shape}")
        raise ValueError(f"{name} must have shape ({label}), got {shape}")
    return bound


def check_integer_tensor(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``t`` (a tensor or a sequence of integers) as an int64 tensor of ``shape`` on ``device``."""
    v = torch.as_tensor(t, device=device)
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(v.shape)}")
    return v.long()


def check_bool_mask(name: str, mask: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``mask`` as a bool tensor of ``shape`` on ``device``; ``None`` gives all True."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def check_floating(name: str, t: Tensor) -> None:
    """A ``ValueError`` unless ``t`` has a floating-point dtype."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_finite(name: str, t: Tensor) -> None:
    """A ``ValueError`` if ``t`` holds NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_same_device(**tensors: Tensor) -> torch.device:
    """The common device of the named tensors, else a ``ValueError`` naming each one's device."""
    devs = {k: v.device for k, v in tensors.items() if isinstance(v, Tensor)}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"tensors must be on the same device, got {listed}")
    return next(iter(devs.values())) if devs else torch.device("cpu")
