"""Predict a schedule's step times, link use and memory on a :class:`Cluster` (pure Python).

Model (times in seconds, bytes in bytes):

* **Compute** of a step on a rank: for each block it runs, ``4 * B * H * D * area / rate``
  (``area``: visible (query, key) pairs of the block; rate from :class:`DeviceModel`,
  the dense rate when the block's bounding box is all visible, else the masked rate),
  plus the merge of its partial output into the accumulator (every block after the
  rank's first: ``rows * B * H * D / merge_rate``, rows of the block's bounding box).
  Backward: ``2.5x`` the flops at the backward rate, plus a per-block fp32
  accumulation cost (``rows * B * H * D / bwd_block_rate``).
* **Transfer** of a step: every Transfer is routed over the cluster
  (:meth:`Cluster.route`); bytes add up per resource; the step's transfer time is
  ``max over resources of bytes / (bandwidth * efficiency(bytes / messages)) + latency``.
* **Pass time** (exact path): each rank has its own timeline, as in the executor, which
  starts step s's transfers when the rank starts step s and waits for them at its end
  (a step waits on nothing else, so ranks drift apart by up to a step): rank r ends
  step s at ``max(start_r + compute_r, max over its step-s transfers of
  max(start_src, start_dst) + flow time)`` (:func:`drift_total`; flow time: the slowest
  resource of the transfer's route, with all the step's bytes on it). The pass ends
  when the last rank does. Each :class:`StepCost` still holds the lock-step figures
  (``max(max over ranks of compute, transfer)``, an upper bound), which the fast path
  sums.
* Backward re-runs the steps with the same KV transfers plus the dK/dV accumulators
  (float32) of ``Step.grad_transfers``; trailing grad-only steps are exposed.
* **Memory** per device: local q, k, v, out (dtype), lse (fp32), the fp32 output
  accumulator, and the peak received KV buffers (from the verifier's report).

Two paths:

* *exact* (small W, any mask): builds the routing, finalizes it against the mask's
  block areas, verifies it, and costs every step. Block areas of ``full`` and
  ``causal`` masks come from a closed form over the placement's ranges (O(1) per
  range pair), other masks from :meth:`Mask.gather`. Cost: O(transfers + blocks),
  i.e. O(W^2) for ring/allgather and O(W^3) for hamilton/direct.
* *fast* (large W, ``full``/``causal`` only): the schedules are symmetric, so a step is
  described by one traffic pattern (shift, all-to-all, intra-node all-to-all plus one
  inter-node arc) and a per-rank compute that assumes the mask's remote work is spread
  evenly over the steps (exact for ring on full/causal-zigzag). Transfers are not
  pruned (an upper bound where the mask makes pieces useless). Cost: O(W * hops) per
  distinct pattern (all-to-all on switch and full-mesh clusters in O(1), on
  line/torus O(W^2 * hops) up to W = 128, a bisection estimate beyond), plus O(W)
  for the steps: 1024 devices in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ..schedule import spec_of
from .closed_form import _fast
from .cluster import Cluster, parse_topology
from .model import (
    EMPTY,
    BlockStat,
    DeviceModel,
    Prediction,
    Shapes,
    StepCost,
    fused_rates,
    memory_per_device,
)
from .transfers import flow_times, transfer_time

__all__ = [
    "BlockStat",
    "DeviceModel",
    "Prediction",
    "Shapes",
    "StepCost",
    "auto_schedule",
    "block_stat_closed",
    "choose_schedule",
    "compare",
    "drift_total",
    "memory_per_device",
    "predict_schedule",
    "simulate",
    "tokens_to_hide",
    "transfer_time",
]
# -- block areas of full / causal masks (closed form) ---------------------------------


def _causal_pairs(qa: int, qb: int, ka: int, kb: int) -> int:
    """Pairs i in [qa, qb), j in [ka, kb) with j <= i."""
    if qa >= qb or ka >= kb:
        return 0
    n = 0
    lo, hi = max(qa, ka), min(qb, kb)  # rows that see part of the range: i - ka + 1 each
    if lo < hi:
        n += (hi - lo) * (lo - ka + 1 + hi - ka) // 2
    lo = max(qa, kb)  # rows that see the whole range
    if lo < qb:
        n += (qb - lo) * (kb - ka)
    return n


def block_stat_closed(
    kind: str,
    q_ranges: Sequence[tuple[int, int]],
    k_ranges: Sequence[tuple[int, int]],
    seqlen: int,
) -> BlockStat:
    """Block statistics of a ``full`` or ``causal`` mask over ``seqlen`` tokens for rows
    ``q_ranges`` against keys ``k_ranges`` (global ranges; positions >= seqlen are
    padding and see nothing). O(len(q_ranges) * len(k_ranges))."""
    qr = [(a, min(b, seqlen)) for a, b in q_ranges if a < min(b, seqlen)]
    kr = [(a, min(b, seqlen)) for a, b in k_ranges if a < min(b, seqlen)]
    if not qr or not kr:
        return EMPTY
    if kind == "full":
        rows = sum(b - a for a, b in qr)
        cols = sum(b - a for a, b in kr)
        return BlockStat(rows * cols, rows, cols)
    area = sum(_causal_pairs(qa, qb, ka, kb) for qa, qb in qr for ka, kb in kr)
    if area == 0:
        return EMPTY
    # Bounding box in local (concatenated) coordinates, as Plan.block trims it.
    kmin = min(a for a, _ in kr)
    qmax = max(b for _, b in qr)
    r0 = r1 = None
    off = 0
    for a, b in qr:
        lo = max(a, kmin)
        if lo < b:
            r0 = off + lo - a if r0 is None else r0
            r1 = off + b - a
        off += b - a
    c0 = c1 = None
    off = 0
    for a, b in kr:
        hi = min(b, qmax)
        if a < hi:
            c0 = off if c0 is None else c0
            c1 = off + hi - a
        off += b - a
    return BlockStat(area, r1 - r0, c1 - c0)


def _block_stat_mask(mask, q_ranges, k_ranges) -> BlockStat:
    m = mask.gather(q_ranges, k_ranges)
    if m.is_empty():
        return EMPTY
    rows = max(b.q1 for b in m.bands) - min(b.q0 for b in m.bands)
    cols = max(b.k1 for b in m.bands) - min(b.k0 for b in m.bands)
    bands = tuple((b.area(), b.q1 - b.q0) for b in m.bands)
    return BlockStat(m.area(), rows, cols, bands)


# -- transfer cost --------------------------------------------------------------------


def step_rates(dev: DeviceModel, stats) -> tuple[float, float]:
    """Forward and backward TF/s of one step's kernel call over blocks ``stats``: a lone
    block at the dense or masked rate, several joined into one call at the fused rate of
    their bands (:func:`fused_rates`)."""
    if len(stats) > 1:
        bands = [b for st in stats for b in (st.bands or ((st.area, st.rows),))]
        return fused_rates(dev, bands)
    if stats[0].dense:
        return dev.fwd_tflops_full, dev.bwd_tflops_full
    return dev.fwd_tflops_masked, dev.bwd_tflops_masked


def predict_schedule(
    schedule,
    cluster: Cluster,
    block_stat: Callable[[int, object], BlockStat],
    *,
    local_len: int,
    shapes: Shapes | None = None,
    device: DeviceModel | None = None,
    report=None,
    seqlen: int = 0,
    mask_name: str = "?",
) -> Prediction:
    """Cost a finalized :class:`~hamilton_attn.schedule.Schedule`.

    ``block_stat(rank, piece)`` gives each computed block's area and box; ``report``
    (a ScheduleReport) supplies peak buffers (else ``buffer_budget`` shards)."""
    shapes = shapes or Shapes()
    dev = device or DeviceModel()
    w = schedule.world_size
    if cluster.num_devices != w:
        raise ValueError(
            f"topology: {cluster.name} has {cluster.num_devices} devices, the schedule {w}"
        )
    plen = [schedule.part_len(p) for p in range(len(schedule.parts))]
    timeline_f, timeline_b = [], []  # per step: (compute per rank, flows, flow times)
    kvb, gb = shapes.kv_bytes_per_token, shapes.grad_bytes_per_token
    n_fwd = len(schedule.forward_steps())
    started = [False] * w
    loads: dict[int, float] = {}
    steps = []

    def call(r, pieces):
        """``(rows, flops, fwd rate, bwd rate)`` of rank r's call on ``pieces``: the
        executor runs a step's pieces as ONE kernel call (Plan.fused_block): one launch,
        one merge, at the rate of that call's shape."""
        stats = [block_stat(r, p) for p in pieces]
        rf, rb = step_rates(dev, stats)
        return (
            max(st.rows for st in stats),
            shapes.flops_per_pair * sum(st.area for st in stats),
            rf,
            rb,
        )

    def bwd_compute(r, pieces) -> float:
        rows, fl, _, rb = call(r, pieces)
        return (dev.bwd_flops_factor * fl / (rb * 1e12) + dev.block_overhead_s
                + rows * shapes.row_elems / dev.bwd_block_elems_per_s)  # fmt: skip

    def flows(step):
        kv = [(t.src, t.dst, plen[t.piece.part] * kvb) for t in step.transfers]
        return kv, [(t.src, t.dst, plen[t.piece.part] * gb) for t in step.grad_transfers]

    for s, step in enumerate(schedule.steps):
        comp = [0.0] * w
        bcomp = [0.0] * w
        kern = [0.0] * w
        for r in range(w):
            pieces = step.compute[r]
            if not pieces:
                continue
            rows, fl, rf, _ = call(r, pieces)
            comp[r] += fl / (rf * 1e12) + dev.block_overhead_s
            kern[r] += fl / (rf * 1e12)
            if started[r]:
                comp[r] += rows * shapes.row_elems / dev.merge_elems_per_s
            started[r] = True
            bcomp[r] = bwd_compute(r, pieces)
        kv, gr = flows(step)
        times_kv, mx = flow_times(cluster, kv, loads if s < n_fwd else None)
        times_bwd, _ = flow_times(cluster, kv + gr)
        t_kv, t_bwd = max(times_kv, default=0.0), max(times_bwd, default=0.0)
        if s < n_fwd:
            timeline_f.append((comp, kv, times_kv))
        timeline_b.append((bcomp, kv + gr, times_bwd))
        steps.append(
            StepCost(max(comp), t_kv, max(bcomp), t_bwd, mx, s < n_fwd, kernel_s=max(kern))
        )
    if schedule.backward_steps is not None:  # its own (reversed) backward runs instead
        timeline_b = []
        for step in schedule.backward_steps:
            bcomp = [bwd_compute(r, p) if p else 0.0 for r, p in enumerate(step.compute)]
            kv, gr = flows(step)
            timeline_b.append((bcomp, kv + gr, flow_times(cluster, kv + gr)[0]))
    if report is not None:
        peak_tokens = max(report.peak_buffer_tokens, default=0)
    else:
        peak_tokens = schedule.buffer_budget * local_len
    return Prediction(
        schedule.name,
        cluster.name,
        w,
        seqlen,
        mask_name,
        steps,
        {cluster.resources[r].name: b for r, b in loads.items()},
        memory_per_device(local_len, shapes, peak_tokens),
        exact=True,
        drift=(
            drift_total(w, timeline_f),
            drift_total(w, timeline_b),
            max((sum(c[r] for c, _, _ in timeline_f) for r in range(w)), default=0.0),
        ),
    )


def drift_total(w: int, steps) -> float:
    """A pass's time with a timeline per rank: ``steps`` lists per step ``(compute
    [W] s, flows [(src, dst, bytes)], flow times [s])``. A rank starts step s when it
    has ended step s - 1 and ends it when its compute is done and each of its step-s
    flows is, a flow being done its time after the later of its two ends started."""
    start = [0.0] * w
    for comp, flows, times in steps:
        end = [start[r] + comp[r] for r in range(w)]
        for (src, dst, _), t in zip(flows, times, strict=True):
            done = max(start[src], start[dst]) + t
            end[src] = max(end[src], done)
            end[dst] = max(end[dst], done)
        start = end
    return max(start, default=0.0)


class _StatBlocks:
    """The cost model's answers about blocks, for :func:`.pipeline.verified_schedule`:
    each block's :class:`BlockStat` (from the closed form of ``kind`` or from a padded
    mask), a block needed iff its area is positive."""

    def __init__(self, stat, placement, parts):
        self._stat, self.placement = stat, placement
        self.cut(parts)

    def cut(self, parts) -> None:
        self.parts = parts
        self._cache: dict = {}

    def block_stat(self, r, p) -> BlockStat:
        key = (r, p)
        hit = self._cache.get(key)
        if hit is None:
            kr = self.placement.local_to_global(p.owner, self.parts[p.part])
            hit = self._cache[key] = self._stat(self.placement.rank_ranges[r], kr)
        return hit

    def needs(self, r, p) -> bool:
        return self.block_stat(r, p).area > 0

    def cost(self, r, p) -> float:
        return float(self.block_stat(r, p).area)

    def as_needs(self):
        return self.needs


def _exact(name, cluster, seqlen, mask, dispatch, shapes, dev, options) -> Prediction:
    from ..masks import Mask
    from ..placement import make_placement
    from .pipeline import verified_schedule

    w = cluster.num_devices
    # The dispatch by token counts alone (balanced kinds unweighted), as predicted.
    placement = make_placement(dispatch, seqlen, w)
    if isinstance(mask, str):
        kind = mask

        def stat(q, k):
            return block_stat_closed(kind, q, k, seqlen)

        mask_name = mask
    else:
        padded = Mask(mask.bands, placement.padded_len, placement.padded_len, _canonical=True)

        def stat(q, k):
            return _block_stat_mask(padded, q, k)

        mask_name = "custom"
    made = verified_schedule(
        name, placement, options, lambda parts: _StatBlocks(stat, placement, parts)
    )
    sched, report, block_stat = made.schedule, made.report, made.blocks.block_stat
    pred = predict_schedule(
        sched,
        cluster,
        block_stat,
        local_len=placement.local_len,
        shapes=shapes,
        device=dev,
        report=report,
        seqlen=seqlen,
        mask_name=mask_name,
    )
    pred.meta.update(dispatch=dispatch, report=report, schedule_obj=sched)
    return pred


# -- entry points ---------------------------------------------------------------------

#: Transfers above which simulate() switches from the exact path to the closed form.
EXACT_MAX_TRANSFERS = 40_000


def simulate(
    schedule: str,
    topology: str | Cluster,
    seqlen: int,
    *,
    mask="causal",
    dispatch: str = "auto",
    shapes: Shapes | None = None,
    device: DeviceModel | None = None,
    exact: bool | None = None,
    **options,
) -> Prediction:
    """Predict ``schedule`` on ``topology`` for ``seqlen`` tokens in all.

    ``mask`` is ``"full"``, ``"causal"`` or a :class:`~hamilton_attn.masks.Mask` (exact
    path only). ``dispatch`` ``auto``: contiguous for full, zigzag otherwise.
    ``exact`` None picks the exact path when the schedule has at most
    ``EXACT_MAX_TRANSFERS`` transfers (W <= ~34 for hamilton, ~140 for ring), else
    the closed form (2..1024 devices in well under a second)."""
    cluster = parse_topology(topology)
    shapes = shapes or Shapes()
    dev = device or DeviceModel()
    w = cluster.num_devices
    spec = spec_of(schedule)
    if spec.node_size and "node_size" not in options:
        if cluster.node_size is None:
            raise ValueError(f"{schedule}: needs a nodes:UxM topology, got {cluster.name}")
        options["node_size"] = cluster.node_size
    mask_kind = mask if isinstance(mask, str) else ("full" if mask.is_full() else "custom")
    if dispatch == "auto":
        dispatch = "contiguous" if mask_kind == "full" else "zigzag"
    if exact is None:
        exact = (
            not isinstance(mask, str)
            or spec.transfers(w, options.get("node_size")) <= EXACT_MAX_TRANSFERS
        )
    if w == 1:
        exact = True
    if exact:
        return _exact(schedule, cluster, seqlen, mask, dispatch, shapes, dev, options)
    if dispatch not in ("zigzag", "contiguous"):
        raise ValueError("dispatch: the closed form models zigzag (causal) / contiguous (full)")
    return _fast(schedule, cluster, seqlen, mask_kind, shapes, dev, options)


DEFAULT_CANDIDATES = ("ring", "bidi_ring", "allgather", "hamilton", "direct", "hamilton_2level")


def split_name(name: str) -> tuple[str, int]:
    """``(schedule, ulysses degree)`` of a candidate name: ``ring``, ``ulysses`` (degree
    0: all ranks) or a hybrid ``ring+ulysses2``."""
    if name == "ulysses":
        return "ulysses", 0
    base, plus, tail = name.partition("+ulysses")
    if plus and tail.isdigit():
        return base, int(tail)
    return name, 1


def simulate_any(name: str, topology, seqlen: int, **kw) -> Prediction:
    """:func:`simulate`, or :func:`.heads_cost.simulate_heads` for ``ulysses`` and
    hybrids named ``S+ulyssesU``."""
    base, degree = split_name(name)
    if degree == 1:
        return simulate(base, topology, seqlen, **kw)
    from .heads_cost import simulate_heads

    return simulate_heads(base, topology, seqlen, degree, **kw)


def compare(
    candidates: Iterable[str] | None,
    topology: str | Cluster,
    seqlen: int,
    *,
    objective: str = "fwd_bwd",
    heads: bool = True,
    **kw,
) -> list[tuple[str, Prediction | None, str]]:
    """Simulate every candidate: ``(name, prediction or None, why not)`` per candidate.
    By default (``candidates`` None) the context-parallel schedules and, with ``heads``,
    Ulysses and every hybrid whose degree divides W and the shapes' heads."""
    cluster = parse_topology(topology)
    names = list(candidates) if candidates else list(DEFAULT_CANDIDATES)
    if cluster.kind == "line" and candidates is None:
        names.append("line")
    if candidates is None and heads:
        from .heads_cost import head_candidates

        shapes = kw.get("shapes") or Shapes()
        base = [n for n in ("ring", "hamilton", "allgather") if n in names]
        names += [
            s if s == "ulysses" else f"{s}+ulysses{u}"
            for s, u in head_candidates(cluster.num_devices, shapes.heads, base)
        ]
    out = []
    for n in names:
        try:
            out.append((n, simulate_any(n, cluster, seqlen, **kw), ""))
        except (ValueError, NotImplementedError) as e:
            out.append((n, None, str(e).splitlines()[0]))
    return out


def choose_schedule(
    candidates: Iterable[str] | None,
    topology: str | Cluster,
    seqlen: int,
    *,
    objective: str = "fwd_bwd",
    max_mem_bytes: float | None = None,
    **kw,
) -> Prediction:
    """The candidate with the least predicted time (``objective``: ``fwd`` or
    ``fwd_bwd``) among those that fit in ``max_mem_bytes`` per device (default: the
    device model's memory)."""
    rows = compare(candidates, topology, seqlen, **kw)
    dev = kw.get("device") or DeviceModel()
    cap = dev.memory_bytes if max_mem_bytes is None else max_mem_bytes
    ok = [p for _, p, _ in rows if p is not None and p.peak_mem_bytes <= cap]
    if not ok:
        ok = [p for _, p, _ in rows if p is not None]
    if not ok:
        raise ValueError(f"schedule: no candidate runs on {parse_topology(topology).name}")
    key = (lambda p: p.fwd_s) if objective == "fwd" else (lambda p: p.fwd_bwd_s)
    return min(ok, key=key)


def auto_schedule(
    mask,
    world_size: int,
    topology: str | Cluster | None = None,
    *,
    shapes: Shapes | None = None,
    device: DeviceModel | None = None,
    candidates: Iterable[str] | None = None,
    objective: str = "fwd_bwd",
) -> str:
    """The schedule name ``plans.plan(schedule="auto")`` could use for ``mask`` (a Mask,
    or ``"full"`` / ``"causal"``) on ``world_size`` devices. ``topology`` None means
    one NVSwitch node (``nvswitch:W``). Masks other than full are costed as causal
    when W is too large for the exact path."""
    cluster = parse_topology(topology or f"nvswitch:{world_size}")
    if cluster.num_devices != world_size:
        raise ValueError(
            f"topology: {cluster.name} has {cluster.num_devices} devices, not {world_size}"
        )
    if world_size == 1:
        return "ring"
    if isinstance(mask, str):
        seqlen, m = 0, mask
    else:
        seqlen = mask.seqlen_q
        m = mask
        if (
            not mask.is_full()
            and spec_of("hamilton").transfers(world_size, None) > EXACT_MAX_TRANSFERS
        ):
            m = "causal"
        elif mask.is_full():
            m = "full"
    if not seqlen:
        seqlen = 128 * 1024 * world_size  # a typical long-context length per device
    best = choose_schedule(
        candidates,
        cluster,
        seqlen,
        mask=m,
        shapes=shapes,
        device=device,
        objective=objective,
        heads=shapes is not None,  # head parallelism only where the heads are known
    )
    return best.schedule


def tokens_to_hide(
    schedule: str,
    topology: str | Cluster,
    *,
    mask="causal",
    lo: int = 1024,
    hi: int = 1 << 24,
    **kw,
) -> int | None:
    """Smallest tokens per device in ``[lo, hi]`` (bisected to 1%) at which the forward's
    transfers hide behind the attention kernels (transfer time not covered by the
    kernels alone <= 5% of the kernels' time: merges and launch overheads are not
    counted as cover, so a schedule does not "hide" by being slow); None if never."""
    w = parse_topology(topology).num_devices

    def hidden(tpd: int) -> bool:
        p = simulate(schedule, topology, tpd * w, mask=mask, **kw)
        return p.kernel_exposed_s <= 0.05 * p.kernel_s

    if not hidden(hi):
        return None
    if hidden(lo):
        return lo
    a, b = lo, hi
    while b - a > max(a // 100, 1):
        mid = (a + b) // 2
        a, b = (a, mid) if hidden(mid) else (mid, b)
    return b
