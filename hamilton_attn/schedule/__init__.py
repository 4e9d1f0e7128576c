"""Schedules: every context-parallel algorithm as plain data (see :mod:`.ir`)."""

from __future__ import annotations

import importlib
import pkgutil

from .ir import PieceId, Routing, Schedule, Step, Transfer, split_even
from .passes import finalize, prune, reverse_backward
from .registry import (
    BUILDERS,
    SCHEDULES,
    ScheduleSpec,
    build_routing,
    register_schedule,
    schedule,
    spec_of,
)
from .verify import ScheduleError, ScheduleReport, verify, verify_backward

# Every other module of this package is a schedule builder that registers itself (see
# .registry): importing them all is what makes a new file a new schedule.
_NOT_BUILDERS = {"ir", "passes", "registry", "verify"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _NOT_BUILDERS:
        importlib.import_module(f"{__name__}.{_mod}")
del _mod

__all__ = [
    "BUILDERS",
    "PieceId",
    "Routing",
    "Schedule",
    "ScheduleError",
    "ScheduleReport",
    "Step",
    "Transfer",
    "SCHEDULES",
    "ScheduleSpec",
    "build_routing",
    "finalize",
    "prune",
    "register_schedule",
    "schedule",
    "spec_of",
    "reverse_backward",
    "verify_backward",
    "split_even",
    "verify",
]
