"""MagiAttention's configs (``magi_attention.config`` and the dispatch / overlap
solvers' configs it re-exports): what the key functions need besides the mask and the
group, mapped onto the core's ``plan()`` options.

Plain frozen dataclasses (positional arguments allowed, as in MagiAttention, so that
``RandomDispatchAlg(7)`` works); every field is checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._args import check_int
from .common.enum import AttnOverlapMode

__all__ = [
    "DispatchAlg",
    "DispatchConfig",
    "DistAttnConfig",
    "MinHeapDispatchAlg",
    "OverlapConfig",
    "RandomDispatchAlg",
    "SequentialDispatchAlg",
    "UniformOverlapAlg",
]


@dataclass(frozen=True)
class DispatchAlg:
    """Base of the dispatch algorithms; ``kind`` names the core's ``dispatch=``."""

    kind = ""


@dataclass(frozen=True)
class MinHeapDispatchAlg(DispatchAlg):
    """Work-balanced: chunks costed by the mask's area, largest first to the least
    loaded rank (every rank the same number of chunks)."""

    kind = "minheap"


@dataclass(frozen=True)
class SequentialDispatchAlg(DispatchAlg):
    """Baseline: rank r holds the r-th run of consecutive chunks."""

    kind = "sequential"


@dataclass(frozen=True)
class RandomDispatchAlg(DispatchAlg):
    """Baseline: a random permutation of the chunks, seeded (every rank agrees)."""

    seed: int = 0
    kind = "random"

    def __post_init__(self):
        check_int(self.seed, "seed")


@dataclass(frozen=True)
class DispatchConfig:
    """How tokens are dispatched to ranks.

    Attributes:
        alg: a :class:`MinHeapDispatchAlg` (default), :class:`SequentialDispatchAlg` or
            :class:`RandomDispatchAlg`.
    """

    alg: DispatchAlg = field(default_factory=MinHeapDispatchAlg)

    def __post_init__(self):
        if not isinstance(self.alg, DispatchAlg) or not self.alg.kind:
            raise ValueError(
                "alg: expected MinHeapDispatchAlg(), SequentialDispatchAlg() or "
                f"RandomDispatchAlg(seed), got {self.alg!r}"
            )


@dataclass(frozen=True)
class UniformOverlapAlg:
    """MagiAttention's stage-partition algorithm; accepted, not used (the core balances
    the tokens each stage moves)."""

    random_costs: bool = False
    random_seed: int | None = None


@dataclass(frozen=True)
class OverlapConfig:
    """Multi-stage overlap of KV transfers with compute.

    Attributes:
        enable: False runs one stage (all transfers, then compute on them).
        mode: ``STATIC`` (``degree`` stages) or ``DYNAMIC`` (the core's cost model picks
            the number of stages, up to ``dynamic_max_degree``; ``degree`` must be None).
        degree: stages in STATIC mode; 0 (no overlap) runs as 1.
        dynamic_max_degree, min_chunk_size, max_num_chunks, alg, calc_cost_factor,
        comm_cost_factor: MagiAttention's tuning fields; validated, not used.
    """

    enable: bool = True
    mode: AttnOverlapMode = AttnOverlapMode.STATIC
    degree: int | None = 1
    dynamic_max_degree: int | None = 8
    min_chunk_size: int = 512
    max_num_chunks: int = 64
    alg: UniformOverlapAlg = field(default_factory=UniformOverlapAlg)
    calc_cost_factor: float = 1.0
    comm_cost_factor: float = 1.0

    def __post_init__(self):
        if not isinstance(self.enable, bool):
            raise ValueError(f"enable: expected a bool, got {self.enable!r}")
        try:
            mode = AttnOverlapMode(self.mode)
        except ValueError:
            raise ValueError(
                f"mode: expected AttnOverlapMode.STATIC or DYNAMIC, got {self.mode!r}"
            ) from None
        object.__setattr__(self, "mode", mode)
        if self.enable and mode is AttnOverlapMode.DYNAMIC and self.degree is not None:
            raise ValueError(f"degree: must be None in DYNAMIC mode, got {self.degree!r}")
        if self.enable and mode is AttnOverlapMode.STATIC:
            if self.degree is None:
                raise ValueError("degree: required in STATIC mode (the number of stages)")
            check_int(self.degree, "degree")
            if self.degree > self.max_num_chunks:
                raise ValueError(
                    f"degree: {self.degree} exceeds max_num_chunks={self.max_num_chunks}"
                )
        if self.dynamic_max_degree is not None:
            check_int(self.dynamic_max_degree, "dynamic_max_degree", minimum=1)
        check_int(self.min_chunk_size, "min_chunk_size", minimum=1)
        check_int(self.max_num_chunks, "max_num_chunks", minimum=1)
        if not isinstance(self.alg, UniformOverlapAlg):
            raise ValueError(f"alg: expected a UniformOverlapAlg, got {self.alg!r}")
        for name in ("calc_cost_factor", "comm_cost_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")

    @property
    def stages(self) -> int | None:
        """The core's ``degree``: transfer stages, or None for its cost model."""
        if not self.enable:
            return 1
        if self.mode is AttnOverlapMode.DYNAMIC:
            return None
        return max(1, self.degree)


@dataclass(frozen=True)
class DistAttnConfig:
    """Everything the dispatch functions need besides the mask and the group.

    Attributes:
        dispatch_config: which dispatch algorithm (:class:`DispatchConfig`).
        overlap_config: how transfers overlap compute (:class:`OverlapConfig`).
        high_bandwith_domain_size: ranks per high-bandwidth domain (a node); > 1 plans
            hierarchically (each KV chunk crosses to another domain once). Must divide
            the group size. MagiAttention's spelling.
        deterministic: accepted; the core is deterministic anyway.
    """

    dispatch_config: DispatchConfig = field(default_factory=DispatchConfig)
    overlap_config: OverlapConfig = field(default_factory=OverlapConfig)
    high_bandwith_domain_size: int = 1
    deterministic: bool = False

    def __post_init__(self):
        if not isinstance(self.dispatch_config, DispatchConfig):
            raise ValueError(
                f"dispatch_config: expected a DispatchConfig, got {self.dispatch_config!r}"
            )
        if not isinstance(self.overlap_config, OverlapConfig):
            raise ValueError(
                f"overlap_config: expected an OverlapConfig, got {self.overlap_config!r}"
            )
        check_int(self.high_bandwith_domain_size, "high_bandwith_domain_size", minimum=1)
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic: expected a bool, got {self.deterministic!r}")


def plan_options(config: DistAttnConfig, *, same: bool, q_perm: bool, k_perm: bool) -> dict:
    """The core ``plan()`` keywords of ``config`` (``node_size`` aside: it comes from the
    group or mesh too). A side that is not permutable is dispatched ``sequential``; for
    self-attention either flag fixes both sides, since keys must be placed like queries."""
    kind = config.dispatch_config.alg.kind
    if same:
        options = {"dispatch": kind if (q_perm and k_perm) else "sequential"}
    else:
        options = {
            "dispatch": kind if q_perm else "sequential",
            "kv_dispatch": kind if k_perm else "sequential",
        }
    if isinstance(config.dispatch_config.alg, RandomDispatchAlg):
        options["dispatch_seed"] = config.dispatch_config.alg.seed
    if config.overlap_config.stages is not None:
        options["degree"] = config.overlap_config.stages
    return options
