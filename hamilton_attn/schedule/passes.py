"""Turn a builder's Routing into a Schedule: attach compute, prune, route gradients.

``needs(rank, piece) -> bool`` says whether the block of ``rank``'s queries against
``piece`` has any visible pair under the plan's mask.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace

from .ir import PieceId, Routing, Schedule, Step, Transfer, new_transfer

Needs = Callable[[int, PieceId], bool]


def need_sets(needs: Needs, world_size: int, n_parts: int) -> list[set[PieceId]]:
    """Per rank, the pieces ``needs`` says it needs: from ``needs.per_rank()`` where the
    callable offers it (the plan's does, from one sweep), else asked piece by piece."""
    bulk = getattr(needs, "per_rank", None)
    if bulk is not None:
        return bulk()
    pieces = [PieceId(o, p) for o in range(world_size) for p in range(n_parts)]
    return [{p for p in pieces if needs(r, p)} for r in range(world_size)]


def _compute_steps(routing: Routing, need: list[set[PieceId]]) -> list[dict[PieceId, int]]:
    """Per rank, the step at which it computes each piece it needs: where the piece
    first arrives (step 0 for its own)."""
    n_parts = len(routing.parts)
    at: list[dict[PieceId, int]] = [
        {p: 0 for p in (PieceId(o, q) for q in range(n_parts)) if p in need[o]}
        for o in range(routing.world_size)
    ]
    for s, transfers in enumerate(routing.steps):
        for t in transfers:
            dst, p = t[2], t[0]
            if p in need[dst]:
                at[dst].setdefault(p, s + 1)
    return at


def prune(
    routing: Routing, needs: Needs, need: list[set[PieceId]] | None = None
) -> tuple[tuple[Transfer, ...], ...]:
    """Drop transfers whose piece is never used downstream of the receiver. ``need``:
    :func:`need_sets` of ``needs`` where the caller has them."""
    if need is None:
        need = need_sets(needs, routing.world_size, len(routing.parts))
    # [rank] -> pieces it forwards usefully later (per rank, not (rank, piece) keys:
    # hamilton and direct route some 254K transfers at W = 64).
    useful: list[set[PieceId]] = [set() for _ in range(routing.world_size)]
    kept: list[tuple[Transfer, ...]] = []
    for transfers in reversed(routing.steps):
        keep = [t for t in transfers if t.piece in useful[t.dst] or t.piece in need[t.dst]]
        # A rank that forwards a useful piece needs to hold it: mark earlier deliveries.
        for t in keep:
            useful[t.src].add(t.piece)
        kept.append(tuple(keep))
    return tuple(reversed(kept))


def _route_grads(
    routing: Routing, steps: list[list[Transfer]], compute_step: list[dict[PieceId, int]]
) -> list[list[Transfer]]:
    """Grad transfers per step for the routing's ``grad_route``; ``compute_step[r][p]``:
    the step at which rank r computes piece p."""
    w = routing.world_size
    grads: dict[int, list[Transfer]] = {}
    mode = routing.grad_route
    if mode == "direct":
        # Straight home after the compute. Visiting ranks in order and each rank's
        # pieces in order appends every step's list already in (src, dst, piece) order
        # (dst is the piece's owner), so no sort is needed.
        for r in range(w):
            for p, s in sorted(compute_step[r].items()):
                if r != p.owner:
                    grads.setdefault(s + 1, []).append(new_transfer((p, r, p.owner)))
        n = max([len(steps)] + [s + 1 for s in grads])
        return [grads.get(s, []) for s in range(n)]
    if mode not in ("follow", "reverse"):
        raise ValueError(f"grad_route: expected follow, direct or reverse, got {mode!r}")
    # [rank] -> piece -> the rank it came from (the last transfer's).
    parent: list[dict[PieceId, int]] = [{} for _ in range(w)]
    if mode == "follow":
        # The accumulator trails the KV one step behind along single-child chains, and
        # goes home from the chain's end (a ring's or cycle's last hop is the owner's
        # neighbour). A rank sends after its own compute and after its parent's
        # accumulator has arrived. Received pieces are visited by compute step, in the
        # order first received within one step (a stable sort, done by buckets filled
        # while the transfers are read). ``child[r][p]``: the one rank r sent p to, -1
        # when it sent p to several (one pass, no per-piece lists: hamilton routes
        # W^3 transfers).
        child: list[dict[PieceId, int]] = [{} for _ in range(w)]
        buckets: dict[int, list[tuple[int, PieceId]]] = {}
        for transfers in steps:
            for p, src, dst in transfers:  # Transfers are tuples: unpacked
                par = parent[dst]
                if p not in par:
                    c = compute_step[dst].get(p)
                    if c is not None:
                        bucket = buckets.get(c)
                        if bucket is None:
                            buckets[c] = [(dst, p)]
                        else:
                            bucket.append((dst, p))
                par[p] = src
                ch = child[src]
                ch[p] = -1 if p in ch else dst
        send_at: list[dict[PieceId, int]] = [{} for _ in range(w)]
        for c in sorted(buckets):
            t0 = c + 1
            for r, p in buckets[c]:
                t = t0
                par = parent[r][p]
                if par != p.owner and child[par].get(p, -1) >= 0:
                    before = send_at[par].get(p)
                    if before is not None and before >= t:
                        t = before + 1
                send_at[r][p] = t
        for r in range(w):
            child_r = child[r]
            for p, t in send_at[r].items():
                c = child_r.get(p, -1)
                dst = c if c >= 0 and p in send_at[c] else p.owner
                bucket = grads.get(t)
                if bucket is None:
                    grads[t] = [new_transfer((p, r, dst))]
                else:
                    bucket.append(new_transfer((p, r, dst)))
    else:
        # Back along the path the KV came: leaves first, each rank after all its
        # children. ``first`` lists the (rank, piece) keys in the order they were first
        # received; ``children[r][p]``: the ranks r sent p to, in transfer order.
        children: list[dict[PieceId, list[int]]] = [{} for _ in range(w)]
        first: list[tuple[int, PieceId]] = []
        for transfers in steps:
            for p, src, dst in transfers:
                par = parent[dst]
                if p not in par:
                    first.append((dst, p))
                par[p] = src
                children[src].setdefault(p, []).append(dst)
        send_at = [{} for _ in range(w)]

        def when(r: int, p: PieceId) -> int:
            got = send_at[r].get(p)
            if got is not None:
                return got
            t = compute_step[r].get(p, -1) + 1
            for c in children[r].get(p, []):
                t = max(t, when(c, p) + 1)
            send_at[r][p] = t
            return t

        for r, p in first:
            t = when(r, p)
            grads.setdefault(t, []).append(Transfer(p, r, parent[r][p]))
    n = max([len(steps)] + [s + 1 for s in grads])
    return [sorted(grads.get(s, []), key=_transfer_order) for s in range(n)]


# ``(src, dst, piece)`` order: a C key (Transfer and PieceId are tuples, compared in
# C), not a Python function called for each of the W^3 grad transfers of hamilton.
_transfer_order = operator.itemgetter(1, 2, 0)


def finalize(routing: Routing, needs: Needs, *, meta: dict | None = None) -> Schedule:
    """Attach compute where each needed piece first arrives, prune, route gradients."""
    w = routing.world_size
    need = need_sets(needs, w, len(routing.parts))
    pruned = Routing(
        routing.name,
        w,
        routing.parts,
        prune(routing, needs, need),
        routing.grad_route,
        routing.buffer_budget,
        routing.comm,
        routing.meta,
    )
    compute_step = _compute_steps(pruned, need)
    steps_t = [list(t) for t in pruned.steps]
    last = max((s for cs in compute_step for s in cs.values()), default=-1)
    n_compute = max(len(steps_t) + 1, last + 1)
    steps_t += [[] for _ in range(n_compute - len(steps_t))]
    grads = _route_grads(pruned, steps_t, compute_step)
    n = max(len(steps_t), len(grads))
    compute = [[[] for _ in range(w)] for _ in range(n)]
    for r in range(w):
        for p, s in compute_step[r].items():
            compute[s][r].append(p)
    for per_rank in compute:  # a rank's blocks of a step in piece order
        for c in per_rank:
            if len(c) > 1:
                c.sort()
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
                transfers=tuple(sorted(kv.get(j, []), key=_transfer_order)),
                grad_transfers=tuple(sorted(grads.get(j, []), key=_transfer_order)),
            )
        )
    return replace(
        schedule, backward_steps=tuple(steps), retain=tuple(tuple(sorted(r)) for r in retain)
    )
