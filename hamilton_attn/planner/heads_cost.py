"""Pricing head parallelism (Ulysses) and hybrids on a cluster (pure Python).

A hybrid of degree u with schedule S on W devices costs:

* four all-to-alls in the forward (q, k, v in; out back) and four in the backward
  (dout in; dq, dk, dv back), none hidden behind compute (each waits for the last one):
  every device sends ``(u - 1) / u`` of each tensor, a ``1/u`` share to each of the
  other u - 1 members of its head group; the head group is u consecutive devices, so
  on ``nodes:UxM`` with u dividing M it stays inside a node (``_alltoall_loads`` of the
  u-device cluster of the same kind);
* S across the ``W / u`` head groups, on the head shard: the same cost model as any
  schedule (:func:`.cost.simulate`), on a cluster of ``W / u`` devices of the same
  kind, with ``Hq / u`` query heads and ``lcm(Hk, u) / u`` KV heads per device
  (the members of a head group run their context-parallel groups side by side, each
  on links of its own: one port per device on a switch, its own pairs on a full mesh).

``u = W`` is pure Ulysses: S runs on one device (its local block over the whole
sequence), so only the all-to-alls and one device's compute remain.
"""

from __future__ import annotations

import dataclasses

from .cluster import Cluster, parse_topology
from .heads import check_degree, kv_repeat
from .model import Prediction, Shapes, StepCost
from .transfers import _alltoall_loads, _time_of_loads


def _sub_cluster(cluster: Cluster, n: int, consecutive: bool) -> str:
    """The topology of ``n`` of the cluster's devices: a head group (``consecutive``,
    u neighbouring devices) or a context-parallel group (every u-th device)."""
    kind = cluster.kind
    if n == 1:
        return "nvswitch:1"  # one device: no links
    if kind in ("nvswitch", "full_mesh"):
        return f"{kind}:{n}"
    if kind == "nodes":
        nodes, m = cluster.shape
        w = nodes * m
        if consecutive:
            if m % n == 0:
                return f"nvswitch:{n}"  # inside one node
            if n % m == 0:
                return f"nodes:{n // m}x{m}"
        elif m % (w // n) == 0:  # every node holds m / u ranks of the group
            return f"nodes:{nodes}x{m // (w // n)}"
    raise ValueError(
        f"ulysses_degree: head parallelism is priced on nvswitch, full_mesh and nodes "
        f"clusters whose nodes the head groups fit, not on {cluster.name}"
    )


def _alltoall_s(topology: str, nbytes_per_peer: float) -> float:
    cluster = parse_topology(topology)
    acc, msgs = _alltoall_loads(cluster, nbytes_per_peer)
    return _time_of_loads(cluster, acc, msgs)[0] if acc else 0.0


def simulate_heads(
    schedule: str,
    topology: str | Cluster,
    seqlen: int,
    degree: int,
    *,
    shapes: Shapes | None = None,
    **kw,
) -> Prediction:
    """Predict ``schedule`` with ``degree``-way head parallelism (``schedule="ulysses"``:
    degree W) on ``topology``; other arguments as :func:`.cost.simulate`."""
    from .cost import simulate

    cluster = parse_topology(topology)
    shapes = shapes or Shapes()
    w = cluster.num_devices
    u = w if schedule == "ulysses" else check_degree(degree, w)
    if shapes.heads % u:
        raise ValueError(f"ulysses_degree: {u} must divide the {shapes.heads} query heads")
    hk = shapes.kvh * kv_repeat(shapes.kvh, u)  # KV heads after the repeat
    inner_shapes = dataclasses.replace(shapes, heads=shapes.heads // u, kv_heads=hk // u)
    c = w // u
    inner_name = "ring" if schedule == "ulysses" else schedule
    inner = simulate(inner_name, _sub_cluster(cluster, c, False), seqlen, shapes=inner_shapes, **kw)
    # Bytes one device sends each peer of its head group, per all-to-all.
    tokens = seqlen / w
    elem = shapes.batch * shapes.head_dim * shapes.dtype_bytes
    q_part = tokens * shapes.heads / u * elem
    kv_part = tokens * hk / u * elem
    head_topo = _sub_cluster(cluster, u, True)
    t_q, t_kv = _alltoall_s(head_topo, q_part), _alltoall_s(head_topo, kv_part)
    fwd_in, fwd_out = t_q + 2 * t_kv, t_q  # q, k, v in; out back
    bwd_in, bwd_out = t_q, t_q + 2 * t_kv  # dout in; dq, dk, dv back
    a2a = [
        StepCost(0.0, fwd_in, 0.0, bwd_out, (q_part + 2 * kv_part) * (u - 1)),
        StepCost(0.0, fwd_out, 0.0, bwd_in, q_part * (u - 1)),
    ]
    name = "ulysses" if schedule == "ulysses" else f"{schedule}+ulysses{u}"
    drift = inner.drift
    if drift is not None:  # the all-to-alls are exposed: they add to every timeline
        drift = (drift[0] + fwd_in + fwd_out, drift[1] + bwd_in + bwd_out, drift[2])
    return dataclasses.replace(
        inner,
        drift=drift,
        schedule=name,
        topology=cluster.name,
        world_size=w,
        steps=a2a + list(inner.steps),
        notes=(inner.notes + "; " if inner.notes else "")
        + f"heads split {u} ways by all-to-all (exposed), {inner_name} across {c} groups",
        meta={**inner.meta, "ulysses_degree": u, "inner": inner_name},
    )


def head_candidates(world_size: int, heads: int, base: list[str]) -> list[tuple[str, int]]:
    """``(schedule, degree)`` pairs worth pricing: pure Ulysses and every proper hybrid
    (a degree dividing W and the heads) with each of ``base``."""
    out = []
    if world_size > 1 and heads % world_size == 0:
        out.append(("ulysses", world_size))
    for u in range(2, world_size):
        if world_size % u == 0 and heads % u == 0:
            out += [(s, u) for s in base]
    return out
