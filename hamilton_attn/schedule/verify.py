"""Prove a schedule correct before any communication, and count what it moves."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .ir import PieceId, Schedule, Transfer
from .passes import Needs, need_sets


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


class _Recheck(Exception):
    """The fast check met something it does not name: rerun the exact check."""


def verify(schedule: Schedule, needs: Needs, *, local_len: int) -> ScheduleReport:
    """Check ``schedule`` against the blocks the mask needs; raise ScheduleError naming
    the step, rank and piece of the first violation.

    Checks: transfers send only held pieces to other ranks that do not already hold
    them; every block with a visible pair is computed exactly once, on a held piece;
    every dK/dV contribution reaches its owner exactly once and no accumulator is left
    behind; forward KV buffers stay within ``schedule.buffer_budget`` local shards,
    counted in whole pieces (``ceil(budget * parts)`` of the largest part), so uneven
    splits of a shard do not trip it.

    The checks run in bulk first (:func:`_verify_fast`); anything that check does not
    pass is checked again block by block (:func:`_verify_exact`), which raises the
    error naming the first violation.
    """
    try:
        return _verify_fast(schedule, needs, local_len=local_len)
    except Exception:  # any violation (or odd input): the exact check names it
        return _verify_exact(schedule, needs, local_len=local_len)


def _verify_fast(schedule: Schedule, needs: Needs, *, local_len: int) -> ScheduleReport:
    """:func:`verify`'s checks, with the per-block work done in C set and Counter
    operations; raises (_Recheck or anything else) on any violation, never returns a
    report the exact check would not.

    Each (rank, piece) block is computed once (else it rechecks), so each dK/dV
    contribution is one unit that moves whole with its accumulator: a tally of ranks
    is then a count, and "reaches its owner once from each rank that computed it" is
    "no non-owner is left with a nonzero count and the owner's count is the number of
    ranks that computed the piece"."""
    w = schedule.world_size
    plen, need, held = _start(schedule, needs, local_len, _Recheck)
    # avail[r]: the pieces r may compute on or send in the current step (its own and
    # those that arrived in earlier steps).
    avail: list[set[PieceId]] = [set(h) for h in held]
    computed: list[set[PieceId]] = [set() for _ in range(w)]
    last_use: list[dict[PieceId, int]] = [{} for _ in range(w)]
    gsent = [0] * w
    links_i: dict[int, int] = {}
    step_max_link = []
    acc: list[Counter] = [Counter() for _ in range(w)]  # [rank] -> piece -> contributions
    ranks = range(w)  # ``x in ranks``: one C test of 0 <= x < w for an int
    for s, step in enumerate(schedule.steps):
        compute = step.compute
        if len(compute) != w:
            raise _Recheck
        in_flight_grads = []
        for piece, src, dst in step.grad_transfers:
            if src == piece[0]:  # piece[0]: its owner (PieceId is a tuple)
                raise _Recheck
            n = acc[src].pop(piece, 0)
            if not n:
                raise _Recheck
            in_flight_grads.append((dst, piece, n))
            gsent[src] += plen[piece[1]]
        link_step: dict[int, int] = {}
        arrived = []
        for piece, src, dst in step.transfers:
            if src == dst or src not in ranks or dst not in ranks:
                raise _Recheck
            if piece not in avail[src]:
                raise _Recheck
            hd = held[dst]
            if piece in hd:
                raise _Recheck
            hd[piece] = s
            arrived.append((dst, piece))
            k = src * w + dst
            link_step[k] = link_step.get(k, 0) + plen[piece[1]]
            last_use[src][piece] = s
        _add_links(links_i, link_step, step_max_link)
        for r in range(w):
            pieces_r = compute[r]
            if not pieces_r:
                continue
            if not avail[r].issuperset(pieces_r):
                raise _Recheck
            done_r = computed[r]
            n0 = len(done_r)
            done_r.update(pieces_r)
            if len(done_r) != n0 + len(pieces_r):  # computed before, or twice in a step
                raise _Recheck
            acc[r].update(pieces_r)
            last_use[r].update(dict.fromkeys(pieces_r, s))
        for dst, piece in arrived:
            avail[dst].add(piece)
        for dst, piece, n in in_flight_grads:
            a = acc[dst]
            a[piece] = a.get(piece, 0) + n
    links, sent, recv = _link_totals(links_i, w)
    pieces = schedule.pieces
    empty = 0
    for r in range(w):
        done_r, need_r = computed[r], need[r]
        if not need_r <= done_r:
            raise _Recheck
        empty += len(done_r) - len(need_r)
    for r in range(w):
        for p, n in acc[r].items():
            if p.owner != r and n:
                raise _Recheck
    n_computed: Counter = Counter()
    for r in range(w):
        n_computed.update(computed[r])
    for p in pieces:
        if acc[p.owner].get(p, 0) != n_computed.get(p, 0):
            raise _Recheck
    state = (need, computed, held, last_use, plen)
    return _finish(
        schedule, local_len, state, (sent, recv, gsent, links, step_max_link, empty), _Recheck
    )


def _verify_exact(schedule: Schedule, needs: Needs, *, local_len: int) -> ScheduleReport:
    """:func:`verify`, block by block: names the first violation."""
    w = schedule.world_size
    # Per-rank structures keyed by piece (no (rank, piece) tuples: hamilton and direct
    # check some 254K transfers and blocks at W = 64, and a tuple key is built and
    # hashed at every lookup). held[r][p]: the step p arrived (0 for its own pieces);
    # written as each transfer is checked, so "held before step s" reads
    # ``hs is not None and (hs < s or p is r's own)``.
    plen, need, held = _start(schedule, needs, local_len, ScheduleError)
    computed: list[set[PieceId]] = [set() for _ in range(w)]  # blocks computed (each once)
    last_use: list[dict[PieceId, int]] = [{} for _ in range(w)]
    gsent = [0] * w
    links_i: dict[int, int] = {}  # src * w + dst -> tokens, in order of first use
    step_max_link = []
    # [rank] -> piece -> {contributing rank: count}: plain dicts, not Counters (a
    # Counter per block, W^3 of them for hamilton, cost more than the rest of the check).
    acc: list[dict[PieceId, dict[int, int]]] = [{} for _ in range(w)]
    for s, step in enumerate(schedule.steps):
        compute = step.compute
        if len(compute) != w:
            raise ScheduleError(f"step {s}: compute lists {len(compute)} ranks, expected {w}")
        # dK/dV accumulators leave with what their sender summed before this step.
        in_flight_grads = []
        for piece, src, dst in step.grad_transfers:  # Transfers are tuples: unpacked
            if src == piece.owner:
                raise ScheduleError(
                    f"{schedule.name} step {s}, rank {src}: sends the gradient of its own {piece}"
                )
            a = acc[src]
            if not a.get(piece):
                raise ScheduleError(
                    f"{schedule.name} step {s}, rank {src}: sends an empty dK/dV accumulator "
                    f"of {piece} to rank {dst}"
                )
            in_flight_grads.append((dst, piece, a.pop(piece)))
            gsent[src] += plen[piece.part]
        link_step: dict[int, int] = {}
        for piece, src, dst in step.transfers:
            if not (0 <= src < w and 0 <= dst < w) or src == dst:
                t = Transfer(piece, src, dst)
                raise ScheduleError(f"{schedule.name} step {s}: transfer {t} has a bad endpoint")
            hs = held[src].get(piece)
            if hs is None or (hs == s and piece.owner != src):
                raise ScheduleError(
                    f"{schedule.name} step {s}, rank {src}: sends {piece} it does not hold"
                )
            hd = held[dst]
            if piece in hd:  # held before, or received earlier in this step
                raise ScheduleError(
                    f"{schedule.name} step {s}, rank {dst}: receives {piece} it already holds "
                    "(redundant transfer)"
                )
            hd[piece] = s  # receive buffer exists from the start of step s
            n = plen[piece.part]
            k = src * w + dst  # sent and received tokens are summed from the links below
            link_step[k] = link_step.get(k, 0) + n
            last_use[src][piece] = s
        _add_links(links_i, link_step, step_max_link)
        for r, pieces_r in enumerate(compute):
            if not pieces_r:
                continue
            held_r, done_r, acc_r, use_r = held[r], computed[r], acc[r], last_use[r]
            for p in pieces_r:
                hs = held_r.get(p)
                if hs is None or (hs == s and p.owner != r):
                    raise ScheduleError(
                        f"{schedule.name} step {s}, rank {r}: computes on {p} it does not hold"
                    )
                if p in done_r:
                    raise ScheduleError(
                        f"{schedule.name} step {s}, rank {r}: computes {p} a second time"
                    )
                done_r.add(p)
                tally = acc_r.get(p)
                if tally is None:
                    acc_r[p] = {r: 1}
                else:
                    tally[r] = tally.get(r, 0) + 1
                use_r[p] = s
        for dst, piece, contrib in in_flight_grads:
            _add_tally(acc[dst], piece, contrib)
    links, sent, recv = _link_totals(links_i, w)
    pieces = schedule.pieces  # built once: W^2 x parts checks follow
    empty = 0  # computed blocks no query of the rank attends to
    for r in range(w):
        done_r, need_r = computed[r], need[r]
        missing = need_r - done_r
        if missing:
            raise ScheduleError(
                f"{schedule.name}: rank {r} never computes {min(missing)}, which its "
                "queries attend to"
            )
        empty += len(done_r) - len(need_r)  # need_r is inside done_r
    for r in range(w):
        for p, contrib in acc[r].items():
            if p.owner != r and contrib:
                raise ScheduleError(
                    f"{schedule.name}: rank {r} is left holding dK/dV of {p} "
                    f"(from ranks {sorted(contrib)})"
                )
    # Who computed each piece, from the computed blocks rather than W ranks per piece.
    computed_by: dict[PieceId, dict[int, int]] = defaultdict(dict)
    for r in range(w):
        for p in computed[r]:
            computed_by[p][r] = 1
    for p in pieces:
        want = computed_by.get(p, {})
        if acc[p.owner].get(p, {}) != want:
            raise ScheduleError(
                f"{schedule.name}: dK/dV of {p} reaches its owner from "
                f"{dict(acc[p.owner].get(p, {}))}, expected once from {sorted(want)}"
            )
    state = (need, computed, held, last_use, plen)
    return _finish(
        schedule, local_len, state, (sent, recv, gsent, links, step_max_link, empty), ScheduleError
    )


def _start(schedule: Schedule, needs: Needs, local_len: int, error):
    """Both checks' start: each part's length (the parts must cut the local tokens
    exactly once, else ``error``), the pieces each rank needs, and ``held[r][p]``: the
    step p reached r, 0 for r's own pieces (filled in as transfers are checked)."""
    plen = [schedule.part_len(p) for p in range(len(schedule.parts))]
    covered = sorted(i for rr in schedule.parts for a, b in rr for i in range(a, b))
    if covered != list(range(local_len)):
        raise error(
            f"{schedule.name}: parts {schedule.parts} do not cut the "
            f"{local_len} local tokens exactly once"
        )
    w, n_parts = schedule.world_size, len(plen)
    need = need_sets(needs, w, n_parts)  # [rank] -> pieces its queries attend to
    held = [{PieceId(r, p): 0 for p in range(n_parts)} for r in range(w)]
    return plen, need, held


def _add_links(links_i: dict[int, int], link_step: dict[int, int], step_max: list) -> None:
    """Add one step's tokens per link to the totals, and record its busiest link."""
    for k, n in link_step.items():
        links_i[k] = links_i.get(k, 0) + n
    step_max.append(max(link_step.values(), default=0))


def _link_totals(links_i: dict[int, int], w: int):
    """Tokens per link ``(src, dst)`` from ``src * w + dst`` keys, and each rank's sent
    and received totals."""
    links, sent, recv = {}, [0] * w, [0] * w
    for k, n in links_i.items():
        src, dst = divmod(k, w)
        links[(src, dst)] = n
        sent[src] += n
        recv[dst] += n
    return links, sent, recv


def _finish(schedule, local_len, state, counts, error) -> ScheduleReport:
    """Both checks' tail: each rank's peak of received KV against its budget (raising
    ``error``), redundancy, the zero-redundancy proof where claimed, and the report.
    ``state``: (needed pieces, computed blocks, arrivals, last uses, part lengths) per
    rank; ``counts``: (sent, received, gradient tokens sent, link tokens, each step's
    busiest link, empty blocks)."""
    need, computed, held, last_use, plen = state
    sent, recv, gsent, links, step_max_link, empty = counts
    w = schedule.world_size
    n_steps = len(schedule.steps)
    peak = []
    redundant = 0  # received pieces never used (computed on or sent on)
    allowed = math.ceil(schedule.buffer_budget * len(plen) - 1e-9) * max(plen, default=0)
    for r in range(w):
        # A received piece is live from the step its transfer starts (s0, when its
        # buffer is allocated) to its last use: a difference array, then a prefix sum.
        delta = [0] * (n_steps + 2)
        use_r = last_use[r]
        for p, s0 in held[r].items():
            if p[0] == r:  # its own piece
                continue
            s1 = use_r.get(p)
            if s1 is None:
                redundant += 1
                s1 = s0
            if s1 >= s0:
                n = plen[p[1]]
                delta[s0] += n
                delta[s1 + 1] -= n
        live = list(itertools.accumulate(delta[: n_steps + 1]))
        peak.append(max(live, default=0))
        if peak[-1] > allowed:
            raise error(
                f"{schedule.name}: rank {r} holds {peak[-1]} received KV tokens "
                f"at once, over its budget of {schedule.buffer_budget} x "
                f"{local_len} ({allowed} tokens in whole pieces)"
            )
    if schedule.meta.get("zero_redundancy"):
        _prove_zero_redundancy(schedule, need, computed, last_use, held)
    return ScheduleReport(
        steps=n_steps,
        sent_tokens=sent,
        recv_tokens=recv,
        grad_sent_tokens=gsent,
        link_tokens=links,
        peak_buffer_tokens=peak,
        blocks=sum(len(c) for c in computed),
        empty_blocks=empty,
        redundant_transfers=redundant,
        per_step_max_link_tokens=step_max_link,
    )


def _add_tally(acc: dict, piece: PieceId, contrib: dict) -> None:
    """Add an arriving dK/dV tally (popped from its sender, so owned) to ``acc[piece]``,
    merging the smaller into the larger: an accumulator trailing its piece round a
    cycle gains one rank per hop, and copying the whole tally at every hop made the
    check O(W^4) for hamilton."""
    mine = acc.get(piece)
    if mine is None:
        acc[piece] = contrib
        return
    if len(mine) < len(contrib):
        mine, contrib = contrib, mine
        acc[piece] = mine
    for r, n in contrib.items():
        mine[r] = mine.get(r, 0) + n


def _prove_zero_redundancy(schedule: Schedule, need, computed, last_use, held) -> None:
    """``need``, ``computed``, ``last_use`` and ``held``: per rank, as :func:`verify`
    keeps them.
    A zero-redundancy schedule delivers a piece only to a rank that computes on it
    (its queries need it) or forwards it, and (with ``meta["node_size"]``) lets each
    piece enter each other node once."""
    w = schedule.world_size
    for r in range(w):
        for p in held[r]:
            if p.owner == r:
                continue
            if not (p in computed[r] or p in last_use[r]):
                raise ScheduleError(
                    f"{schedule.name}: rank {r} receives {p} and neither computes on it "
                    "nor forwards it (not zero-redundancy)"
                )
            if p in computed[r] and p not in need[r]:
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
            _add_tally(acc[t.dst], t.piece, contrib)
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
