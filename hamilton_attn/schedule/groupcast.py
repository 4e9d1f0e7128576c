"""``groupcast``: zero-redundancy KV transfers for any mask.

Every rank's KV is cut into pieces (by default one per dispatch chunk). A piece goes
straight from its owner to exactly the ranks whose queries attend to some key of it,
and to nobody else; the partial dK/dV come back the same way (summed in float32 by
the owner). The pieces are spread over ``degree`` stages: step 0 computes the local
blocks while stage 0 moves, step i computes what stage i-1 brought while stage i
moves, so each stage's transfer overlaps the previous stage's compute.

With ``node_size`` (ranks ``[k*node_size, (k+1)*node_size)`` form node k) a piece
crosses to another node once: it goes to one rank of that node that needs it (a
*relay*, chosen to spread the load), which forwards it inside its node in the next
stage; dK/dV come back along the same tree, summed at the relay, so they too cross
the node boundary once per node.

The routing depends on the mask, so the plan passes ``needs(rank, piece)`` and
``cost(rank, piece)`` (the block's area). The verifier then proves zero redundancy:
``meta["zero_redundancy"]`` makes it reject any piece delivered to a rank that
neither computes on it nor forwards it, and (hierarchical) any piece entering a
node twice.
"""

from __future__ import annotations

from collections.abc import Callable

from .ir import PieceId, Routing, Transfer
from .registry import schedule

# Default cost model for degree=None, per token of KV moved and per (q, k) pair
# computed, for a model whose heads x head_dim = 4096 in bf16 on an NVLink H100/H200
# node (GPU_FACTS.md: ~600 TF/s attention forward, ~150 GB/s per direction per link
# after protocol overhead), plus a fixed cost per stage (launches, NCCL latency).
SEC_PER_PAIR = 4 * 4096 / 600e12
SEC_PER_TOKEN = 2 * 4096 * 2 / 150e9
SEC_PER_STAGE = 30e-6
MAX_DEGREE = 8


def _stage_of_pieces(
    w: int, n_parts: int, degree: int, dsts: dict[PieceId, list[int]]
) -> dict[PieceId, int]:
    """Per owner, spread its pieces over the stages so that every stage sends about the
    same number of tokens-times-destinations (largest first, to the lightest stage)."""
    stage: dict[PieceId, int] = {}
    for o in range(w):
        load = [0] * degree
        mine = sorted(
            (PieceId(o, p) for p in range(n_parts) if dsts.get(PieceId(o, p))),
            key=lambda p: (-len(dsts[p]), p.part),
        )
        for p in mine:
            s = load.index(min(load))  # the lightest stage, the first of equals
            stage[p] = s
            load[s] += len(dsts[p])
    return stage


def predicted_time(
    w: int,
    n_parts: int,
    part_tokens: int,
    degree: int,
    dsts: dict[PieceId, list[int]],
    cost: Callable[[int, PieceId], float],
) -> float:
    """The cost model's time for ``degree`` stages: per step, the slowest rank's
    max(compute of the stage it holds, transfer of the stage in flight)."""
    own, sent = _block_costs(w, n_parts, dsts, cost)
    return _predicted_time(w, n_parts, part_tokens, degree, dsts, own, sent)


def _block_costs(w, n_parts, dsts, cost):
    """What every degree's prediction reads: each rank's own blocks' compute, and per
    piece its receivers' compute, ``(receiver, seconds)`` in ``dsts`` order."""
    own = [sum(cost(r, PieceId(r, p)) for p in range(n_parts)) * SEC_PER_PAIR for r in range(w)]
    sent = {p: [(d, cost(d, p) * SEC_PER_PAIR) for d in ds] for p, ds in dsts.items()}
    return own, sent


def _predicted_time(w, n_parts, part_tokens, degree, dsts, own, sent) -> float:
    stage = _stage_of_pieces(w, n_parts, degree, dsts)
    comp = [[0.0] * w for _ in range(degree + 1)]
    comm = [[0.0] * w for _ in range(degree + 1)]
    comp[0] = list(own)
    tok = part_tokens * SEC_PER_TOKEN
    for p, s in stage.items():
        cs, ms = comp[s + 1], comm[s]
        o = p.owner
        for d, c in sent[p]:
            cs[d] += c
            ms[d] += tok
            ms[o] += tok
    total = 0.0
    for s in range(degree + 1):
        total += max(max(comp[s][r], comm[s][r]) for r in range(w)) + SEC_PER_STAGE
    return total


@schedule(budget=None, demo=("minheap", "zigzag", "balanced_zigzag"))
def groupcast(
    world_size: int,
    local_len: int,
    *,
    chunk: int | None = None,
    degree: int | None = None,
    node_size: int | None = None,
    needs: Callable[[int, PieceId], bool] | None = None,
    cost: Callable[[int, PieceId], float] | None = None,
) -> Routing:
    """Args: ``chunk`` tokens per piece (default: the whole local shard; the plan
    passes the dispatch's chunk size), ``degree`` stages (None: the cost model picks
    1..8), ``node_size`` ranks per node (None: one node). ``needs`` defaults to
    "every rank needs every piece" (then groupcast is an all-to-all)."""
    w = world_size
    chunk = local_len if not chunk else chunk
    if chunk < 1 or local_len % chunk:
        raise ValueError(f"chunk: expected a positive divisor of {local_len}, got {chunk}")
    n_parts = max(1, local_len // chunk)
    parts = tuple(((i * chunk, (i + 1) * chunk),) for i in range(n_parts))
    if node_size is not None and (node_size < 1 or w % node_size):
        raise ValueError(f"node_size: expected a positive divisor of {w}, got {node_size}")
    if degree is not None and (not isinstance(degree, int) or degree < 1):
        raise ValueError(f"degree: expected a positive int or None, got {degree!r}")
    needs = needs or (lambda r, p: True)
    cost = cost or (lambda r, p: float(chunk * chunk))
    dsts = {
        PieceId(o, p): [d for d in range(w) if d != o and needs(d, PieceId(o, p))]
        for o in range(w)
        for p in range(n_parts)
    }
    if degree is None:
        # Every degree reads the same blocks' costs: work them out once.
        own, sent = _block_costs(w, n_parts, dsts, cost)
        top = max(1, min(MAX_DEGREE, n_parts))
        degree = min(
            range(1, top + 1),
            key=lambda g: (_predicted_time(w, n_parts, chunk, g, dsts, own, sent), g),
        )
    degree = max(1, min(degree, n_parts))
    stage = _stage_of_pieces(w, n_parts, degree, dsts)
    hops = 2 if node_size and node_size < w else 1
    steps: list[list[Transfer]] = [[] for _ in range(degree + hops - 1)]
    relay_load = [0] * w
    for p, s in sorted(stage.items(), key=lambda kv: (kv[1], kv[0])):
        if hops == 1:
            steps[s] += [Transfer(p, p.owner, d) for d in dsts[p]]
            continue
        home = p.owner // node_size
        by_node: dict[int, list[int]] = {}
        for d in dsts[p]:
            by_node.setdefault(d // node_size, []).append(d)
        for node, ds in sorted(by_node.items()):
            if node == home:
                steps[s] += [Transfer(p, p.owner, d) for d in ds]
                continue
            relay = min(ds, key=lambda d: (relay_load[d], d))
            relay_load[relay] += 1
            steps[s].append(Transfer(p, p.owner, relay))
            steps[s + 1] += [Transfer(p, relay, d) for d in ds if d != relay]
    # Peak received KV held at once (a piece arrives for step s+1, is freed after its
    # last use): declared as the budget, in local shards; the verifier re-counts it.
    # One pass over the transfers, each counted for its receiver and its sender (not
    # W passes, one per rank: 4M visits at W = 64).
    arrive: list[dict[PieceId, int]] = [{} for _ in range(w)]
    last: list[dict[PieceId, int]] = [{} for _ in range(w)]
    for s, ts in enumerate(steps):
        for t in ts:
            p = t.piece
            arrive[t.dst][p] = s
            last[t.dst].setdefault(p, s + 1)
            if p.owner != t.src:
                last_src = last[t.src]
                last_src[p] = max(last_src.get(p, 0), s)
    peak = 0
    for r in range(w):
        live = [0] * (len(steps) + 2)
        last_r = last[r]
        for p, s0 in arrive[r].items():
            for s in range(s0, last_r[p] + 1):
                live[s] += chunk
        peak = max(peak, max(live))
    return Routing(
        "groupcast",
        w,
        parts,
        tuple(tuple(ts) for ts in steps),
        grad_route="reverse" if hops == 2 else "direct",
        buffer_budget=max(peak / local_len, 1.0 / n_parts),
        comm="p2p",
        meta={"zero_redundancy": True, "degree": degree, "node_size": node_size},
    )
