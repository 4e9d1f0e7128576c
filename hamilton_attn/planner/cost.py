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
* **Step time** ``max(max over ranks of compute, transfer)``: transfers of step s overlap
  the compute of step s, as in the executor; ranks move in lockstep.
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

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .cluster import Cluster, parse_topology

# -- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Attention shapes. ``kv_heads`` None means equal to ``heads`` (no GQA)."""

    batch: int = 1
    heads: int = 32
    kv_heads: int | None = None
    head_dim: int = 128
    dtype_bytes: int = 2  # bf16

    @property
    def kvh(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all heads, in the input dtype."""
        return 2 * self.batch * self.kvh * self.head_dim * self.dtype_bytes

    @property
    def grad_bytes_per_token(self) -> int:
        """dK and dV accumulators of one token (float32)."""
        return 2 * self.batch * self.kvh * self.head_dim * 4

    @property
    def flops_per_pair(self) -> int:
        """Forward flops of one visible (query, key) pair: QK^T and PV, 2 flops each."""
        return 4 * self.batch * self.heads * self.head_dim

    @property
    def row_elems(self) -> int:
        """Output elements of one query row (what a merge reads and writes)."""
        return self.batch * self.heads * self.head_dim


@dataclass(frozen=True)
class DeviceModel:
    """Per-device compute rates. Defaults: one H200, cuDNN SDPA, bf16 (GPU_FACTS.md)."""

    name: str = "H200 cuDNN"
    #: forward TF/s on a dense block (cuDNN, 32K full: 619; 8K full: 678).
    fwd_tflops_full: float = 620.0
    #: forward TF/s on a block with a masked part (cuDNN, 32K causal: 595).
    fwd_tflops_masked: float = 595.0
    #: backward TF/s counted as 2.5x the forward flops (32K full 550, causal 545).
    bwd_tflops_full: float = 550.0
    bwd_tflops_masked: float = 545.0
    #: eager merge of two partials: 16K x 32 x 128 in 0.685 ms -> 9.8e10 elements/s.
    merge_elems_per_s: float = 9.8e10
    #: backward fp32 dQ/dK/dV accumulation per block, fitted to the 2 x H200 ring trace
    #: (benchmarks/results/trace_ring_H200_summary.txt: ~1.45 ms per 16K-row block).
    bwd_block_elems_per_s: float = 4.6e10
    #: fixed cost per block (kernel launches, slicing).
    block_overhead_s: float = 20e-6
    #: device memory (H200: 141 GB).
    memory_bytes: float = 141e9
    #: backward flops / forward flops (the usual FlashAttention count).
    bwd_flops_factor: float = 2.5


@dataclass(frozen=True)
class BlockStat:
    """One (rank, piece) block: visible pairs and its bounding box (rows x cols)."""

    area: int
    rows: int
    cols: int

    @property
    def dense(self) -> bool:
        return self.area == self.rows * self.cols


EMPTY = BlockStat(0, 0, 0)

# -- outputs --------------------------------------------------------------------------


@dataclass
class StepCost:
    """One step: forward and backward compute / transfer / overlapped time (s)."""

    compute_s: float
    transfer_s: float
    bwd_compute_s: float
    bwd_transfer_s: float
    max_link_bytes: float  # forward KV bytes on the busiest resource in this step
    forward: bool = True  # False: a backward-only step (trailing grads)
    repeat: int = 1  # identical consecutive steps folded into one (fast path)
    kernel_s: float = 0.0  # the attention kernels alone (compute_s less merges, overheads)

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.transfer_s) if self.forward else 0.0

    @property
    def bwd_time_s(self) -> float:
        return max(self.bwd_compute_s, self.bwd_transfer_s)


@dataclass
class Prediction:
    """What :func:`simulate` predicts for one schedule on one cluster."""

    schedule: str
    topology: str
    world_size: int
    seqlen: int
    mask: str
    steps: list[StepCost]
    link_bytes: dict[str, float]  # resource name -> forward KV bytes over the whole pass
    peak_mem_bytes: float  # per device, forward
    exact: bool  # built and verified the schedule (True) or closed form (False)
    notes: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def fwd_s(self) -> float:
        return sum(s.time_s * s.repeat for s in self.steps)

    @property
    def bwd_s(self) -> float:
        return sum(s.bwd_time_s * s.repeat for s in self.steps)

    @property
    def fwd_bwd_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def num_steps(self) -> int:
        return sum(s.repeat for s in self.steps)

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s * s.repeat for s in self.steps if s.forward)

    @property
    def transfer_s(self) -> float:
        return sum(s.transfer_s * s.repeat for s in self.steps if s.forward)

    @property
    def exposed_s(self) -> float:
        """Forward time not hidden behind compute."""
        return self.fwd_s - self.compute_s

    @property
    def kernel_s(self) -> float:
        """Forward attention-kernel time alone (no merges, no per-block overheads)."""
        return sum(s.kernel_s * s.repeat for s in self.steps if s.forward)

    @property
    def kernel_exposed_s(self) -> float:
        """Forward transfer time not hidden behind the attention kernels alone."""
        return sum(
            (max(s.kernel_s, s.transfer_s) - s.kernel_s) * s.repeat for s in self.steps if s.forward
        )

    @property
    def max_step_transfer_s(self) -> float:
        return max((s.transfer_s for s in self.steps if s.forward), default=0.0)

    @property
    def busiest_link_bytes(self) -> float:
        return max(self.link_bytes.values(), default=0.0)

    @property
    def busiest_link(self) -> str:
        return max(self.link_bytes, key=self.link_bytes.get) if self.link_bytes else "-"

    def row(self) -> dict:
        return {
            "schedule": self.schedule,
            "topology": self.topology,
            "W": self.world_size,
            "seqlen": self.seqlen,
            "fwd_ms": self.fwd_s * 1e3,
            "fwd_bwd_ms": self.fwd_bwd_s * 1e3,
            "busiest_link_GB": self.busiest_link_bytes / 1e9,
            "peak_mem_GB": self.peak_mem_bytes / 1e9,
            "exact": self.exact,
        }


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
    return BlockStat(m.area(), rows, cols)


# -- transfer cost --------------------------------------------------------------------


def transfer_time(
    cluster: Cluster, flows: Iterable[tuple[int, int, float]], loads: dict | None = None
) -> tuple[float, float]:
    """Time (s) of one step's transfers ``(src, dst, bytes)`` and the busiest resource's
    bytes. ``loads`` (resource index -> bytes), if given, is added to."""
    acc: dict[int, float] = defaultdict(float)
    msgs: dict[int, int] = defaultdict(int)
    for s, d, b in flows:
        for r in cluster.route(s, d):
            acc[r] += b
            msgs[r] += 1
    return _time_of_loads(cluster, acc, msgs, loads)


def _time_of_loads(cluster, acc, msgs, loads=None) -> tuple[float, float]:
    t = 0.0
    for r, b in acc.items():
        res = cluster.resources[r]
        eff = cluster.efficiency(b / max(msgs[r], 1))
        t = max(t, b / (res.bandwidth * eff) + res.latency)
        if loads is not None:
            loads[r] = loads.get(r, 0.0) + b
    return t, max(acc.values(), default=0.0)


def _alltoall_loads(cluster: Cluster, nbytes: float) -> tuple[dict[int, float], dict[int, int]]:
    """Per-resource bytes and messages when every device sends ``nbytes`` to every other.

    Closed forms on switch / full-mesh clusters (by symmetry one device's resources
    stand for all, so O(1)); explicit routing on line/torus up to W = 128; beyond, a
    bisection estimate on one representative link."""
    w = cluster.num_devices
    acc: dict[int, float] = {}
    msgs: dict[int, int] = {}
    if w < 2:
        return acc, msgs
    if cluster.kind == "nvswitch":
        for r in (cluster.port_out[0], cluster.port_in[0]):
            acc[r], msgs[r] = nbytes * (w - 1), w - 1
    elif cluster.kind == "nodes":
        m = cluster.node_size
        if m > 1:
            for r in (cluster.port_out[0], cluster.port_in[0]):
                acc[r], msgs[r] = nbytes * (m - 1), m - 1
        for r in (cluster.nic_out[0], cluster.nic_in[0]):
            acc[r], msgs[r] = nbytes * (w - m), w - m
    elif cluster.kind == "full_mesh":
        r = cluster.route(0, 1)[0]
        acc[r], msgs[r] = nbytes, 1
    elif w <= 128:
        acc, msgs = defaultdict(float), defaultdict(int)
        for s in range(w):
            for d in range(w):
                if s != d:
                    for r in cluster.route(s, d):
                        acc[r] += nbytes
                        msgs[r] += 1
    else:
        # Bisection estimate: W^2/4 pairs cross the cut of the line's middle link; a
        # torus a x b (a >= b) has 2b links per direction across its cut (wrap-around),
        # each carrying (W/2)^2 / (2b) pairs.
        if cluster.kind == "line":
            pairs = w * w / 4
        else:
            pairs = w * w / 4 / (2 * min(cluster.shape))
        r = cluster.route(0, 1)[0]
        acc[r], msgs[r] = nbytes * pairs, int(pairs)
    return dict(acc), dict(msgs)


# -- exact path -----------------------------------------------------------------------


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
    kvb, gb = shapes.kv_bytes_per_token, shapes.grad_bytes_per_token
    n_fwd = len(schedule.forward_steps())
    started = [False] * w
    loads: dict[int, float] = {}
    steps = []
    for s, step in enumerate(schedule.steps):
        comp = [0.0] * w
        bcomp = [0.0] * w
        kern = [0.0] * w
        for r in range(w):
            for p in step.compute[r]:
                st = block_stat(r, p)
                fl = shapes.flops_per_pair * st.area
                rf = dev.fwd_tflops_full if st.dense else dev.fwd_tflops_masked
                rb = dev.bwd_tflops_full if st.dense else dev.bwd_tflops_masked
                comp[r] += fl / (rf * 1e12) + dev.block_overhead_s
                kern[r] += fl / (rf * 1e12)
                if started[r]:
                    comp[r] += st.rows * shapes.row_elems / dev.merge_elems_per_s
                started[r] = True
                bcomp[r] += dev.bwd_flops_factor * fl / (rb * 1e12) + dev.block_overhead_s
                bcomp[r] += st.rows * shapes.row_elems / dev.bwd_block_elems_per_s
        kv = [(t.src, t.dst, plen[t.piece.part] * kvb) for t in step.transfers]
        gr = [(t.src, t.dst, plen[t.piece.part] * gb) for t in step.grad_transfers]
        t_kv, mx = transfer_time(cluster, kv, loads if s < n_fwd else None)
        t_bwd, _ = transfer_time(cluster, kv + gr)
        steps.append(
            StepCost(max(comp), t_kv, max(bcomp), t_bwd, mx, s < n_fwd, kernel_s=max(kern))
        )
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
    )


def memory_per_device(local_len: int, shapes: Shapes, peak_kv_tokens: float) -> float:
    """Forward bytes per device: local q, k, v, out (dtype), lse and the fp32 output
    accumulator, plus ``peak_kv_tokens`` of received KV."""
    b, h, d, db = shapes.batch, shapes.heads, shapes.head_dim, shapes.dtype_bytes
    q_out = 2 * local_len * b * h * d * db
    kv = local_len * shapes.kv_bytes_per_token
    lse = local_len * b * h * 4
    acc = local_len * b * h * (d + 1) * 4
    return q_out + kv + lse + acc + peak_kv_tokens * shapes.kv_bytes_per_token


def _exact(name, cluster, seqlen, mask, dispatch, shapes, dev, options) -> Prediction:
    from ..masks import Mask
    from ..placement import make_placement
    from ..schedule import build_routing, finalize, verify

    w = cluster.num_devices
    placement = make_placement(dispatch, seqlen, w)
    routing = build_routing(name, w, placement.local_len, **options)
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
    cache: dict = {}

    def block_stat(r, p):
        key = (r, p)
        if key not in cache:
            kr = placement.local_to_global(p.owner, routing.parts[p.part])
            cache[key] = stat(placement.rank_ranges[r], kr)
        return cache[key]

    def needs(r, p):
        return block_stat(r, p).area > 0

    sched = finalize(routing, needs)
    report = verify(sched, needs, local_len=placement.local_len)
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


# -- fast path ------------------------------------------------------------------------


def _fast(name, cluster, seqlen, kind, shapes, dev, options) -> Prediction:
    w = cluster.num_devices
    L = -(-seqlen // w)  # tokens per device (padding ignored)
    kvb, gb = shapes.kv_bytes_per_token, shapes.grad_bytes_per_token
    if kind == "full":
        total, local = L * seqlen, L * L
    elif kind == "causal":  # zigzag: every rank does 1/W of the work, half of its diagonal
        total, local = seqlen * (seqlen + 1) // 2 / w, L * (L + 1) / 2
    else:
        raise ValueError(f"mask: the closed form knows 'full' and 'causal', got {kind!r}")
    remote = max(total - local, 0.0)
    m = cluster.node_size or w
    if name == "hamilton_2level":
        m = options.get("node_size") or cluster.node_size
        if not m or w % m or w // m < 2:
            raise ValueError(f"hamilton_2level: needs a nodes:UxM topology, got {cluster.name}")
    # Per schedule: pieces per shard, blocks computed per step, traffic pattern, and
    # which steps carry it. A pattern is a list of (src, dst, tokens) for all ranks.
    if name == "ring":
        pieces, blocks = 1, 1
        pattern = [(r, (r + 1) % w, L) for r in range(w)]
    elif name == "bidi_ring":
        pieces, blocks = 2, 2
        if w == 2:
            pattern = [(0, 1, L), (1, 0, L)]
        else:
            pattern = [(r, (r + 1) % w, L / 2) for r in range(w)]
            pattern += [(r, (r - 1) % w, L / 2) for r in range(w)]
    elif name == "line":
        pieces, blocks = 1, 2
        pattern = [(r, r + 1, L) for r in range(w - 1)] + [(r + 1, r, L) for r in range(w - 1)]
    elif name in ("hamilton", "direct", "allgather"):
        pieces = 1 if name == "allgather" else w - 1
        blocks = w - 1 if name == "allgather" else pieces
        pattern = None  # all-to-all, closed form
    elif name == "hamilton_2level":
        pieces = blocks = m
        pattern = [(r, (r // m) * m + d, L / m) for r in range(w) for d in range(m) if d != r % m]
        pattern += [(r, (r + m) % w, L / m) for r in range(w)]  # one inter-node arc each
    else:
        raise ValueError(f"schedule: no closed form for {name!r} (use exact=True)")

    def cost(tokens_scale: float, bytes_per_token: float) -> tuple[float, float, dict]:
        loads: dict[int, float] = {}
        if pattern is None:
            acc, msgs = _alltoall_loads(cluster, L / pieces * tokens_scale * bytes_per_token)
            t, mx = _time_of_loads(cluster, acc, msgs, loads)
        else:
            flows = [(s, d, n * tokens_scale * bytes_per_token) for s, d, n in pattern]
            t, mx = transfer_time(cluster, flows, loads)
        return t, mx, loads

    t_kv, mx_kv, loads_kv = cost(1.0, kvb)
    t_g, _, _ = cost(1.0, gb)
    t_kvg, _, _ = cost(1.0, kvb + gb)  # KV and grads share the step's resources

    def comp(n_blocks: int, area: float, rows: float, dense: bool, first: bool):
        fl = shapes.flops_per_pair * area
        rf = dev.fwd_tflops_full if dense else dev.fwd_tflops_masked
        rb = dev.bwd_tflops_full if dense else dev.bwd_tflops_masked
        merges = n_blocks - (1 if first else 0)
        f = fl / (rf * 1e12) + n_blocks * dev.block_overhead_s
        f += merges * rows * shapes.row_elems / dev.merge_elems_per_s
        b = dev.bwd_flops_factor * fl / (rb * 1e12) + n_blocks * dev.block_overhead_s
        b += n_blocks * rows * shapes.row_elems / dev.bwd_block_elems_per_s
        return f, b, fl / (rf * 1e12)

    local_dense = kind == "full"
    f0, b0, k0 = comp(1, local, L, local_dense, True)
    steps: list[StepCost] = []
    if name == "allgather":
        # step 0: everything moves, local block runs; step 1: all remote blocks;
        # step 2: dK/dV go straight home (reduce-scatter), exposed.
        f1, b1, k1 = comp(blocks, remote, L, True, False)
        steps.append(StepCost(f0, t_kv, b0, t_kv, mx_kv, kernel_s=k0))
        steps.append(StepCost(f1, 0.0, b1, 0.0, 0.0, kernel_s=k1))
        steps.append(StepCost(0.0, 0.0, 0.0, t_g, 0.0, forward=False))
        link_scale = 1
    else:
        n_rem = w - 1
        per_block = remote / max(n_rem * blocks, 1)
        steps.append(StepCost(f0, t_kv, b0, t_kv, mx_kv, kernel_s=k0))
        if name == "line":
            # Middle ranks receive from both sides until the waves pass the ends: two
            # blocks per step for the first half of the steps, one after.
            two = n_rem // 2
            f2, b2, k2 = comp(2, 2 * remote / n_rem, L, True, False)
            f1, b1, k1 = comp(1, remote / n_rem, L, True, False)
            groups = [(two, f2, b2, k2), (n_rem - two, f1, b1, k1)]
        else:
            f1, b1, k1 = comp(blocks, per_block * blocks, L, True, False)
            groups = [(n_rem, f1, b1, k1)]
        # Steps 1 .. W-2 move KV and the previous step's grads; step W-1 computes the
        # last blocks (no KV) while grads move; one grad-only step closes backward.
        for i, (count, f, b, k) in enumerate(groups):
            last_group = i == len(groups) - 1
            n_mid = count - 1 if last_group else count
            if n_mid > 0:
                steps.append(StepCost(f, t_kv, b, t_kvg, mx_kv, repeat=n_mid, kernel_s=k))
            if last_group and count > 0:
                steps.append(StepCost(f, 0.0, b, t_g, 0.0, kernel_s=k))
        if w > 1:
            steps.append(StepCost(0.0, 0.0, 0.0, t_g, 0.0, forward=False))
        link_scale = w - 1
    link_bytes = {cluster.resources[r].name: b * link_scale for r, b in loads_kv.items()}
    budget = {"allgather": w - 1, "line": 4.0}.get(name, 2.0)
    return Prediction(
        name,
        cluster.name,
        w,
        seqlen,
        kind,
        steps,
        link_bytes,
        memory_per_device(L, shapes, budget * L),
        exact=False,
        notes="closed form: remote work spread evenly over steps; transfers unpruned",
    )


# -- entry points ---------------------------------------------------------------------

#: Transfers above which simulate() switches from the exact path to the closed form.
EXACT_MAX_TRANSFERS = 40_000


def _n_transfers(name: str, w: int, node_size: int | None) -> int:
    if name in ("hamilton", "direct"):
        return w * (w - 1) ** 2
    if name == "hamilton_2level":
        return w * (node_size or w) * (w - 1)
    return w * (w - 1) * 2


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
    if schedule == "hamilton_2level" and "node_size" not in options:
        if cluster.node_size is None:
            raise ValueError(f"hamilton_2level: needs a nodes:UxM topology, got {cluster.name}")
        options["node_size"] = cluster.node_size
    mask_kind = mask if isinstance(mask, str) else ("full" if mask.is_full() else "custom")
    if dispatch == "auto":
        dispatch = "contiguous" if mask_kind == "full" else "zigzag"
    if exact is None:
        exact = (
            not isinstance(mask, str)
            or _n_transfers(schedule, w, options.get("node_size")) <= EXACT_MAX_TRANSFERS
        )
    if w == 1:
        exact = True
    if exact:
        return _exact(schedule, cluster, seqlen, mask, dispatch, shapes, dev, options)
    if dispatch not in ("zigzag", "contiguous"):
        raise ValueError("dispatch: the closed form models zigzag (causal) / contiguous (full)")
    return _fast(schedule, cluster, seqlen, mask_kind, shapes, dev, options)


DEFAULT_CANDIDATES = ("ring", "bidi_ring", "allgather", "hamilton", "direct", "hamilton_2level")


def compare(
    candidates: Iterable[str] | None,
    topology: str | Cluster,
    seqlen: int,
    *,
    objective: str = "fwd_bwd",
    **kw,
) -> list[tuple[str, Prediction | None, str]]:
    """Simulate every candidate: ``(name, prediction or None, why not)`` per candidate."""
    cluster = parse_topology(topology)
    names = list(candidates) if candidates else list(DEFAULT_CANDIDATES)
    if cluster.kind == "line" and candidates is None:
        names.append("line")
    out = []
    for n in names:
        try:
            out.append((n, simulate(n, cluster, seqlen, **kw), ""))
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
        if not mask.is_full() and _n_transfers("hamilton", world_size, None) > EXACT_MAX_TRANSFERS:
            m = "causal"
        elif mask.is_full():
            m = "full"
    if not seqlen:
        seqlen = 128 * 1024 * world_size  # a typical long-context length per device
    best = choose_schedule(
        candidates, cluster, seqlen, mask=m, shapes=shapes, device=device, objective=objective
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
