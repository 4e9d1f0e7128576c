"""Token placement across ranks (pure Python); the tensor ops live in runtime."""

from .layouts import (
    BALANCED,
    DISPATCHES,
    Placement,
    balanced,
    chunk_grid,
    compute_pad_size,
    contiguous,
    make_placement,
    stripe,
    zigzag,
)

__all__ = [
    "BALANCED",
    "DISPATCHES",
    "Placement",
    "balanced",
    "chunk_grid",
    "compute_pad_size",
    "contiguous",
    "make_placement",
    "stripe",
    "zigzag",
]
