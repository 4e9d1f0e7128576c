"""The planner: a cost model of clusters and schedules (pure Python, no communication).

* :mod:`.cluster`: devices, links, shared switch ports and NICs; presets
  ``nvswitch:N``, ``full_mesh:N``, ``nodes:UxM``, ``torus2d:AxB``, ``line:N``.
* :mod:`.cost`: per-step compute / transfer / overlapped time, link bytes and
  memory of a schedule on a cluster; :func:`simulate`, :func:`choose_schedule`,
  :func:`auto_schedule`.
* :mod:`.stats`: FlashAttention tiling statistics and per-device memory of a plan.
"""

from .cluster import DEFAULTS, Cluster, LinkDefaults, Resource, parse_topology
from .cost import (
    BlockStat,
    DeviceModel,
    Prediction,
    Shapes,
    StepCost,
    auto_schedule,
    choose_schedule,
    compare,
    predict_schedule,
    simulate,
    tokens_to_hide,
)

__all__ = [
    "DEFAULTS",
    "BlockStat",
    "Cluster",
    "DeviceModel",
    "LinkDefaults",
    "Prediction",
    "Resource",
    "Shapes",
    "StepCost",
    "auto_schedule",
    "choose_schedule",
    "compare",
    "parse_topology",
    "predict_schedule",
    "simulate",
    "tokens_to_hide",
]
