"""The schedule IR: plain data saying, per step and per rank, what moves and what runs.

Terms:
- A *piece* ``PieceId(owner, part)`` is a subset of the owner's local KV tokens
  (``Schedule.parts[part]``: ranges of owner-local token indices; every owner is cut
  the same way). A rank always holds its own pieces.
- A *transfer* ``Transfer(piece, src, dst)`` listed in step s runs while step s
  computes; the piece is usable on ``dst`` from step s + 1.
- A *block* ``(rank, piece)`` in ``Step.compute[rank]`` is the attention of that
  rank's local queries against the piece (its mask comes from the plan).
- Backward re-runs the same steps (KV re-sent) and adds ``Step.grad_transfers``:
  float32 dK/dV accumulators of a piece leaving ``src`` (what it summed before this
  step) for ``dst``, which adds them to its own accumulator for that piece. At the end
  every piece's accumulator must be home on its owner. Steps past the last compute
  may carry only grad transfers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple


class PieceId(NamedTuple):
    """A named tuple rather than a dataclass: plans key dicts and sets by pieces W^3
    times (hamilton at W = 64), and a tuple hashes and compares in C. Same fields,
    order, hash values and repr as the frozen dataclass it replaced."""

    owner: int
    part: int = 0

    def __str__(self) -> str:
        return f"kv[{self.owner}.{self.part}]"


class Transfer(NamedTuple):
    """A named tuple, as PieceId: hamilton and direct build some 254K transfers and as
    many gradient transfers at W = 64, and a frozen dataclass's ``__init__`` (three
    ``object.__setattr__`` calls) cost twice a tuple's construction. Same fields, order,
    hash values and repr as the frozen dataclass it replaced."""

    piece: PieceId
    src: int
    dst: int

    def __str__(self) -> str:
        return f"{self.piece} {self.src}->{self.dst}"


# ``new_transfer((piece, src, dst))`` is ``Transfer(piece, src, dst)`` without the named
# tuple's Python-level ``__new__`` (the builders and gradient routes make W^3 of them).
new_transfer = functools.partial(tuple.__new__, Transfer)


@dataclass(frozen=True, slots=True)
class Step:
    compute: tuple[tuple[PieceId, ...], ...]  # [rank] -> pieces whose block runs now
    transfers: tuple[Transfer, ...] = ()
    grad_transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True, slots=True)
class Routing:
    """What a schedule builder produces: how pieces travel, before masks are known."""

    name: str
    world_size: int
    parts: tuple[tuple[tuple[int, int], ...], ...]  # [part] -> owner-local token ranges
    steps: tuple[tuple[Transfer, ...], ...]  # [step] -> transfers during that step
    grad_route: str = "follow"  # how dK/dV come home: follow | direct | reverse
    buffer_budget: float = 2.0  # peak received KV held at once, in local shards
    comm: str = "p2p"  # p2p (batched isend/irecv) or a2a (all_to_all per step)
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    world_size: int
    parts: tuple[tuple[tuple[int, int], ...], ...]
    steps: tuple[Step, ...]
    buffer_budget: float
    comm: str = "p2p"
    grad_route: str = "follow"
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # A backward of its own (None: replay ``steps`` with their grad transfers), and the
    # received pieces each rank keeps from the forward for it.
    backward_steps: tuple[Step, ...] | None = None
    retain: tuple[tuple[PieceId, ...], ...] | None = None

    @property
    def pieces(self) -> list[PieceId]:
        return [PieceId(o, p) for o in range(self.world_size) for p in range(len(self.parts))]

    def part_len(self, part: int) -> int:
        return sum(b - a for a, b in self.parts[part])

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def forward_steps(self) -> tuple[Step, ...]:
        """Steps the forward pass runs: up to the last with compute or KV transfers."""
        last = max(
            (i for i, s in enumerate(self.steps) if s.transfers or any(s.compute)), default=-1
        )
        return self.steps[: last + 1]

    def describe(self, rank: int | None = None) -> str:
        lines = [
            f"schedule {self.name}: W={self.world_size}, {len(self.parts)} part(s) "
            f"per rank, {self.num_steps} steps, grads {self.grad_route}"
        ]
        for s, step in enumerate(self.steps):
            ranks = range(self.world_size) if rank is None else [rank]
            comp = "; ".join(f"r{r}:{','.join(map(str, step.compute[r])) or '-'}" for r in ranks)
            tx = ", ".join(str(t) for t in step.transfers if rank is None or rank in (t.src, t.dst))
            gx = ", ".join(
                str(t) for t in step.grad_transfers if rank is None or rank in (t.src, t.dst)
            )
            lines.append(f"  step {s}: compute {comp} | kv {tx or '-'} | dkv {gx or '-'}")
        return "\n".join(lines)


def split_even(n: int, parts: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Cut ``[0, n)`` into ``parts`` contiguous ranges as equal as possible."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return tuple(((a, b),) for a, b in zip(bounds, bounds[1:]))
