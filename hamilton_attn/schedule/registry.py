"""The schedules, by name: each builder registers itself, in its own file, with what it
needs and what it costs, so adding a schedule is adding one file.

A builder is ``builder(world_size, local_len, **options) -> Routing``. What it declares
(:class:`ScheduleSpec`):

* ``budget(w)``: the received KV it may hold at once, in local shards (stamped on its
  Routing, checked by the verifier, and the memory estimate of the planner's closed
  form); None where the builder works it out itself (groupcast).
* ``transfers(w, node_size)``: how many transfers it routes before pruning (the planner
  takes its exact path below :data:`hamilton_attn.planner.cost.EXACT_MAX_TRANSFERS`).
* ``closed_form``: the traffic of one step for the planner's closed form, or None
  (then the planner always builds and verifies the schedule).
* ``demo``: the dispatches ``hamilton-attn demo`` runs it with.
* ``node_size``: whether it needs the devices per node (``auto`` never picks it
  without them).

Whether it takes ``chunk=`` (pieces cut by the dispatch's chunk) and ``needs=`` /
``cost=`` (the mask's blocks) is read from its signature.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .ir import Routing

#: One step's traffic for the closed form: ``(pieces per shard, blocks per step, flows)``
#: with flows a list of ``(src, dst, tokens)`` (None: all-to-all, in closed form too),
#: and the step structure: ``ring`` (one block set per step), ``waves`` (two blocks per
#: step for the first half, as on a line), ``gather`` (everything moves in step 0).
ClosedForm = Callable[[int, float, int], tuple[int, int, list | None]]


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    build: Callable[..., Routing]
    budget: Callable[[int], float] | None
    transfers: Callable[[int, int | None], int]
    closed_form: ClosedForm | None = None
    steps: str = "ring"  # the closed form's step structure: ring | waves | gather
    demo: tuple[str, ...] = ("zigzag", "contiguous")
    node_size: bool = False
    takes_chunk: bool = False
    takes_mask: bool = False


#: name -> spec, in registration order.
SCHEDULES: dict[str, ScheduleSpec] = {}
#: name -> builder (the registered, budget-stamping callables).
BUILDERS: dict[str, Callable[..., Routing]] = {}


def _stamped(fn: Callable[..., Routing], budget: Callable[[int], float] | None):
    if budget is None:
        return fn

    @functools.wraps(fn)
    def build(world_size: int, local_len: int, **options) -> Routing:
        routing = fn(world_size, local_len, **options)
        return dataclasses.replace(routing, buffer_budget=float(budget(world_size)))

    return build


def register_schedule(
    name: str,
    builder: Callable[..., Routing],
    *,
    budget: float | Callable[[int], float] | None = 2.0,
    transfers: Callable[[int, int | None], int] | None = None,
    closed_form: ClosedForm | None = None,
    steps: str = "ring",
    demo: tuple[str, ...] = ("zigzag", "contiguous"),
    node_size: bool = False,
) -> Callable[..., Routing]:
    """Add ``builder`` as schedule ``name`` (see the module docstring for the rest);
    returns the registered callable. ``transfers`` defaults to ``2 W (W - 1)`` (a
    ring's count, as an estimate); a plain number ``budget`` holds at every W."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a schedule name other than 'auto', got {name!r}")
    if steps not in ("ring", "waves", "gather"):
        raise ValueError(f"steps: expected 'ring', 'waves' or 'gather', got {steps!r}")
    if isinstance(budget, (int, float)):
        fixed = float(budget)

        def budget(w: int) -> float:
            return fixed

    params = inspect.signature(builder).parameters
    stamped = _stamped(builder, budget)
    SCHEDULES[name] = ScheduleSpec(
        name,
        stamped,
        budget,
        transfers or (lambda w, m: 2 * w * (w - 1)),
        closed_form,
        steps,
        tuple(demo),
        node_size,
        takes_chunk="chunk" in params,
        takes_mask="needs" in params,
    )
    BUILDERS[name] = stamped
    return stamped


def schedule(name: str | None = None, **spec):
    """Decorator form of :func:`register_schedule` (the name defaults to the builder's)."""

    def register(fn: Callable[..., Routing]) -> Callable[..., Routing]:
        return register_schedule(name or fn.__name__, fn, **spec)

    return register


def spec_of(name: str) -> ScheduleSpec:
    """The registered schedule ``name``; ValueError naming the known ones otherwise."""
    spec = SCHEDULES.get(name)
    if spec is None:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)} or 'auto', got {name!r}")
    return spec


def build_routing(name: str, world_size: int, local_len: int, **options) -> Routing:
    return spec_of(name).build(world_size, local_len, **options)
