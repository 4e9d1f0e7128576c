"""Token placement across ranks (pure Python); the tensor ops live in runtime."""

from .placement import (
    DISPATCHES,
    Placement,
    compute_pad_size,
    contiguous,
    make_placement,
    stripe,
    zigzag,
)

__all__ = [
    "DISPATCHES",
    "Placement",
    "compute_pad_size",
    "contiguous",
    "make_placement",
    "stripe",
    "zigzag",
]
