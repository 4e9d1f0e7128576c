"""Argument checks shared by the modules of the MagiAttention compat package.

MagiAttention's arguments are plain ints, bools and int sequences; these checks name
the argument in every error, so a ported call learns which one is wrong.
"""

from __future__ import annotations

import torch


def is_int(x) -> bool:
    """An int that is not a bool (``True`` is no sequence length)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(value, name: str, *, minimum: int = 0) -> int:
    if not is_int(value) or value < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name}: expected a {kind} int, got {value!r}")
    return value


def check_optional_ints(**limits: tuple[object, int]) -> None:
    """``name=(value, minimum)``: each value is None or an int >= its minimum."""
    for name, (value, minimum) in limits.items():
        if value is not None:
            check_int(value, name, minimum=minimum)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return value


def as_int_list(values, name: str) -> list[int]:
    """A 1-d int tensor or a sequence of ints as a list (floats are refused, not cut)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point():
            raise ValueError(
                f"{name}: expected a 1-d int tensor, got {values.dtype} {tuple(values.shape)}"
            )
        return [int(v) for v in values.tolist()]
    try:
        out = [v for v in values]
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of ints, got {values!r}") from None
    if not all(is_int(v) for v in out):
        raise ValueError(f"{name}: expected ints, got {out!r}")
    return out


def check_unsupported(sink, softcap) -> None:
    """MagiAttention's attention sinks and logit soft-capping have no kernel here."""
    if sink is not None:
        raise ValueError("sink: attention sinks are not supported")
    if softcap != 0:
        raise ValueError(f"softcap: only 0 is supported, got {softcap!r}")


def lse_dtype(lse: torch.Tensor) -> torch.Tensor:
    """MagiAttention's lse is float32; float64 inputs keep float64 (the oracles' case)."""
    return lse if lse.dtype == torch.float64 else lse.float()
