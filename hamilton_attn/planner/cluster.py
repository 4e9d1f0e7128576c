"""A cluster model for the planner: devices, links, shared ports (pure Python, no torch).

A :class:`Cluster` is a set of *resources*, each a one-way pipe with a bandwidth
(bytes/s, per direction) and a latency (s): a direct device-to-device link, the port
of a device into a switch (one resource per direction), or a NIC (one per
direction). A transfer ``src -> dst`` is routed to the tuple of resources it
crosses (:meth:`Cluster.route`): a direct link when one exists, else the sender's
switch out-port and the receiver's switch in-port (NICs instead when the two sit
in different nodes), else the shortest chain of links (line, torus). Bytes that
cross one resource in one step share its bandwidth; the step's transfer time is
the most loaded resource's ``bytes / (bandwidth * efficiency) + latency``.

``efficiency(msg_bytes)`` is the fraction of a resource's bandwidth that a
collective library reaches for messages of that size. The default curve is
NCCL p2p measured on 2 x H200 NVLink (GPU_FACTS.md): 119 GB/s at 16 MiB,
282 at 256 MiB, 343 at 1 GiB per direction against a 450 GB/s port, i.e.
0.26 / 0.63 / 0.76, interpolated in log(size) and clamped at both ends. It is
applied to every preset; on fabrics we have not measured it is an assumption.

Presets (:func:`parse_topology`): ``nvswitch:N``, ``full_mesh:N``, ``nodes:UxM``,
``torus2d:AxB``, ``line:N``. Their numbers are the fields of
:class:`LinkDefaults`, each with its source.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field

MiB = 1 << 20
GiB = 1 << 30

#: (message bytes, fraction of port bandwidth) of NCCL p2p on 2 x H200 (GPU_FACTS.md).
NCCL_H200_EFFICIENCY: tuple[tuple[float, float], ...] = (
    (16 * MiB, 119e9 / 450e9),
    (256 * MiB, 282e9 / 450e9),
    (1 * GiB, 343e9 / 450e9),
)


@dataclass(frozen=True)
class LinkDefaults:
    """Bandwidths (bytes/s, one direction) and latencies (s) of the presets."""

    #: H100/H200 NVLink 4: 18 links x 25 GB/s = 450 GB/s per direction into the NVSwitch.
    nvlink_port_bw: float = 450e9
    #: NCCL p2p launch + handshake per step on NVLink (order of the 16 MiB point's excess).
    nvlink_latency: float = 10e-6
    #: one 400 Gb/s NIC (ConnectX-7 / IB NDR) per GPU: 50 GB/s per direction.
    nic_bw: float = 50e9
    #: inter-node RDMA latency incl. NCCL proxy (a few us wire + software).
    nic_latency: float = 20e-6
    #: AMD MI300X: 7 xGMI links per GPU, 128 GB/s bidirectional = 64 GB/s per direction.
    xgmi_bw: float = 64e9
    xgmi_latency: float = 10e-6
    #: neighbour link of a torus / line of processing elements (TPU-like ICI, ~50 GB/s).
    mesh_link_bw: float = 50e9
    mesh_link_latency: float = 5e-6


DEFAULTS = LinkDefaults()


@dataclass(frozen=True)
class Resource:
    """One direction of a link, switch port or NIC."""

    name: str
    bandwidth: float  # bytes/s
    latency: float  # s
    kind: str  # "link", "port_out", "port_in", "nic_out", "nic_in"


@dataclass
class Cluster:
    """Devices and the resources a transfer between two of them crosses.

    Attributes:
        name: the preset string (``nvswitch:8``) or a free label.
        num_devices: W.
        resources: every one-way resource; transfers refer to them by index.
        links: ``(src, dst) -> resource index`` of direct device-to-device links.
        port_out / port_in: per device, its switch port resource (None: no switch).
        nic_out / nic_in: per device, its NIC resource (None: single node).
        node_of: per device, its node (switch domain) number.
        node_size: devices per node (``hamilton_2level`` needs it); None if one node.
        efficiency_curve: ``(bytes, fraction)`` points (see module docstring); an
            empty tuple means ideal links (efficiency 1).
        kind: the preset family (``nvswitch``, ``full_mesh``, ``nodes``, ``torus2d``,
            ``line``) - lets the cost model use closed forms for large W.
        shape: the preset's numbers (``(8,)``, ``(2, 8)``, ``(4, 4)``).
    """

    name: str
    num_devices: int
    resources: list[Resource] = field(default_factory=list)
    links: dict[tuple[int, int], int] = field(default_factory=dict)
    port_out: list[int | None] = field(default_factory=list)
    port_in: list[int | None] = field(default_factory=list)
    nic_out: list[int | None] = field(default_factory=list)
    nic_in: list[int | None] = field(default_factory=list)
    node_of: list[int] = field(default_factory=list)
    node_size: int | None = None
    efficiency_curve: tuple[tuple[float, float], ...] = NCCL_H200_EFFICIENCY
    kind: str = "custom"
    shape: tuple[int, ...] = ()

    def __post_init__(self):
        w = self.num_devices
        for name in ("port_out", "port_in", "nic_out", "nic_in"):
            if not getattr(self, name):
                setattr(self, name, [None] * w)
        if not self.node_of:
            self.node_of = [0] * w
        self._adj: dict[int, list[int]] = {}
        for s, d in self.links:
            self._adj.setdefault(s, []).append(d)
        self._route_cache: dict[tuple[int, int], tuple[int, ...]] = {}

    def __hash__(self) -> int:
        return id(self)

    # -- building --------------------------------------------------------------------
    def add_resource(self, name: str, bandwidth: float, latency: float, kind: str) -> int:
        self.resources.append(Resource(name, float(bandwidth), float(latency), kind))
        return len(self.resources) - 1

    # -- queries ---------------------------------------------------------------------
    def efficiency(self, msg_bytes: float) -> float:
        """Fraction of bandwidth reached by messages of ``msg_bytes`` (log-interpolated)."""
        pts = self.efficiency_curve
        if not pts:
            return 1.0
        if msg_bytes <= pts[0][0]:
            return pts[0][1]
        if msg_bytes >= pts[-1][0]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if msg_bytes <= x1:
                t = (math.log(msg_bytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
                return y0 + t * (y1 - y0)
        return pts[-1][1]

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        """Resource indices a transfer ``src -> dst`` crosses (cached)."""
        key = (src, dst)
        hit = self._route_cache.get(key)
        if hit is not None:
            return hit
        if src == dst:
            raise ValueError(f"route: src and dst are both {src}")
        mesh = getattr(self, "_mesh_link", None)
        if mesh is not None and key not in self.links:
            self.links[key] = self.add_resource(f"{src}->{dst}", mesh[0], mesh[1], "link")
        if key in self.links:
            r: tuple[int, ...] = (self.links[key],)
        elif self.node_of[src] != self.node_of[dst] and self.nic_out[src] is not None:
            r = (self.nic_out[src], self.nic_in[dst])
        elif self.port_out[src] is not None and self.port_in[dst] is not None:
            r = (self.port_out[src], self.port_in[dst])
        else:
            r = tuple(self.links[(a, b)] for a, b in self._shortest_path(src, dst))
        self._route_cache[key] = r
        return r

    def _shortest_path(self, src: int, dst: int) -> list[tuple[int, int]]:
        # BFS over direct links; neighbours are visited in index order, so on a torus the
        # path is deterministic (not load-balanced over equal paths - a pessimistic choice).
        prev = {src: src}
        q = deque([src])
        while q:
            u = q.popleft()
            if u == dst:
                break
            for v in self._adj.get(u, ()):
                if v not in prev:
                    prev[v] = u
                    q.append(v)
        if dst not in prev:
            raise ValueError(f"route: no path from device {src} to {dst} in {self.name}")
        path = []
        v = dst
        while v != src:
            path.append((prev[v], v))
            v = prev[v]
        return path[::-1]

    def hops(self, src: int, dst: int) -> int:
        return len(self.route(src, dst))

    def describe(self) -> str:
        kinds: dict[str, list[Resource]] = {}
        for r in self.resources:
            kinds.setdefault(r.kind, []).append(r)
        parts = [
            f"{len(v)} {k} @ {v[0].bandwidth / 1e9:.0f} GB/s, {v[0].latency * 1e6:.0f} us"
            for k, v in kinds.items()
        ]
        return f"{self.name}: {self.num_devices} devices; " + "; ".join(parts)


# -- presets --------------------------------------------------------------------------
def nvswitch(n: int, *, port_bw: float | None = None, latency: float | None = None) -> Cluster:
    """One node, a non-blocking switch: each device one port per direction (``port_bw``)."""
    bw = DEFAULTS.nvlink_port_bw if port_bw is None else port_bw
    lat = DEFAULTS.nvlink_latency if latency is None else latency
    c = Cluster(f"nvswitch:{n}", n, kind="nvswitch", shape=(n,))
    for d in range(n):
        c.port_out[d] = c.add_resource(f"dev{d}->sw", bw, lat, "port_out")
        c.port_in[d] = c.add_resource(f"sw->dev{d}", bw, lat, "port_in")
    return c


def full_mesh(n: int, *, link_bw: float | None = None, latency: float | None = None) -> Cluster:
    """Direct links between every ordered pair (8-GPU MI300X: 64 GB/s per direction)."""
    bw = DEFAULTS.xgmi_bw if link_bw is None else link_bw
    lat = DEFAULTS.xgmi_latency if latency is None else latency
    c = Cluster(f"full_mesh:{n}", n, kind="full_mesh", shape=(n,))
    # Links are made on first use (route): n^2 resources would cost O(n^2) to build
    # at 1024 devices, while a ring touches only n of them.
    c._mesh_link = (bw, lat)
    return c


def nodes(
    u: int,
    m: int,
    *,
    port_bw: float | None = None,
    nic_bw: float | None = None,
    port_latency: float | None = None,
    nic_latency: float | None = None,
) -> Cluster:
    """``u`` NVSwitch nodes of ``m`` devices; one NIC per device into a non-blocking fabric."""
    pbw = DEFAULTS.nvlink_port_bw if port_bw is None else port_bw
    nbw = DEFAULTS.nic_bw if nic_bw is None else nic_bw
    plat = DEFAULTS.nvlink_latency if port_latency is None else port_latency
    nlat = DEFAULTS.nic_latency if nic_latency is None else nic_latency
    w = u * m
    c = Cluster(f"nodes:{u}x{m}", w, kind="nodes", shape=(u, m), node_size=m)
    c.node_of = [d // m for d in range(w)]
    for d in range(w):
        c.port_out[d] = c.add_resource(f"dev{d}->sw{d // m}", pbw, plat, "port_out")
        c.port_in[d] = c.add_resource(f"sw{d // m}->dev{d}", pbw, plat, "port_in")
        c.nic_out[d] = c.add_resource(f"nic{d}.tx", nbw, nlat, "nic_out")
        c.nic_in[d] = c.add_resource(f"nic{d}.rx", nbw, nlat, "nic_in")
    return c


def torus2d(a: int, b: int, *, link_bw: float | None = None, latency: float | None = None):
    """``a x b`` torus: device ``i * b + j`` linked both ways to its 4 wrap-around neighbours."""
    bw = DEFAULTS.mesh_link_bw if link_bw is None else link_bw
    lat = DEFAULTS.mesh_link_latency if latency is None else latency
    c = Cluster(f"torus2d:{a}x{b}", a * b, kind="torus2d", shape=(a, b))
    for i in range(a):
        for j in range(b):
            s = i * b + j
            for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                d = ((i + di) % a) * b + (j + dj) % b
                if d != s and (s, d) not in c.links:
                    c.links[(s, d)] = c.add_resource(f"{s}->{d}", bw, lat, "link")
    c.__post_init__()
    return c


def line(n: int, *, link_bw: float | None = None, latency: float | None = None) -> Cluster:
    """An open line: device i linked both ways to i - 1 and i + 1 (no wrap-around)."""
    bw = DEFAULTS.mesh_link_bw if link_bw is None else link_bw
    lat = DEFAULTS.mesh_link_latency if latency is None else latency
    c = Cluster(f"line:{n}", n, kind="line", shape=(n,))
    for s in range(n - 1):
        c.links[(s, s + 1)] = c.add_resource(f"{s}->{s + 1}", bw, lat, "link")
        c.links[(s + 1, s)] = c.add_resource(f"{s + 1}->{s}", bw, lat, "link")
    c.__post_init__()
    return c


PRESETS = ("nvswitch:N", "full_mesh:N", "nodes:UxM", "torus2d:AxB", "line:N")


@functools.lru_cache(maxsize=64)
def _parse_cached(s: str) -> Cluster:
    kind, _, arg = s.partition(":")
    try:
        if kind == "nvswitch":
            return nvswitch(int(arg))
        if kind == "full_mesh":
            return full_mesh(int(arg))
        if kind == "line":
            return line(int(arg))
        if kind in ("nodes", "torus2d"):
            x, y = (int(v) for v in arg.lower().split("x"))
            return nodes(x, y) if kind == "nodes" else torus2d(x, y)
    except ValueError:
        pass
    raise ValueError(f"topology: expected one of {', '.join(PRESETS)}, got {s!r}")


def parse_topology(s: str | Cluster) -> Cluster:
    """A preset cluster from ``nvswitch:8``, ``full_mesh:8``, ``nodes:2x8``,
    ``torus2d:4x4`` or ``line:8`` (a :class:`Cluster` passes through)."""
    if isinstance(s, Cluster):
        return s
    if not isinstance(s, str):
        raise ValueError(f"topology: expected a string like 'nvswitch:8', got {s!r}")
    c = _parse_cached(s.strip())
    if c.num_devices < 1:
        raise ValueError(f"topology: {s!r} has no devices")
    return c
