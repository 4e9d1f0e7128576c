"""Schedules: every context-parallel algorithm as plain data (see :mod:`.ir`)."""

from __future__ import annotations

from collections.abc import Callable

from .allgather import allgather
from .bidi_ring import bidi_ring
from .direct import direct
from .groupcast import groupcast
from .hamilton import hamilton
from .hamilton_2level import hamilton_2level
from .ir import PieceId, Routing, Schedule, Step, Transfer, split_even
from .line import line
from .passes import finalize, prune, reverse_backward
from .ring import ring
from .verify import ScheduleError, ScheduleReport, verify, verify_backward

BUILDERS: dict[str, Callable[..., Routing]] = {
    "ring": ring,
    "bidi_ring": bidi_ring,
    "line": line,
    "allgather": allgather,
    "hamilton": hamilton,
    "hamilton_2level": hamilton_2level,
    "direct": direct,
    "groupcast": groupcast,
}


def register_schedule(name: str, builder: Callable[..., Routing]) -> None:
    """Add a schedule builder ``builder(world_size, local_len, **options) -> Routing``."""
    BUILDERS[name] = builder


def build_routing(name: str, world_size: int, local_len: int, **options) -> Routing:
    if name not in BUILDERS:
        raise ValueError(f"schedule: expected one of {sorted(BUILDERS)} or 'auto', got {name!r}")
    return BUILDERS[name](world_size, local_len, **options)


__all__ = [
    "BUILDERS",
    "PieceId",
    "Routing",
    "Schedule",
    "ScheduleError",
    "ScheduleReport",
    "Step",
    "Transfer",
    "build_routing",
    "finalize",
    "prune",
    "register_schedule",
    "reverse_backward",
    "verify_backward",
    "split_even",
    "verify",
]
