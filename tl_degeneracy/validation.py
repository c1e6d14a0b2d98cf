"""The package's one set of option validators.

Every frozen config (``RunConfig``, ``JacobianConfig``, ``EdgeConfig``, ``LLCConfig``, the analysis
options, ``StreamOptions``) and every command-line type checks its numbers here, so a mistake reads the
same wherever it is made: one ``ValueError`` naming the option, what it must be and what it got. The
command line wraps these (``cli.common.arg_type``) into argparse types.

Nothing here imports torch: the command line's ``--help`` and usage errors must not pay for it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, what: str, hint: str = "") -> int:
    """``value`` as an int ≥ 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer (1 or more), got {value!r}.{_hint(hint)}")
    return int(value)


def int_at_least(value: Any, minimum: int, what: str, hint: str = "") -> int:
    """``value`` as an int ≥ ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}.{_hint(hint)}")
    return int(value)


def nonnegative_int(value: Any, what: str, hint: str = "") -> int:
    """``value`` as an int ≥ 0."""
    return int_at_least(value, 0, what, hint)


def optional_positive_int(value: Any, what: str, hint: str = "") -> int | None:
    return None if value is None else positive_int(value, what, hint)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_float(value: Any, what: str, hint: str = "") -> float:
    """``value`` as a finite float > 0."""
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}.{_hint(hint)}")
    return float(value)


def nonnegative_float(value: Any, what: str, hint: str = "") -> float:
    """``value`` as a finite float ≥ 0 (NaN refused)."""
    if not _number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.{_hint(hint)}")
    return float(value)


def fraction(value: Any, what: str, hint: str = "", *, open_right: bool = False) -> float:
    """``value`` in ``[0, 1]`` (``[0, 1)`` with ``open_right``)."""
    ok = _number(value) and 0 <= value and (value < 1 if open_right else value <= 1)
    if not ok:
        interval = "[0, 1)" if open_right else "[0, 1]"
        raise ValueError(f"{what} must lie in {interval}, got {value!r}.{_hint(hint)}")
    return float(value)


def int_tuple(value: Any, what: str) -> tuple[int, ...] | None:
    """An int or a non-empty sequence of ints as a tuple (None stays None); tensors are refused."""
    if value is None:
        return None
    if type(value).__name__ == "Tensor":
        raise TypeError(f"{what} must be an int or a list of ints (e.g. [-1]), not a tensor")
    items = [value] if _is_int(value) else list(value) if isinstance(value, Sequence) else [value]
    if not items or any(not _is_int(p) for p in items):
        raise ValueError(f"{what} must be an int or a non-empty list of ints, got {value!r}")
    return tuple(int(p) for p in items)


def positive_floats(value: Any, what: str, hint: str = "") -> tuple[float, ...]:
    """One positive number or a non-empty list of distinct ones, as a tuple."""
    items = [value] if _number(value) else list(value) if isinstance(value, Sequence) else [value]
    if not items:
        raise ValueError(f"{what} must be a positive number or a non-empty list of them.{_hint(hint)}")
    out = tuple(positive_float(v, what, hint) for v in items)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} lists a value twice: {list(out)}")
    return out


def one_of(value: Any, enum: type[E], what: str) -> E:
    """``value`` (a member or its value) as a member of ``enum``."""
    try:
        return enum(value)
    except ValueError:
        choices = [m.value for m in enum]  # type: ignore[attr-defined]
        raise ValueError(f"{what} must be one of {choices}, got {value!r}") from None


def integer(value: Any, what: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return int(value)
