"""FlashAttention tiling statistics of a configuration, and per-device memory of a
context-parallel plan (pure Python).

The tiling numbers follow the usual FlashAttention accounting (as in the
``tensorlogic-trustformers`` FlashAttention statistics): a query block of ``Br`` rows
and a KV block of ``Bc`` rows hold, in on-chip SRAM, Q (``Br x d``), K and V
(``Bc x d`` each), the score tile S (``Br x Bc``) and the output accumulator O
(``Br x d``); counts are in *elements* (multiply by the dtype's bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .cost import Shapes, memory_per_device


@dataclass(frozen=True)
class FlashAttentionConfig:
    """A FlashAttention configuration.

    Attributes:
        d_model: model width; must be a multiple of ``n_heads``.
        n_heads: attention heads.
        block_size_q: query rows per tile (Br), default 128.
        block_size_kv: key/value rows per tile (Bc), default 128.
        causal: causal masking (does not change the counts below).
        dropout: probability in [0, 1].
        max_seq_len: for memory estimates, default 4096.
    """

    d_model: int
    n_heads: int
    block_size_q: int = 128
    block_size_kv: int = 128
    causal: bool = False
    dropout: float = 0.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_heads <= 0:
            raise ValueError("n_heads: must be positive")
        if self.d_model <= 0:
            raise ValueError("d_model: must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads: {self.n_heads} does not divide d_model {self.d_model} into heads"
            )

    @property
    def d_k(self) -> int:
        """Dimension per head."""
        return self.d_model // self.n_heads

    def with_block_sizes(self, block_q: int, block_kv: int) -> FlashAttentionConfig:
        return replace(self, block_size_q=block_q, block_size_kv=block_kv)

    def validate(self) -> None:
        """Raise ValueError on zero block sizes or a dropout outside [0, 1]."""
        if self.block_size_q <= 0 or self.block_size_kv <= 0:
            raise ValueError("block sizes: must be positive")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout: must be between 0 and 1, got {self.dropout}")

    def sram_usage_per_block(self) -> int:
        """Elements on chip per tile: Q + K + V + S + O = ``2 Br d + 2 Bc d + Br Bc``."""
        br, bc, d = self.block_size_q, self.block_size_kv, self.d_k
        return br * d + bc * d + bc * d + br * bc + br * d

    def memory_savings(self, seq_len: int) -> float:
        """1 - (FlashAttention memory / materialised-scores memory), per head, in elements:
        standard ``N^2 + N d`` (scores and output), flash ``N d + SRAM tile``."""
        standard = seq_len * seq_len + seq_len * self.d_k
        flash = seq_len * self.d_k + self.sram_usage_per_block()
        return 1.0 - flash / standard

    def num_kv_passes(self, seq_len: int) -> int:
        """KV tiles each query tile walks over: ``ceil(N / Bc)``."""
        return math.ceil(seq_len / self.block_size_kv)

    def num_q_blocks(self, seq_len: int) -> int:
        """Query tiles: ``ceil(N / Br)``."""
        return math.ceil(seq_len / self.block_size_q)


#: name -> (Br, Bc): the five presets.
PRESETS: dict[str, tuple[int, int]] = {
    "Standard": (128, 128),
    "Large Blocks": (256, 256),
    "Small Blocks": (64, 64),
    "A100 Optimized": (128, 64),
    "H100 Optimized": (128, 128),
}

#: short keys accepted by :func:`preset_config`.
PRESET_KEYS = {
    "standard": "Standard",
    "large": "Large Blocks",
    "small": "Small Blocks",
    "a100": "A100 Optimized",
    "h100": "H100 Optimized",
}


def preset_config(preset: str, d_model: int, n_heads: int) -> FlashAttentionConfig:
    """A configuration with a preset's block sizes (``standard``, ``large``, ``small``,
    ``a100``, ``h100`` or the preset's display name)."""
    name = PRESET_KEYS.get(preset.lower(), preset)
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESET_KEYS)}, got {preset!r}")
    bq, bkv = PRESETS[name]
    return FlashAttentionConfig(d_model, n_heads, bq, bkv)


@dataclass(frozen=True)
class FlashAttentionStats:
    """Statistics of a configuration at one sequence length."""

    config: FlashAttentionConfig
    seq_len: int
    memory_savings: float
    sram_usage: int  # elements
    num_kv_passes: int
    num_q_blocks: int

    @classmethod
    def from_config(cls, config: FlashAttentionConfig, seq_len: int) -> FlashAttentionStats:
        return cls(
            config,
            seq_len,
            config.memory_savings(seq_len),
            config.sram_usage_per_block(),
            config.num_kv_passes(seq_len),
            config.num_q_blocks(seq_len),
        )

    def summary(self) -> str:
        c = self.config
        return (
            "Flash Attention Statistics\n"
            f"  d_model: {c.d_model}\n  n_heads: {c.n_heads}\n"
            f"  block_size_q: {c.block_size_q}\n  block_size_kv: {c.block_size_kv}\n"
            f"  causal: {str(c.causal).lower()}\n"
            f"  memory savings: {self.memory_savings * 100:.1f}%\n"
            f"  SRAM usage: {self.sram_usage} elements\n"
            f"  num_kv_passes: {self.num_kv_passes}\n  num_q_blocks: {self.num_q_blocks}\n"
            f"  seq_len: {self.seq_len}"
        )


def cp_memory(
    seqlen: int,
    world_size: int,
    schedule: str = "ring",
    shapes: Shapes | None = None,
    *,
    peak_kv_tokens: float | None = None,
) -> dict[str, float]:
    """Per-device forward memory (bytes) of a context-parallel plan: local tensors and
    received KV buffers (``peak_kv_tokens``; default the schedule's buffer budget:
    2 shards, ``allgather`` W - 1, ``line`` 4)."""
    shapes = shapes or Shapes()
    local = -(-seqlen // world_size)
    if peak_kv_tokens is None:
        budget = {"allgather": max(world_size - 1, 1), "line": 4.0}.get(schedule, 2.0)
        peak_kv_tokens = budget * local
    total = memory_per_device(local, shapes, peak_kv_tokens)
    buffers = peak_kv_tokens * shapes.kv_bytes_per_token
    return {"local_tokens": local, "kv_buffers": buffers, "local": total - buffers, "total": total}


def plan_memory(plan, shapes: Shapes | None = None) -> dict[str, float]:
    """:func:`cp_memory` of a built :class:`~hamilton_attn.planner.plans.Plan`, with the
    verifier's peak buffer of the plan's rank."""
    rep = plan.report
    peak = rep.peak_buffer_tokens[plan.rank] if rep.peak_buffer_tokens else 0
    return cp_memory(
        plan.placement.padded_len,
        plan.world_size,
        plan.schedule.name,
        shapes,
        peak_kv_tokens=peak,
    )
