"""The library's configuration: one typed, frozen object, and the only module that reads
the environment.

Every setting has a ``HAMILTON_ATTN_*`` variable (or a launcher's: torchrun's
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). :func:`get` returns the
configuration in force: the innermost :func:`override`, else the environment as it is
now (parsed once per distinct set of values, so a variable set after import counts).
Tests and the bench change settings with :func:`override`, which restores them on exit::

    from hamilton_attn import config

    with config.override(transport="ce", timeout_s=30):
        ...  # every read of config.get() in this process sees the change
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

#: Default seconds any distributed wait may block.
DEFAULT_TIMEOUT_S = 300.0
#: gloo counts a wait's timeout in whole milliseconds and takes 0 as "no timeout": a
#: value under 1 ms would let a rank whose peer never calls block until the peer exits.
MIN_TIMEOUT_S = 1e-3
MAX_TIMEOUT_S = 1e9  # about 31 years; timedelta and the timers below overflow far beyond
TRANSPORTS = ("nccl", "ce")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings, each with the environment variable it is read from."""

    #: ``HAMILTON_ATTN_TIMEOUT``: seconds any distributed wait may block (1 ms to 1e9 s).
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: Why ``HAMILTON_ATTN_TIMEOUT`` could not be used (``timeout_s`` is then the
    #: default), or None. Not raised where it is read: the first status exchange of a
    #: distributed call carries it, so that every rank raises, not only the one with the
    #: bad value.
    timeout_problem: str | None = None
    #: ``HAMILTON_ATTN_TRANSFER_HEAD_START_US``: microseconds of GPU time the compute
    #: stream leaves a just-started NCCL transfer before its next kernel (0: off). When a
    #: transfer and a large attention kernel become ready together, the kernel can take
    #: every SM and the transfer waits for it; a one-CTA spin lets NCCL's CTAs start
    #: first. On 2 H200s (``benchmarks/gpu_head_start.py``, ring, 16K tokens per GPU) 5 us
    #: lifts causal forward efficiency from 0.86 to 0.93.
    transfer_head_start_us: float = 5.0
    #: ``HAMILTON_ATTN_TRANSPORT``: ``nccl``, or ``ce`` for the copy engine where every
    #: rank of the group is on this host (NCCL elsewhere).
    transport: str = "nccl"
    #: ``HAMILTON_ATTN_CE_SLOT_MB``: the largest staging slot of the copy engine, in MiB.
    ce_slot_mb: float = 64.0
    #: ``HAMILTON_ATTN_COMPILE_MERGE``: merge with one compiled kernel on CUDA (``0``: off).
    compile_merge: bool = True
    #: ``HAMILTON_ATTN_TOPOLOGY``: the cluster the planner picks schedules for
    #: (``planner.parse_topology``'s presets); None: one NVSwitch node of W devices.
    topology: str | None = None
    #: ``LOCAL_WORLD_SIZE`` (torchrun): devices per node, for two-level schedules.
    local_world_size: int | None = None
    #: ``WORLD_SIZE`` (torchrun): how many ranks a launcher started, or None if unset.
    launched_world_size: int | None = None
    #: ``RANK`` (torchrun): this process's rank, or None outside a launcher.
    launched_rank: int | None = None
    #: ``LOCAL_RANK`` (torchrun): this process's device on its node, or None.
    local_rank: int | None = None
    #: ``GLOO_SOCKET_IFNAME``: the network interface gloo binds, or None (gloo's choice).
    gloo_socket_ifname: str | None = None
    #: ``TRITON_INTERPRET`` (Triton's own switch): run the ``triton`` kernel backend
    #: through Triton's interpreter, on CPU tensors too (tests without a GPU). Read here
    #: and applied when the backend builds its kernels, so import order does not matter.
    triton_interpret: bool = False

    def __post_init__(self):
        problem = _timeout_problem(self.timeout_s)
        if problem and self.timeout_problem is None:
            raise ValueError(problem.replace("HAMILTON_ATTN_TIMEOUT", "timeout_s", 1))
        if not (_number(self.transfer_head_start_us) and self.transfer_head_start_us >= 0):
            raise ValueError(
                "transfer_head_start_us: expected a finite number of microseconds >= 0, "
                f"got {self.transfer_head_start_us!r}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {self.transport!r}")
        if not (_number(self.ce_slot_mb) and self.ce_slot_mb > 0):
            raise ValueError(f"ce_slot_mb: expected a positive number, got {self.ce_slot_mb!r}")
        if not isinstance(self.compile_merge, bool):
            raise ValueError(f"compile_merge: expected a bool, got {self.compile_merge!r}")
        if not isinstance(self.triton_interpret, bool):
            raise ValueError(f"triton_interpret: expected a bool, got {self.triton_interpret!r}")
        if self.topology is not None and not isinstance(self.topology, str):
            raise ValueError(f"topology: expected a string or None, got {self.topology!r}")
        for name in ("local_world_size", "launched_world_size", "launched_rank", "local_rank"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name}: expected an int >= 0 or None, got {value!r}")

    @property
    def torchrun(self) -> bool:
        """Whether a launcher set this process's ``RANK`` and ``WORLD_SIZE``."""
        return self.launched_rank is not None and self.launched_world_size is not None


#: The environment variables read, by the field they set.
ENV: Mapping[str, str] = {
    "timeout_s": "HAMILTON_ATTN_TIMEOUT",
    "transfer_head_start_us": "HAMILTON_ATTN_TRANSFER_HEAD_START_US",
    "transport": "HAMILTON_ATTN_TRANSPORT",
    "ce_slot_mb": "HAMILTON_ATTN_CE_SLOT_MB",
    "compile_merge": "HAMILTON_ATTN_COMPILE_MERGE",
    "topology": "HAMILTON_ATTN_TOPOLOGY",
    "local_world_size": "LOCAL_WORLD_SIZE",
    "launched_world_size": "WORLD_SIZE",
    "launched_rank": "RANK",
    "local_rank": "LOCAL_RANK",
    "gloo_socket_ifname": "GLOO_SOCKET_IFNAME",
    "triton_interpret": "TRITON_INTERPRET",
}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _timeout_problem(seconds, raw=None) -> str | None:
    if _number(seconds) and MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        return None
    return (
        f"HAMILTON_ATTN_TIMEOUT: expected a number of seconds from {MIN_TIMEOUT_S:g}"
        f" (1 ms; 0 would turn the transfer timeout off) to {MAX_TIMEOUT_S:g}"
        f" (the process group's timer overflows beyond), got "
        f"{raw if raw is not None else seconds!r}"
    )


def _float(var: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{var}: expected a number, got {raw!r}") from None


def _int(var: str, raw: str, *, lenient: bool = False) -> int | None:
    try:
        return int(raw)
    except ValueError:
        if lenient:  # a launcher's variable we only consult: unusable means unset
            return None
        raise ValueError(f"{var}: expected an integer, got {raw!r}") from None


def from_env(environ: Mapping[str, str] | None = None) -> Config:
    """The configuration the environment (default ``os.environ``) gives; ValueError
    names a variable whose value cannot be used (except ``HAMILTON_ATTN_TIMEOUT``: see
    :attr:`Config.timeout_problem`)."""
    env = os.environ if environ is None else environ
    kw: dict = {}
    raw = env.get(ENV["timeout_s"])
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        problem = _timeout_problem(seconds, repr(raw))
        if problem:
            kw["timeout_problem"] = problem
        else:
            kw["timeout_s"] = seconds
    for name in ("transfer_head_start_us", "ce_slot_mb"):
        raw = env.get(ENV[name])
        if raw is not None:
            kw[name] = _float(ENV[name], raw)
    raw = env.get(ENV["transport"])
    if raw is not None:
        kw["transport"] = raw
    raw = env.get(ENV["compile_merge"])
    if raw is not None:
        kw["compile_merge"] = raw != "0"
    raw = env.get(ENV["triton_interpret"])
    if raw is not None:  # Triton's own reading of its switch
        kw["triton_interpret"] = raw.strip().lower() in ("1", "true", "yes", "on")
    for name in ("topology", "gloo_socket_ifname"):
        kw[name] = env.get(ENV[name]) or None
    raw = env.get(ENV["local_world_size"])
    if raw:
        lws = _int(ENV["local_world_size"], raw, lenient=True)
        kw["local_world_size"] = lws if lws and lws > 0 else None
    for name in ("launched_world_size", "launched_rank", "local_rank"):
        raw = env.get(ENV[name])
        if raw is not None:
            value = _int(ENV[name], raw, lenient=True)
            kw[name] = value if value is not None and value >= 0 else None
    try:
        return Config(**kw)
    except ValueError as err:  # name the variable, not the field
        msg = str(err)
        field = msg.split(":", 1)[0]
        raise ValueError(msg.replace(field, ENV.get(field, field), 1)) from None


# The overrides in force, innermost last: process-wide, so that every thread sees them
# (autograd runs a CUDA backward on a thread of its own, where a context variable set in
# the forward's thread would not be seen).
_OVERRIDES: list[Config] = []
_LOCK = threading.Lock()
_cache: dict[tuple, Config] = {}


def get() -> Config:
    """The configuration in force: the innermost :func:`override`, else the current
    environment's."""
    if _OVERRIDES:
        return _OVERRIDES[-1]
    key = tuple(os.environ.get(var) for var in ENV.values())
    cfg = _cache.get(key)
    if cfg is None:
        cfg = from_env()
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = cfg
    return cfg


@contextlib.contextmanager
def override(**changes) -> Iterator[Config]:
    """Run a block with some settings changed (validated like the environment's);
    restored on exit, also on error. Nests. Applies to the whole process (every thread,
    autograd's included) while the block runs, not to other processes (a pool's ranks
    read their own environment)."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise TypeError(f"override: unknown setting(s) {unknown}")
    base = get()
    if "timeout_s" in changes:
        changes.setdefault("timeout_problem", None)
    cfg = dataclasses.replace(base, **changes)
    with _LOCK:
        _OVERRIDES.append(cfg)
    try:
        yield cfg
    finally:
        with _LOCK:
            # This block's own entry (an identity search: blocks of other threads may
            # have pushed theirs after it).
            i = max(i for i, c in enumerate(_OVERRIDES) if c is cfg)
            del _OVERRIDES[i]
