"""The cost model's closed form (large W, ``full`` and ``causal`` masks only): the
schedules are symmetric, so a step is one traffic pattern (each schedule's own, from
its ``closed_form`` beside its builder) and a per-rank compute that assumes the mask's
remote work is spread evenly over the steps (exact for ring on full and causal zigzag).
Transfers are not pruned (an upper bound where the mask makes pieces useless)."""

from __future__ import annotations

from ..schedule import spec_of
from .model import Prediction, StepCost, fused_rates, memory_per_device
from .transfers import _alltoall_loads, _time_of_loads, transfer_time


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
    spec = spec_of(name)
    m = cluster.node_size or w
    if spec.node_size:
        m = options.get("node_size") or cluster.node_size
        if not m or w % m or w // m < 2:
            raise ValueError(f"{name}: needs a nodes:UxM topology, got {cluster.name}")
    if spec.closed_form is None:
        raise ValueError(f"schedule: no closed form for {name!r} (use exact=True)")
    # The schedule's own traffic model (next to its builder): pieces per shard, blocks
    # computed per step, and one step's flows (src, dst, tokens) for all ranks (None:
    # all-to-all, closed form).
    pieces, blocks, pattern = spec.closed_form(w, L, m)

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
        # A step's blocks run as one kernel call (the executor's fused block): one
        # launch and one merge, at the fused rate when it joins several.
        fl = shapes.flops_per_pair * area
        if n_blocks > 1:
            # bands of a chunk's rows: half the rank's for causal zigzag, all for full
            rf, rb = fused_rates(dev, [(area, rows / 2 if kind == "causal" else rows)])
        else:
            rf = dev.fwd_tflops_full if dense else dev.fwd_tflops_masked
            rb = dev.bwd_tflops_full if dense else dev.bwd_tflops_masked
        merges = 0 if first else 1
        f = fl / (rf * 1e12) + dev.block_overhead_s
        f += merges * rows * shapes.row_elems / dev.merge_elems_per_s
        b = dev.bwd_flops_factor * fl / (rb * 1e12) + dev.block_overhead_s
        b += rows * shapes.row_elems / dev.bwd_block_elems_per_s
        return f, b, fl / (rf * 1e12)

    local_dense = kind == "full"
    f0, b0, k0 = comp(1, local, L, local_dense, True)
    steps: list[StepCost] = []
    if spec.steps == "gather":
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
        if spec.steps == "waves":
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
    budget = spec.budget(w) if spec.budget else 2.0
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
