"""Pricing the cross-rank state exchange of linear attention: all-gather or ring.

Each rank contributes one state ``[B, H, K, V]`` (and its decay, ``B * H`` numbers) and
needs the prefix combine of all earlier ranks' states.

* ``allgather`` (LASP-2): one all-gather of every rank's state, then each rank folds the
  W states it holds. Every pair of ranks exchanges one state at once: the time is the
  busiest resource of the cluster model (:mod:`hamilton_attn.planner.cluster`) carrying
  all of its pairs' bytes, plus its latency, plus the fold of W states.
* ``ring``: the running state passes rank r -> r + 1, W - 1 hops one after another (a
  rank can only send once it has combined what it received): the sum over hops of one
  state's time on that hop's route, plus one combine per hop.

Both run again in the backward (state gradients flow the other way), so the choice is
the same. On a switch (``nvswitch:N``) the all-gather's busiest port carries the same
W - 1 states as the ring's hops do in sequence, and pays one latency instead of W - 1:
it wins. Where links are shared by many pairs (``line:N``, ``torus2d``) or slow links
carry many pairs (``nodes:UxM``: each device's NIC carries a state to every device of
the other nodes) the ring, which puts one state on one neighbour link at a time, wins
for large states.

The constants below are not measured on our GPUs yet (``benchmarks/`` times the
exchange); the links' bandwidths, latencies and message efficiency are the cluster
model's own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import config
from ..planner.cluster import Cluster, parse_topology

#: Host-side cost of one step of the exchange (posting a p2p batch, launching the
#: combine kernel): paid once by the all-gather and once per hop by the ring.
STEP_OVERHEAD_S = 10e-6
#: Bytes per second of the elementwise state combine on one device (memory-bound: an
#: H200's HBM moves 4.8 TB/s; small elementwise kernels reach about half).
COMBINE_BYTES_PER_S = 2.4e12


@dataclass(frozen=True)
class ExchangeCost:
    """Predicted seconds of one exchange (forward; the backward's is the same)."""

    allgather_s: float
    ring_s: float
    state_bytes: int
    topology: str

    @property
    def best(self) -> str:
        """The cheaper strategy (all-gather on a tie)."""
        return "ring" if self.ring_s < self.allgather_s else "allgather"


def _hop_time(cluster: Cluster, src: int, dst: int, nbytes: float) -> float:
    eff = cluster.efficiency(nbytes)
    res = cluster.resources
    return max(nbytes / (res[i].bandwidth * eff) + res[i].latency for i in cluster.route(src, dst))


@functools.lru_cache(maxsize=256)
def _cost(world_size: int, state_bytes: int, topology: str) -> ExchangeCost:
    cluster = parse_topology(topology)
    if cluster.num_devices != world_size:
        raise ValueError(
            f"topology: {topology!r} has {cluster.num_devices} devices, the plan's group "
            f"{world_size} ranks"
        )
    w, nbytes = world_size, float(state_bytes)
    if w == 1:
        return ExchangeCost(0.0, 0.0, state_bytes, topology)
    load: dict[int, float] = {}
    for src in range(w):
        for dst in range(w):
            if src != dst:
                for i in cluster.route(src, dst):
                    load[i] = load.get(i, 0.0) + nbytes
    eff = cluster.efficiency(nbytes)
    res = cluster.resources
    gather = max(load[i] / (res[i].bandwidth * eff) + res[i].latency for i in load)
    allgather = gather + STEP_OVERHEAD_S + 2 * w * nbytes / COMBINE_BYTES_PER_S
    hops = sum(_hop_time(cluster, r, r + 1, nbytes) for r in range(w - 1))
    ring = hops + (w - 1) * (STEP_OVERHEAD_S + 3 * nbytes / COMBINE_BYTES_PER_S)
    return ExchangeCost(allgather, ring, state_bytes, topology)


def exchange_cost(world_size: int, state_bytes: int, topology: str | None = None) -> ExchangeCost:
    """Both strategies priced for ``world_size`` ranks exchanging ``state_bytes`` each
    (``B * H * K * V`` times the state's element size) on ``topology`` (a preset such
    as ``nvswitch:8``; default ``HAMILTON_ATTN_TOPOLOGY``, else one NVSwitch node)."""
    topology = topology or config.get().topology or f"nvswitch:{world_size}"
    return _cost(int(world_size), int(state_bytes), str(topology))


def choose_strategy(world_size: int, state_bytes: int, topology: str | None = None) -> str:
    """``"allgather"`` or ``"ring"``, whichever :func:`exchange_cost` predicts faster."""
    return exchange_cost(world_size, state_bytes, topology).best
