"""Input validation shared by the public functions.

Every message names the argument, what was expected and what arrived, so that a
user can fix the call without reading our source.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

MODES = ("full", "diagonal", "trace")

def describe(value: Any) -> str:
    """What arrived, for the "got ..." part of a message: a tensor by shape, dtype and device."""
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` is one of ``choices`` (names, or ``None`` where it is an option)."""
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a count is a bug in the caller.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` is an int (not a bool) in ``[low, high]``; ``None`` too if ``optional``.

    TypeError for another type, ValueError outside the range; both name the range.

    Example:
        >>> check_int("k", 3, low=1, high=5)
        3
        >>> check_int("k", 0, low=1)
        Traceback (most recent call last):
        ...
        ValueError: `k` must be a positive int, got 0
    """
    if value is None and optional:
        return None
    if low == 1 and high is None:
        expected = "a positive int"
    elif low is not None and high is not None:
        expected = f"an int in [{low}, {high}]"
    elif low is not None:
        expected = f"an int >= {low}"
    else:
        expected = "an int" if high is None else f"an int <= {high}"
    expected += " or None" if optional else ""
    if not _is_int(value):
        raise TypeError(f"`{name}` must be {expected}, got {describe(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return int(value)


def check_int_pair(name: str, value: Any, *, low: int) -> tuple[int, int]:
    """``k`` or ``(kh, kw)`` (a kernel size, a padding) as a pair of ints ``>= low``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}")
    return check_int(name, pair[0], low=low), check_int(name, pair[1], low=low)


def check_ints(name: str, values: Iterable[Any]) -> list[int]:
    """A non-empty sequence of ints (widths, seeds)."""
    values = list(values)
    if not values:
        raise ValueError(f"`{name}` must be a non-empty sequence of ints, got {values!r}")
    if not all(_is_int(v) for v in values):
        raise TypeError(f"`{name}` must be a non-empty sequence of ints, got {values!r}")
    return [int(v) for v in values]


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False,
                 finite: bool = True, optional: bool = False, unit: str = "",
                 alternative: str | None = None) -> float | None:
    """``value`` is a real number ``>= low`` (``> low`` if ``strict``), never NaN.

    It must be finite unless ``finite=False`` (then ``inf`` is allowed); a one-element
    tensor counts as its value. ``unit`` qualifies the number in messages (``" of bytes"``)
    and ``alternative`` names another value the caller accepts before calling
    (e.g. ``"'auto'"``).

    Example:
        >>> check_number("ridge", 0.5)
        0.5
        >>> check_number("lr", 0.0, strict=True)
        Traceback (most recent call last):
        ...
        ValueError: `lr` must be a finite number > 0, got 0.0
    """
    if value is None and optional:
        return None
    expected = (f"a {'finite ' if finite else ''}number{unit} {'>' if strict else '>='} {low:g}"
                + (" (inf allowed)" if not finite else "") + (" or None" if optional else "")
                + (f" or {alternative}" if alternative else ""))
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {expected}, got {describe(value)}")
    number = float(value)
    bad = math.isnan(number) or (number <= low if strict else number < low)
    if bad or (finite and math.isinf(number)):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return number


def check_sample_range(name: str, index: Any, n: int) -> tuple[int, int]:
    """``index`` is a contiguous ``slice`` or ``range`` within ``n`` samples; ``(start, stop)``."""
    if isinstance(index, range):
        if index.step != 1:
            raise ValueError(f"`{name}` must be a contiguous range (step 1), got {index!r}")
        start, stop = index.start, index.stop
    elif isinstance(index, slice):
        if index.step not in (None, 1):
            raise ValueError(f"`{name}` must be a contiguous slice (step 1), got {index!r}")
        start, stop, _ = index.indices(n)
    else:
        raise TypeError(f"`{name}` must be a slice or range of samples, got {describe(index)}")
    if not 0 <= start <= stop <= n:
        raise ValueError(f"`{name}` must lie within the {n} samples, got {start}:{stop}")
    return start, stop


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` is a floating-point ``torch.dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
    return dtype


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}")
    return value


# `n_out` of check_kernel: either layout accepted.
ANY_OUTPUTS = -1


def check_kernel(name: str, k: Any, *, diagonal: bool = False, square: bool = False,
                 rows: int | None = None, cols: int | None = None,
                 n_out: int | None = ANY_OUTPUTS, finite: bool = True) -> torch.Tensor:
    """``k`` is a floating kernel tensor of the expected layout and sizes.

    Layouts: trace ``(R, C)`` and full ``(R, C, O, O)``, and diagonal ``(R, C, O)`` if
    ``diagonal``.

    Args:
        name: the argument's name, for messages.
        k: the value to check.
        diagonal: accept the diagonal layout ``(R, C, O)``.
        square: demand ``R == C``.
        rows: demanded ``R``, or None.
        cols: demanded ``C``, or None.
        n_out: ``ANY_OUTPUTS`` accepts any layout, ``None`` demands trace mode ``(R, C)``,
            an int the full layout with that ``O``.
        finite: reject NaN and inf entries.

    Returns:
        ``k`` unchanged.
    """
    r, c = ("N", "N") if square else ("N1", "N2")
    layouts = (f"({r}, {c}), ({r}, {c}, O) or ({r}, {c}, O, O)" if diagonal
               else f"({r}, {c}) or ({r}, {c}, O, O)")
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"`{name}` must be a kernel tensor of shape {layouts}, got {describe(k)}")
    if k.dim() == 3 and not diagonal:
        raise ValueError(f"`{name}` has shape {tuple(k.shape)}, a diagonal-mode kernel; this "
                         "needs the trace (N1, N2) or the full (N1, N2, O, O) kernel "
                         "(mode='trace' or mode='full')")
    well_formed = k.dim() in (2, 3, 4) and (k.dim() != 4 or k.shape[2] == k.shape[3])
    if not well_formed or (square and k.shape[0] != k.shape[1]):
        adjective = "square kernel" if square else "kernel"
        raise ValueError(f"`{name}` must be a {adjective} of shape {layouts}, "
                         f"got shape {tuple(k.shape)}")
    if not k.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {k.dtype}")
    if n_out != ANY_OUTPUTS:
        have = None if k.dim() == 2 else k.shape[2]
        if have != n_out or k.dim() == 3:
            want = ("a trace-mode (N1, N2) kernel" if n_out is None
                    else f"a full (N1, N2, {n_out}, {n_out}) kernel")
            raise ValueError(f"`{name}` must be {want} like the training kernel, "
                             f"got shape {tuple(k.shape)}")
    for size, axis, label in ((rows, 0, "rows"), (cols, 1, "columns")):
        if size is not None and k.shape[axis] != size:
            raise ValueError(f"`{name}` must have {size} {label} (dimension {axis}) to match "
                             f"the other arguments, got shape {tuple(k.shape)}")
    if finite and not torch.isfinite(k).all():
        bad = int((~torch.isfinite(k)).sum())
        raise ValueError(f"`{name}` has {bad} non-finite entries (NaN/inf)")
    return k


def check_like(name: str, x: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """``x`` has ``reference``'s dtype and device."""
    if x.dtype != reference.dtype or x.device != reference.device:
        raise ValueError(f"`{name}` must have `{reference_name}`'s dtype {reference.dtype} and "
                         f"device {reference.device}, got {x.dtype} on {x.device}")


def check_module(name: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {describe(model)}")
    return model


def check_inputs(x1: Any, x2: Any | None) -> None:
    """`x1`/`x2` are tensors with a batch dimension and matching trailing shapes.

    For inputs of the analytic kernels; model inputs, which may also be tuples or dicts of
    tensors, are checked by ``_inputs.check_pair``.
    """
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, ...), "
                            f"got {describe(x)}")
        if x.dim() == 0:
            raise ValueError(f"`{name}` must have a batch dimension, shape (N, ...), "
                             "got a 0-d tensor")
    if x2 is not None:
        if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
            raise ValueError(
                f"`x2` must share `x1`'s trailing shape {tuple(x1.shape[1:])}, "
                f"got {tuple(x2.shape[1:])}"
            )
        if x1.dtype != x2.dtype:
            raise ValueError(f"`x2` must have `x1`'s dtype {x1.dtype}, got {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"`x2` must be on `x1`'s device {x1.device}, got {x2.device}")




def check_batch_size(batch_size: Any) -> int | None:
    """Samples per block: a positive int, or None for the default."""
    return check_int("batch_size", batch_size, low=1, optional=True)


def check_memory_budget(memory_budget: Any) -> float | None:
    """Bytes a computation may use: positive, ``inf`` for no limit, None for the default."""
    return check_number("memory_budget", memory_budget, strict=True, finite=False,
                        optional=True, unit=" of bytes")
