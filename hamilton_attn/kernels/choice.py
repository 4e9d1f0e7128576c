"""The ``auto`` backend's choice among cuDNN calls (``sdpa``), one FlexAttention call
(``flex``) and one call of our Triton kernel (``triton``) for a plain-softmax block on
GPU, from a small cost model.

``sdpa`` runs a block as one op call per dense piece (two for a bottom-right causal
rectangle on cuDNN) and merges calls that share rows; ``flex`` runs it as one call
over the block-sparse mask at a lower rate. Few large pieces favour ``sdpa``, many
small ones ``flex``: the host needs about a tenth of a millisecond to issue each cuDNN
call, so a block of many small pieces is bound by the CPU, not the GPU.

Model, in seconds, for ``F`` flops (``4 B Hq D`` per visible pair):

- sdpa: ``max(n_calls * HOST_CALL + n_merges * HOST_MERGE,
  sum(F_call / CUDNN_RATE + GPU_CALL))``: host issue and GPU run overlap, the slower
  one sets the pace.
- flex: ``HOST_FLEX + F_blocks / FLEX_RATE * (1 + FLEX_PARTIAL * partial / blocks)``
  over flex's 128 x 128 blocks (it computes whole blocks too).
- triton: ``HOST_TRITON + F_tiles / TRITON_RATE * (1 + TRITON_PARTIAL * partial /
  tiles)``, ``F_tiles`` the flops of every tile the kernel visits (its work lists:
  whole tiles, so short documents cost their tiles' area, not their pairs), ``partial``
  the visited tiles that test their elements against the bands.

Constants from ``benchmarks/gpu_block_choice.py`` on one H200 (bf16, 32 heads, head dim
128; ``benchmarks/results/block_choice_H200_2026-11-30.md``): cuDNN runs large calls at 590-640
TF/s and costs 0.06-0.16 ms of host time per call. The flex and triton rates are fitted
to ``benchmarks/results/triton_H200_2026-12-02_s2.md`` (the three kernels in one run):
flex 411 TF/s dense causal 32K, 363 on long-tailed documents, 96 on 64-512-token
documents (most of its blocks partial); triton 503, 438 and 142 on the same.
"""

from __future__ import annotations

import functools

from ..masks import Mask

HOST_CALL = 85e-6
HOST_MERGE = 80e-6
GPU_CALL = 20e-6
CUDNN_RATE = 620e12
HOST_FLEX = 200e-6
FLEX_RATE = 415e12
FLEX_PARTIAL = 1.1
FLEX_BLOCK = 128
# The Triton kernel (bf16, head dim 128, forward): about 510 TF/s over the area of the
# tiles it visits (dense causal); 64-512-token documents, 60% of their 64 x 32 tiles
# partial, run at 211 over their tiles' area, hence the partial tiles' weight.
HOST_TRITON = 40e-6
TRITON_RATE = 510e12
TRITON_PARTIAL = 2.4


def sdpa_seconds(calls, per_pair: float, head_dim: int = 128) -> float:
    """Estimated time of a block run as ``calls`` (``sdpa.Call`` tuples; those of op
    ``triton``, the ``sdpa+triton`` kernel's, at the triton kernel's cost on their
    ``sub`` mask, host and GPU alike)."""
    from .sdpa import call_pairs

    seen: list[tuple[int, int]] = []
    merges = 0
    host = gpu = 0.0
    for c in calls:
        if any(c.q0 < b and a < c.q1 for a, b in seen):
            merges += 1
        seen.append((c.q0, c.q1))
        if c.sub is not None:
            host += HOST_TRITON
            gpu += triton_seconds(c.sub, per_pair, head_dim) - HOST_TRITON
        else:
            host += HOST_CALL
            gpu += per_pair * call_pairs(c) / CUDNN_RATE + GPU_CALL
    return max(host + merges * HOST_MERGE, gpu)


def flex_seconds(mask: Mask, per_pair: float) -> float:
    from .triton.tiles import tile_counts

    blocks, partial = tile_counts(mask, FLEX_BLOCK, FLEX_BLOCK)
    if blocks == 0:
        return HOST_FLEX
    area = blocks * FLEX_BLOCK * FLEX_BLOCK
    return HOST_FLEX + per_pair * area / FLEX_RATE * (1 + FLEX_PARTIAL * partial / blocks)


@functools.lru_cache(maxsize=4096)
def prefer_sdpa(mask: Mask, calls: tuple, per_pair: float) -> bool:
    """True when ``calls`` on cuDNN should beat one flex call on ``mask`` (cached)."""
    return sdpa_seconds(calls, per_pair) <= flex_seconds(mask, per_pair)


def triton_seconds(mask: Mask, per_pair: float, head_dim: int) -> float:
    from .triton import forward_work

    tiles, partial, area = forward_work(mask, head_dim)
    if tiles == 0:
        return HOST_TRITON
    return HOST_TRITON + per_pair * area / TRITON_RATE * (1 + TRITON_PARTIAL * partial / tiles)


@functools.lru_cache(maxsize=4096)
def choose(
    mask: Mask,
    calls: tuple | None,
    per_pair: float,
    head_dim: int,
    flex: bool,
    triton: bool,
    mixed: tuple | None = None,
) -> str | None:
    """The backend expected to finish first among those that can run the block:
    ``sdpa`` (when ``calls`` is not None), ``flex``, ``triton``, ``sdpa+triton`` (when
    ``mixed``, its calls, is not None); None if none can (cached)."""
    cands = []
    if calls is not None:
        cands.append((sdpa_seconds(calls, per_pair), "sdpa"))
    if mixed is not None:
        cands.append((sdpa_seconds(mixed, per_pair, head_dim), "sdpa+triton"))
    if triton:
        cands.append((triton_seconds(mask, per_pair, head_dim), "triton"))
    if flex:
        cands.append((flex_seconds(mask, per_pair), "flex"))
    return min(cands)[1] if cands else None


__all__ = ["choose", "flex_seconds", "prefer_sdpa", "sdpa_seconds", "triton_seconds"]
