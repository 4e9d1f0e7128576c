"""Thin asynchronous communication over torch.distributed: groups, point-to-point
batches with timeouts, gathers and the status exchanges that make ranks agree before
any transfer. Only runtime/ (and the compat layer's seed-named helpers) talk to
torch.distributed, through here."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import config

_CYCLES_PER_US: dict[int, float] = {}


def gpu_sleep(device: torch.device, us: float) -> None:
    """Spin ``device``'s current CUDA stream for ``us`` microseconds (one CTA)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    rate = _CYCLES_PER_US.get(idx)
    if rate is None:
        khz = getattr(torch.cuda.get_device_properties(idx), "clock_rate", 0) or 1_980_000
        rate = _CYCLES_PER_US[idx] = khz / 1e3
    # On that device's current stream (entering a device context only if it is not the
    # current device).
    here = idx == torch.cuda.current_device()
    with contextlib.nullcontext() if here else torch.cuda.device(idx):
        torch.cuda._sleep(int(us * rate))


def _head_start(device: torch.device) -> None:
    """Spin the current CUDA stream for the configured transfer head start (one CTA;
    :attr:`config.Config.transfer_head_start_us` says why)."""
    us = config.get().transfer_head_start_us
    if us > 0:
        gpu_sleep(device, us)


def timeout_problem() -> str | None:
    """What is wrong with ``HAMILTON_ATTN_TIMEOUT``, or None."""
    return config.get().timeout_problem


def default_timeout() -> timedelta:
    """How long any wait may block: ``HAMILTON_ATTN_TIMEOUT`` seconds (at least 1 ms),
    default 300. Raises ValueError for a value that is not such a number."""
    cfg = config.get()
    if cfg.timeout_problem:
        raise ValueError(cfg.timeout_problem)
    return timedelta(seconds=cfg.timeout_s)


@dataclass(frozen=True)
class SimulatedGroup:
    """A group of ``world_size`` ranks that exists only on paper: plans built for it
    (seen from ``rank``) can be inspected, counted and verified, but not run."""

    world_size: int
    rank: int = 0

    def __post_init__(self):
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {self.world_size!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < {self.world_size}, got {self.rank}")


def resolve_group(group=None):
    """``group`` itself, or for None the world group once torch.distributed is
    initialised (so that a plan cached for one process before ``init_process_group`` is
    not returned for the world group after it)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def group_info(group=None) -> tuple[int, int, tuple[int, ...]]:
    """``(rank in group, group size, global ranks)``; a single process if no process group.

    Raises ValueError where that single process would be a mistake: a launcher started
    several ranks (``WORLD_SIZE`` > 1) but none initialised torch.distributed (each
    would compute the whole problem alone; ``SimulatedGroup(1)`` asks for one rank
    explicitly), or this process is not a member of ``group``."""
    if isinstance(group, SimulatedGroup):
        return group.rank, group.world_size, tuple(range(group.world_size))
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError(
                "group: a process group was given but torch.distributed is not initialised"
            )
        launched = config.get().launched_world_size or 1
        if launched > 1:
            raise ValueError(
                f"group: WORLD_SIZE={launched} in the environment (torchrun?) but "
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group() first, or pass "
                "group=hamilton_attn.SimulatedGroup(1) to run on this rank alone"
            )
        return 0, 1, (0,)
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:  # torch's answer for a process outside the group (world size is -1 too)
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not in the plan's "
            "group; plans and calls on a subgroup belong to its members only"
        )
    ranks = tuple(dist.get_process_group_ranks(group))
    return rank, dist.get_world_size(group), ranks


class PeerLostError(ConnectionError):
    """A peer rank went away (its process died or closed its connections) while this
    rank was exchanging data with it."""


# gloo says "Connection closed by peer" when a peer's process exits, "Connection reset
# by peer" / "Broken pipe" when it dies mid-message, and "Timed out waiting ..." or
# "Application timeout caused pair closure" when our own timeout expires.
_LOST = re.compile(
    r"connection (closed|reset) by peer|broken pipe|econnreset|epipe|remote worker crash",
    re.IGNORECASE,
)
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def transfer_error(err: BaseException, timeout: timedelta) -> Exception:
    """The error to raise for a failed wait: a lost peer, a timeout, or neither."""
    text = str(err)
    lost_type = getattr(dist, "DistNetworkError", ())
    if _TIMED_OUT.search(text):
        # First: after a timeout gloo closes the pair, and a peer still waiting on it
        # then reads both "timed out" and "connection closed"; no rank was lost.
        return TimeoutError(f"hamilton_attn: a transfer did not finish within {timeout} ({text})")
    if _LOST.search(text) or (lost_type and isinstance(err, lost_type)):
        return PeerLostError(
            "hamilton_attn: a peer rank was lost during a transfer: its process exited or "
            "its connection closed (it may also have given up on a transfer of its own "
            f"after a timeout or an error); check that rank's logs ({text})"
        )
    return RuntimeError(f"hamilton_attn: a transfer failed ({text})")


class PendingOps:
    """Started operations. ``wait`` on CPU tensors (gloo) blocks the host at most
    ``timeout``. On CUDA tensors it only orders the current stream after the transfers
    and returns at once: handing NCCL's ``wait`` a timeout would block the host until
    the transfer ends, polling in 1 ms sleeps, which leaves the GPU idle at every step
    boundary. There the process group's own timeout (its watchdog, set by
    ``init_process_group(timeout=...)``) is what bounds a hung transfer."""

    def __init__(self, works, timeout: timedelta, device_ordered: bool = False, streams=()):
        self._works = works
        self._timeout = timeout
        self._device_ordered = device_ordered
        self._streams = list(streams)  # copy-engine transfers (:mod:`.transports.copy_engine`)

    def wait(self) -> None:
        for s in self._streams:
            torch.cuda.current_stream(s.device).wait_stream(s)
        self._streams = []
        for work in self._works:
            try:
                ok = work.wait() if self._device_ordered else work.wait(self._timeout)
            except RuntimeError as err:
                raise transfer_error(err, self._timeout) from err
            if ok is False:
                raise TimeoutError(
                    f"hamilton_attn: a transfer did not finish within {self._timeout}"
                )
        self._works = []


def start_p2p(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group,
    global_ranks,
    timeout: timedelta | None = None,
    tag: int = 0,
) -> PendingOps:
    """Start sends ``(tensor, peer)`` and receives ``(buffer, peer)`` as one batch; peers
    are ranks in ``group``. Both sides must list messages between a pair in one order
    (the executor's NCCL/gloo transport, :mod:`.transports.nccl`). ``tag`` keeps kinds
    of message apart on gloo (NCCL ignores it): see :data:`STATUS_TAG`."""
    # Read before anything starts: a bad HAMILTON_ATTN_TIMEOUT must not leave sends half
    # posted to peers that will then wait for the rest.
    timeout = timeout or default_timeout()
    ops = [dist.P2POp(dist.isend, t, global_ranks[p], group, tag) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, global_ranks[p], group, tag) for t, p in recvs]
    try:
        works = dist.batch_isend_irecv(ops) if ops else []
    except RuntimeError as err:  # a peer already gone can fail the post itself
        raise transfer_error(err, timeout) from err
    on_device = any(t.is_cuda for t, _ in (*sends, *recvs))
    if on_device and works:
        _head_start(next(t for t, _ in (*sends, *recvs) if t.is_cuda).device)
    return PendingOps(works, timeout, device_ordered=on_device)


#: gloo tags of the library's own gathers and status exchanges (attention's transfers use
#: tag 0). gloo matches a message by peer and tag and aborts the process when a message
#: is larger than the buffer posted for it; a rank that alone enters a status exchange
#: (a new input signature under ``check="first"``) while its peers already send KV or
#: gather shards then meets a receive of its own kind, and both sides stop at the
#: timeout instead of aborting.
GATHER_TAG = 0x4841_0001
STATUS_TAG = 0x4841_0002


def all_gather_tensor(
    x: torch.Tensor, group, timeout: timedelta | None = None, tag: int = GATHER_TAG
) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), in group-rank order."""
    _, w, _ = group_info(group)
    if w == 1:
        return [x]
    timeout = timeout or default_timeout()
    out = [torch.empty_like(x) for _ in range(w)]
    if not x.is_cuda and dist.get_backend(group) == "gloo":
        # Point to point, not gloo's all_gather: that runs on a worker thread of the
        # process group, which can still hold the tensors after wait() returns and then
        # frees them itself; at interpreter exit (the group outlives
        # destroy_process_group while a plan refers to it) that thread must take the
        # GIL to drop a Python tensor, and the process aborts. Send and receive works
        # are held and freed here, on the caller's thread.
        r, _, ranks = group_info(group)
        out[r].copy_(x)
        peers = [i for i in range(w) if i != r]
        x = x.contiguous()
        sends, recvs = [(x, i) for i in peers], [(out[i], i) for i in peers]
        start_p2p(sends, recvs, group, ranks, timeout, tag=tag).wait()
        return out
    try:
        work = dist.all_gather(out, x.contiguous(), group=group, async_op=True)
    except RuntimeError as err:
        raise transfer_error(err, timeout) from err
    PendingOps([work], timeout).wait()
    return out


def exchange_status(
    values: list[int], group, device: torch.device, timeout: timedelta | None = None
) -> list[list[int]]:
    """All ranks' small integer vectors (for consistency checks before any transfer).
    Every rank must pass as many values. ``timeout`` replaces ``HAMILTON_ATTN_TIMEOUT``
    (for the exchange that reports that setting's own problem)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    return [g.tolist() for g in all_gather_tensor(t, group, timeout, tag=STATUS_TAG)]


def exchange_timeout() -> timedelta:
    """The timeout for a status exchange: ``HAMILTON_ATTN_TIMEOUT``, or the default where
    that setting is bad (the exchange is how the other ranks hear about it)."""
    return timedelta(seconds=config.DEFAULT_TIMEOUT_S) if timeout_problem() else default_timeout()


class _MeshGroups:
    """Groups over the ranks of DeviceMeshes that cover part of the world, made once.

    ``new_group`` wants every rank of the world to create every group, in one order.
    So the first call for an unknown rank set is collective over the world: each rank
    says which ranks its mesh holds (every replica its own), and all ranks create the
    groups of all the sets they heard, sorted; later calls with a known set are local.
    Every rank of the world must therefore make the call (with its own mesh), as
    training loops with a ``dp x cp`` mesh do; a rank that stays away makes the others
    fail at the exchange's timeout (``HAMILTON_ATTN_TIMEOUT``)."""

    def __init__(self) -> None:
        self._groups: dict = {}  # (sorted global ranks, the default group) -> group

    def get(self, ranks: tuple[int, ...], device_type: str):
        world = dist.group.WORLD
        if (ranks, world) not in self._groups:
            w = dist.get_world_size()
            mine = [int(r in ranks) for r in range(w)]
            rows = exchange_status(mine, world, torch.device(device_type), exchange_timeout())
            for s in sorted({tuple(r for r in range(w) if row[r]) for row in rows}):
                self._groups[(s, world)] = dist.new_group(list(s))
        return self._groups[(ranks, world)]


_MESH_GROUPS = _MeshGroups()


def is_mesh(obj) -> bool:
    """Whether ``obj`` is a ``torch.distributed.device_mesh.DeviceMesh``."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(obj, DeviceMesh)


def mesh_group(mesh):
    """One process group over all ranks of ``mesh`` (a 1-d mesh's own group; the world
    when the mesh covers it; else a group made once, collectively: :class:`_MeshGroups`).
    Its members are ordered by global rank, as torch orders every group."""
    if mesh.ndim == 1:
        return mesh.get_group()
    ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
    if ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    return _MESH_GROUPS.get(ranks, mesh.device_type)


#: Names a 2-d mesh may give its head-parallel dim (the other dim is the sequence's).
HEAD_DIM_NAMES = ("ulysses", "heads")


def head_mesh_layout(mesh, name: str = "group") -> tuple[object, tuple[int, ...], int]:
    """``(group, global ranks in plan order, ulysses degree)`` of a 2-d DeviceMesh with
    a dim named ``ulysses`` (or ``heads``): plan rank ``c * u + j`` is the mesh's rank at
    index j of the head dim and c of the other, so head groups are runs of u plan ranks
    whichever order the dims come in."""
    names = tuple(mesh.mesh_dim_names or ())
    heads = [i for i, n in enumerate(names) if n in HEAD_DIM_NAMES]
    if mesh.ndim != 2 or len(heads) != 1:
        raise ValueError(
            f"{name}: a DeviceMesh must be 2-d with one dim named {' or '.join(HEAD_DIM_NAMES)}"
            f" (head parallelism) and one for the sequence, got {mesh.ndim}-d with names "
            f"{names or None}; pass a process group for context parallelism alone"
        )
    h = heads[0]
    order = mesh.mesh.permute(1 - h, h).reshape(-1).tolist()
    return mesh_group(mesh), tuple(int(r) for r in order), int(mesh.mesh.shape[h])


@dataclass(frozen=True)
class GroupSpec:
    """What a ``group`` argument (a process group or a DeviceMesh) means to the library:
    the process group the plan runs on, and what a 2-d mesh adds. ``rank_order``: the
    group's global ranks in plan order (a head-parallel mesh), else None (the group's
    own order); ``ulysses_degree``: the size of a mesh's head dim, else None;
    ``node_size``: a hierarchical mesh's inner (intra-node) size, else None."""

    group: object
    rank_order: tuple[int, ...] | None = None
    ulysses_degree: int | None = None
    node_size: int | None = None


def _is_group(obj) -> bool:
    """A torch ProcessGroup, a :class:`SimulatedGroup`, None (the default group), or the
    marker ``new_group`` returns to a non-member (``group_info`` then names the problem)."""
    if obj is None or isinstance(obj, SimulatedGroup):
        return True
    if not dist.is_available():  # pragma: no cover - torch without distributed
        return False
    from torch.distributed.distributed_c10d import GroupMember

    return isinstance(obj, dist.ProcessGroup) or obj is GroupMember.NON_GROUP_MEMBER


def as_group(obj, name: str = "group", *, two_d: str | None = "heads") -> GroupSpec:
    """The one reading of a ``group`` argument, used wherever the library takes one.

    Accepted: None (the default group), a ``ProcessGroup``, a :class:`SimulatedGroup`, a
    1-d ``DeviceMesh`` (a named sub-mesh such as ``mesh["cp"]`` is one: its own group),
    and a 2-d DeviceMesh as ``two_d`` says: ``"heads"`` (one dim named ``ulysses`` or
    ``heads`` splits heads, the other the sequence: :func:`head_mesh_layout`), ``"nodes"``
    (MagiAttention's ``(inter, intra)`` hierarchy: one group over all its ranks,
    ``node_size`` = the inner size) or None (refused). Anything else, or a mesh of
    another shape, raises ValueError naming ``name``; no message is sent, except for a
    2-d mesh over part of the world, whose group is made once, collectively
    (:func:`mesh_group`)."""
    if _is_group(obj):
        return GroupSpec(obj)
    if not is_mesh(obj):
        raise ValueError(
            f"{name}: expected a torch.distributed ProcessGroup, a DeviceMesh (1-d, or a "
            "sub-mesh such as mesh['cp']), a hamilton_attn.SimulatedGroup or None, got "
            f"{type(obj).__name__}"
        )
    names = tuple(obj.mesh_dim_names or ())
    if obj.ndim == 1:
        return GroupSpec(obj.get_group())
    if obj.ndim == 2 and two_d == "heads" and any(n in HEAD_DIM_NAMES for n in names):
        group, order, degree = head_mesh_layout(obj, name)
        return GroupSpec(group, rank_order=order, ulysses_degree=degree)
    if obj.ndim == 2 and two_d == "nodes":
        return GroupSpec(mesh_group(obj), node_size=int(obj.mesh.shape[1]))
    wants = {
        "heads": f" or a 2-d one with a dim named {' or '.join(HEAD_DIM_NAMES)} (head "
        "parallelism) and one for the sequence",
        "nodes": " or a 2-d one (inter-node, intra-node)",
    }.get(two_d, "")
    hint = f"; pass the sequence dim's sub-mesh, e.g. mesh[{names[-1]!r}]" if names else ""
    raise ValueError(
        f"{name}: expected a 1-d DeviceMesh{wants}, got a {obj.ndim}-d mesh of shape "
        f"{tuple(obj.mesh.shape)} with dim names {names or None}{hint}"
    )
