"""How long one step's transfers take on a :class:`Cluster`: bytes routed over its
resources, each at its bandwidth and message efficiency (pure Python)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .cluster import Cluster


def transfer_time(
    cluster: Cluster, flows: Iterable[tuple[int, int, float]], loads: dict | None = None
) -> tuple[float, float]:
    """Time (s) of one step's transfers ``(src, dst, bytes)`` and the busiest resource's
    bytes. ``loads`` (resource index -> bytes), if given, is added to."""
    times, busiest = flow_times(cluster, list(flows), loads)
    return max(times, default=0.0), busiest


def flow_times(
    cluster: Cluster, flows: list[tuple[int, int, float]], loads: dict | None = None
) -> tuple[list[float], float]:
    """Per flow ``(src, dst, bytes)`` of one step, when it is done after both ends have
    started it: the slowest resource on its route, each carrying all of the step's bytes
    that cross it (the step's flows share bandwidth; the step's time is the max); and
    the busiest resource's bytes. ``loads``, if given, is added to."""
    acc: dict[int, float] = defaultdict(float)
    msgs: dict[int, int] = defaultdict(int)
    routes = [cluster.route(s, d) for s, d, _ in flows]
    for route, (_, _, b) in zip(routes, flows, strict=True):
        for r in route:
            acc[r] += b
            msgs[r] += 1
    res_t = {r: _resource_time(cluster, r, b, msgs[r]) for r, b in acc.items()}
    if loads is not None:
        for r, b in acc.items():
            loads[r] = loads.get(r, 0.0) + b
    times = [max((res_t[r] for r in route), default=0.0) for route in routes]
    return times, max(acc.values(), default=0.0)


def _resource_time(cluster: Cluster, r: int, nbytes: float, n_msgs: int) -> float:
    res = cluster.resources[r]
    return nbytes / (res.bandwidth * cluster.efficiency(nbytes / max(n_msgs, 1))) + res.latency


def _time_of_loads(cluster, acc, msgs, loads=None) -> tuple[float, float]:
    t = 0.0
    for r, b in acc.items():
        t = max(t, _resource_time(cluster, r, b, msgs[r]))
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
