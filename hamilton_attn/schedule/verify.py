"""Prove a schedule correct before any communication, and count what it moves."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .ir import PieceId, Schedule
from .passes import Needs


class ScheduleError(ValueError):
    """A schedule that would compute a wrong result, deadlock, or overflow its buffers."""


@dataclass(slots=True)
class ScheduleReport:
    """What a verified schedule moves (in tokens of KV; multiply by bytes per token)."""

    steps: int
    sent_tokens: list[int]  # per rank, forward KV
    recv_tokens: list[int]
    grad_sent_tokens: list[int]  # per rank, backward dK/dV accumulators
    link_tokens: dict[tuple[int, int], int]  # (src, dst) -> forward KV tokens
    peak_buffer_tokens: list[int]  # per rank: received KV held at once, forward
    blocks: int  # (rank, piece) blocks computed
    empty_blocks: int  # computed blocks with no visible pair (wasted work)
    redundant_transfers: int  # pieces delivered where nobody downstream uses them
    per_step_max_link_tokens: list[int] = field(default_factory=list)

    def summary(self, bytes_per_token: int = 1) -> str:
        f = bytes_per_token
        return (
            f"{self.steps} steps, {self.blocks} blocks, max sent/rank "
            f"{max(self.sent_tokens, default=0) * f}, max buffer/rank "
            f"{max(self.peak_buffer_tokens, default=0) * f}, redundant transfers "
            f"{self.redundant_transfers}"
        )


def verify(schedule: Schedule, needs: Needs, *, local_len: int) -> ScheduleReport:
    """Check ``schedule`` against the blocks the mask needs; raise ScheduleError naming
    the step, rank and piece of the first violation.

    Checks: transfers send only held pieces to other ranks that do not already hold
    them; every block with a visible pair is computed exactly once, on a held piece;
    every dK/dV contribution reaches its owner exactly once and no accumulator is left
    behind; forward KV buffers stay within ``schedule.buffer_budget`` local shards,
    counted in whole pieces (``ceil(budget * parts)`` of the largest part), so uneven
    splits of a shard do not trip it.
    """
    w = schedule.world_size
    plen = [schedule.part_len(p) for p in range(len(schedule.parts))]
    covered = sorted(i for rr in schedule.parts for a, b in rr for i in range(a, b))
    if covered != list(range(local_len)):
        raise ScheduleError(
            f"{schedule.name}: parts {schedule.parts} do not cut the "
            f"{local_len} local tokens exactly once"
        )
    held: list[dict[PieceId, int]] = [
        {PieceId(r, p): 0 for p in range(len(plen))} for r in range(w)
    ]
    computed: Counter = Counter()
    last_use: dict[tuple[int, PieceId], int] = {}
    sent = [0] * w
    recv = [0] * w
    gsent = [0] * w
    links: dict[tuple[int, int], int] = defaultdict(int)
    step_max_link = []
    acc: list[dict[PieceId, Counter]] = [defaultdict(Counter) for _ in range(w)]
    empty = 0
    for s, step in enumerate(schedule.steps):
        if len(step.compute) != w:
            raise ScheduleError(f"step {s}: compute lists {len(step.compute)} ranks, expected {w}")
        where = f"{schedule.name} step {s}"
        # dK/dV accumulators leave with what their sender summed before this step.
        in_flight_grads = []
        for t in step.grad_transfers:
            if t.src == t.piece.owner:
                raise ScheduleError(
                    f"{where}, rank {t.src}: sends the gradient of its own {t.piece}"
                )
            if not acc[t.src].get(t.piece):
                raise ScheduleError(
                    f"{where}, rank {t.src}: sends an empty dK/dV accumulator "
                    f"of {t.piece} to rank {t.dst}"
                )
            in_flight_grads.append((t, acc[t.src].pop(t.piece)))
            gsent[t.src] += plen[t.piece.part]
        link_step: Counter = Counter()
        seen_dst = set()
        for t in step.transfers:
            if not (0 <= t.src < w and 0 <= t.dst < w) or t.src == t.dst:
                raise ScheduleError(f"{where}: transfer {t} has a bad endpoint")
            if t.piece not in held[t.src]:
                raise ScheduleError(f"{where}, rank {t.src}: sends {t.piece} it does not hold")
            if t.piece in held[t.dst] or (t.dst, t.piece) in seen_dst:
                raise ScheduleError(
                    f"{where}, rank {t.dst}: receives {t.piece} it already holds "
                    "(redundant transfer)"
                )
            seen_dst.add((t.dst, t.piece))
            n = plen[t.piece.part]
            sent[t.src] += n
            recv[t.dst] += n
            links[(t.src, t.dst)] += n
            link_step[(t.src, t.dst)] += n
            last_use[(t.src, t.piece)] = s
        step_max_link.append(max(link_step.values(), default=0))
        for r in range(w):
            for p in step.compute[r]:
                if p not in held[r]:
                    raise ScheduleError(f"{where}, rank {r}: computes on {p} it does not hold")
                if computed[(r, p)]:
                    raise ScheduleError(f"{where}, rank {r}: computes {p} a second time")
                computed[(r, p)] += 1
                if not needs(r, p):
                    empty += 1
                acc[r][p][r] += 1
                last_use[(r, p)] = s
        for t in step.transfers:
            held[t.dst][t.piece] = s  # receive buffer exists from the start of step s
        for t, contrib in in_flight_grads:
            acc[t.dst][t.piece].update(contrib)
    for r in range(w):
        for o in range(w):
            for part in range(len(plen)):
                p = PieceId(o, part)
                if needs(r, p) and not computed[(r, p)]:
                    raise ScheduleError(
                        f"{schedule.name}: rank {r} never computes {p}, which its queries attend to"
                    )
    for r in range(w):
        for p, contrib in acc[r].items():
            if p.owner != r and contrib:
                raise ScheduleError(
                    f"{schedule.name}: rank {r} is left holding dK/dV of {p} "
                    f"(from ranks {sorted(contrib)})"
                )
    for o in range(w):
        for part in range(len(plen)):
            p = PieceId(o, part)
            want = Counter({r: 1 for r in range(w) if computed[(r, p)]})
            if acc[o].get(p, Counter()) != want:
                raise ScheduleError(
                    f"{schedule.name}: dK/dV of {p} reaches its owner from "
                    f"{dict(acc[o].get(p, {}))}, expected once from {sorted(want)}"
                )
    peak = []
    allowed = math.ceil(schedule.buffer_budget * len(plen) - 1e-9) * max(plen, default=0)
    for r in range(w):
        live = [0] * (len(schedule.steps) + 1)
        for p, s0 in held[r].items():
            if p.owner == r:
                continue
            s1 = last_use.get((r, p), s0)
            for s in range(s0, s1 + 1):  # allocated when its transfer starts (step s0)
                live[s] += plen[p.part]
        peak.append(max(live, default=0))
        if peak[-1] > allowed:
            raise ScheduleError(
                f"{schedule.name}: rank {r} holds {peak[-1]} received KV tokens "
                f"at once, over its budget of {schedule.buffer_budget} x "
                f"{local_len} ({allowed} tokens in whole pieces)"
            )
    redundant = sum(1 for r in range(w) for p in held[r] if p.owner != r and (r, p) not in last_use)
    if schedule.meta.get("zero_redundancy"):
        _prove_zero_redundancy(schedule, needs, computed, last_use, held)
    return ScheduleReport(
        steps=len(schedule.steps),
        sent_tokens=sent,
        recv_tokens=recv,
        grad_sent_tokens=gsent,
        link_tokens=dict(links),
        peak_buffer_tokens=peak,
        blocks=sum(computed.values()),
        empty_blocks=empty,
        redundant_transfers=redundant,
        per_step_max_link_tokens=step_max_link,
    )


def _prove_zero_redundancy(schedule: Schedule, needs: Needs, computed, last_use, held) -> None:
    """A zero-redundancy schedule delivers a piece only to a rank that computes on it
    (its queries need it) or forwards it, and (with ``meta["node_size"]``) lets each
    piece enter each other node once."""
    w = schedule.world_size
    for r in range(w):
        for p in held[r]:
            if p.owner == r:
                continue
            if not (computed[(r, p)] or (r, p) in last_use):
                raise ScheduleError(
                    f"{schedule.name}: rank {r} receives {p} and neither computes on it "
                    "nor forwards it (not zero-redundancy)"
                )
            if computed[(r, p)] and not needs(r, p):
                raise ScheduleError(
                    f"{schedule.name}: rank {r} receives {p} but none of its queries "
                    "attend to it (not zero-redundancy)"
                )
    k = schedule.meta.get("node_size")
    if k:
        entered: Counter = Counter()
        for step in schedule.steps:
            for t in step.transfers:
                if t.src // k != t.dst // k:
                    entered[(t.dst // k, t.piece)] += 1
        twice = [key for key, n in entered.items() if n > 1]
        if twice:
            node, p = twice[0]
            raise ScheduleError(
                f"{schedule.name}: {p} enters node {node} {entered[twice[0]]} times "
                "(hierarchical transfers must cross once per node)"
            )


def verify_backward(schedule: Schedule, needs: Needs) -> None:
    """Check a schedule's own backward (``backward_steps``): blocks run on held pieces
    (own, kept from the forward, or received earlier in the backward), each needed
    block exactly once, KV sent only by holders, and every dK/dV contribution home
    exactly once. Raises ScheduleError naming the step, rank and piece."""
    if schedule.backward_steps is None:
        return
    w = schedule.world_size
    n_parts = len(schedule.parts)
    held = [{PieceId(r, p) for p in range(n_parts)} | set(schedule.retain[r]) for r in range(w)]
    acc: list[dict[PieceId, Counter]] = [defaultdict(Counter) for _ in range(w)]
    done: Counter = Counter()
    for s, step in enumerate(schedule.backward_steps):
        where = f"{schedule.name} backward step {s}"
        flying = []
        for t in step.grad_transfers:
            if t.src == t.piece.owner or not acc[t.src].get(t.piece):
                raise ScheduleError(
                    f"{where}, rank {t.src}: sends a dK/dV accumulator of "
                    f"{t.piece} it must not or does not have"
                )
            flying.append((t, acc[t.src].pop(t.piece)))
        for t in step.transfers:
            if t.piece not in held[t.src]:
                raise ScheduleError(f"{where}, rank {t.src}: sends {t.piece} it does not hold")
        for r in range(w):
            for p in step.compute[r]:
                if p not in held[r]:
                    raise ScheduleError(f"{where}, rank {r}: computes on {p} it does not hold")
                if done[(r, p)]:
                    raise ScheduleError(f"{where}, rank {r}: computes {p} a second time")
                done[(r, p)] += 1
                acc[r][p][r] += 1
        for t in step.transfers:
            held[t.dst].add(t.piece)
        for t, contrib in flying:
            acc[t.dst][t.piece].update(contrib)
    for r in range(w):
        for o in range(w):
            for part in range(n_parts):
                p = PieceId(o, part)
                if needs(r, p) and not done[(r, p)]:
                    raise ScheduleError(f"{schedule.name} backward: rank {r} never computes {p}")
                if o != r and acc[r].get(p):
                    raise ScheduleError(
                        f"{schedule.name} backward: rank {r} is left holding dK/dV of {p}"
                    )
    for o in range(w):
        for part in range(n_parts):
            p = PieceId(o, part)
            want = Counter({r: 1 for r in range(w) if done[(r, p)]})
            if acc[o].get(p, Counter()) != want:
                raise ScheduleError(
                    f"{schedule.name} backward: dK/dV of {p} reaches its owner "
                    f"from {dict(acc[o].get(p, {}))}, expected {sorted(want)}"
                )
