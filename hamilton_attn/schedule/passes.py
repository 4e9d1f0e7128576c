"""Turn a builder's Routing into a Schedule: attach compute, prune, route gradients.

``needs(rank, piece) -> bool`` says whether the block of ``rank``'s queries against
``piece`` has any visible pair under the plan's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .ir import PieceId, Routing, Schedule, Step, Transfer

Needs = Callable[[int, PieceId], bool]


def _arrivals(routing: Routing) -> dict[tuple[int, PieceId], int]:
    """First step at which each (rank, piece) is held."""
    held: dict[tuple[int, PieceId], int] = {}
    for o in range(routing.world_size):
        for p in range(len(routing.parts)):
            held[(o, PieceId(o, p))] = 0
    for s, transfers in enumerate(routing.steps):
        for t in transfers:
            held.setdefault((t.dst, t.piece), s + 1)
    return held


def prune(routing: Routing, needs: Needs) -> tuple[tuple[Transfer, ...], ...]:
    """Drop transfers whose piece is never used downstream of the receiver."""
    useful_at: dict[tuple[int, PieceId], bool] = {}
    kept: list[tuple[Transfer, ...]] = []
    for transfers in reversed(routing.steps):
        keep = []
        for t in transfers:
            if needs(t.dst, t.piece) or useful_at.get((t.dst, t.piece), False):
                keep.append(t)
        # A rank that forwards a useful piece needs to hold it: mark earlier deliveries.
        for t in keep:
            useful_at[(t.src, t.piece)] = True
        kept.append(tuple(keep))
    return tuple(reversed(kept))


def _route_grads(
    routing: Routing, steps: list[list[Transfer]], compute_step: dict[tuple[int, PieceId], int]
) -> list[list[Transfer]]:
    """Grad transfers per step for the routing's ``grad_route``."""
    parent: dict[tuple[int, PieceId], int] = {}
    children: dict[tuple[int, PieceId], list[int]] = {}
    for transfers in steps:
        for t in transfers:
            parent[(t.dst, t.piece)] = t.src
            children.setdefault((t.src, t.piece), []).append(t.dst)
    holders = sorted(compute_step, key=lambda rp: compute_step[rp])
    grads: dict[int, list[Transfer]] = {}
    mode = routing.grad_route
    if mode == "direct":
        for r, p in holders:
            if r != p.owner:
                grads.setdefault(compute_step[(r, p)] + 1, []).append(Transfer(p, r, p.owner))
    elif mode == "follow":
        # The accumulator trails the KV one step behind along single-child chains, and
        # goes home from the chain's end (a ring's or cycle's last hop is the owner's
        # neighbour). A rank sends after its own compute and after its parent's
        # accumulator has arrived.
        send_at: dict[tuple[int, PieceId], int] = {}
        order = sorted(parent, key=lambda rp: compute_step.get(rp, 0))
        for r, p in order:
            if (r, p) not in compute_step:
                continue
            t = compute_step[(r, p)] + 1
            par = parent[(r, p)]
            if par != p.owner and len(children.get((par, p), [])) == 1 and (par, p) in send_at:
                t = max(t, send_at[(par, p)] + 1)
            send_at[(r, p)] = t
        for (r, p), t in send_at.items():
            kids = [c for c in children.get((r, p), []) if (c, p) in send_at]
            dst = kids[0] if len(kids) == 1 and len(children[(r, p)]) == 1 else p.owner
            grads.setdefault(t, []).append(Transfer(p, r, dst))
    elif mode == "reverse":
        # Back along the path the KV came: leaves first, each rank after all its children.
        send_at = {}

        def when(r: int, p: PieceId) -> int:
            if (r, p) in send_at:
                return send_at[(r, p)]
            t = compute_step.get((r, p), -1) + 1
            for c in children.get((r, p), []):
                t = max(t, when(c, p) + 1)
            send_at[(r, p)] = t
            return t

        for r, p in parent:
            t = when(r, p)
            grads.setdefault(t, []).append(Transfer(p, r, parent[(r, p)]))
    else:
        raise ValueError(f"grad_route: expected follow, direct or reverse, got {mode!r}")
    n = max([len(steps)] + [s + 1 for s in grads])
    return [sorted(grads.get(s, []), key=lambda t: (t.src, t.dst, t.piece)) for s in range(n)]


def finalize(routing: Routing, needs: Needs, *, meta: dict | None = None) -> Schedule:
    """Attach compute where each needed piece first arrives, prune, route gradients."""
    w = routing.world_size
    pruned = Routing(
        routing.name,
        w,
        routing.parts,
        prune(routing, needs),
        routing.grad_route,
        routing.buffer_budget,
        routing.comm,
        routing.meta,
    )
    arrivals = _arrivals(pruned)
    compute_step = {(r, p): s for (r, p), s in arrivals.items() if needs(r, p)}
    steps_t = [list(t) for t in pruned.steps]
    n_compute = max([len(steps_t) + 1] + [s + 1 for s in compute_step.values()])
    steps_t += [[] for _ in range(n_compute - len(steps_t))]
    grads = _route_grads(pruned, steps_t, compute_step)
    n = max(len(steps_t), len(grads))
    compute = [[[] for _ in range(w)] for _ in range(n)]
    for (r, p), s in sorted(compute_step.items(), key=lambda kv: kv[0][1]):
        compute[s][r].append(p)
    steps = []
    for s in range(n):
        steps.append(
            Step(
                compute=tuple(tuple(c) for c in compute[s]),
                transfers=tuple(steps_t[s]) if s < len(steps_t) else (),
                grad_transfers=tuple(grads[s]) if s < len(grads) else (),
            )
        )
    while steps and not (steps[-1].transfers or steps[-1].grad_transfers or any(steps[-1].compute)):
        steps.pop()
    return Schedule(
        routing.name,
        w,
        routing.parts,
        tuple(steps),
        routing.buffer_budget,
        routing.comm,
        routing.grad_route,
        {**routing.meta, **(meta or {})},
    )


def reverse_backward(schedule: Schedule) -> Schedule | None:
    """The same schedule with a time-reversed backward, or None where it does not apply
    (a rank that only forwards a piece).

    Backward step j runs forward step T-1-j's blocks. Each rank keeps the pieces it was
    last to receive (the leaves of each piece's path) from the forward, so step 0 needs
    no transfer; KV flows back along the path it came, one hop ahead of its use; each
    dK/dV accumulator follows one step behind and reaches its owner while the owner
    computes its own block (the last step), so no transfer is left exposed at the end.
    Costs the memory of the kept pieces between forward and backward (ring: one shard).
    """
    fwd = schedule.forward_steps()
    t_n = len(fwd)
    w = schedule.world_size
    compute_at: dict[tuple[int, PieceId], int] = {}
    for t, step in enumerate(fwd):
        for r in range(w):
            for p in step.compute[r]:
                compute_at[(r, p)] = t
    parent: dict[tuple[int, PieceId], int] = {}
    children: dict[tuple[int, PieceId], list[int]] = {}
    for step in fwd:
        for tr in step.transfers:
            parent[(tr.dst, tr.piece)] = tr.src
            children.setdefault((tr.src, tr.piece), []).append(tr.dst)
    if any(key not in compute_at for key in parent):
        return None  # a pure forwarder would need KV it never uses
    need = {key: t_n - 1 - c for key, c in compute_at.items()}  # backward compute step
    kv: dict[int, list[Transfer]] = {}
    retain: list[list[PieceId]] = [[] for _ in range(w)]
    for h, p in parent:
        if not children.get((h, p)):  # last on the piece's path: keep it from the forward
            retain[h].append(p)
    for (u, p), kids in children.items():
        if u == p.owner:
            continue
        first = min(kids, key=lambda k: need[(k, p)])
        kv.setdefault(need[(u, p)] - 1, []).append(Transfer(p, first, u))
    send_at: dict[tuple[int, PieceId], int] = {}

    def when(h: int, p: PieceId) -> int:
        if (h, p) not in send_at:
            t = need[(h, p)] + 1
            for k in children.get((h, p), []):
                t = max(t, when(k, p) + 1)
            send_at[(h, p)] = t
        return send_at[(h, p)]

    grads: dict[int, list[Transfer]] = {}
    for (h, p), u in parent.items():
        grads.setdefault(when(h, p), []).append(Transfer(p, h, u))
    n = max([t_n] + [s + 1 for s in grads] + [s + 1 for s in kv])
    steps = []
    for j in range(n):
        comp = fwd[t_n - 1 - j].compute if j < t_n else tuple(() for _ in range(w))
        steps.append(
            Step(
                compute=comp,
                transfers=tuple(sorted(kv.get(j, []), key=lambda t: (t.src, t.dst, t.piece))),
                grad_transfers=tuple(
                    sorted(grads.get(j, []), key=lambda t: (t.src, t.dst, t.piece))
                ),
            )
        )
    return replace(
        schedule, backward_steps=tuple(steps), retain=tuple(tuple(sorted(r)) for r in retain)
    )
