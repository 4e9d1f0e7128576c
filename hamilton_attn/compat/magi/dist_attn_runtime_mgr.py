"""MagiAttention's runtime key (``magi_attention.dist_attn_runtime_mgr``) and the one
place that remembers the most recent key.

MagiAttention keeps a runtime manager per key in a process-wide LRU dict and answers
``get_most_recent_key()`` from it. Here the key itself holds everything (the plan), so
all that is left to remember is which key came last: :data:`RECENT_KEY` holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...planner.plans import Plan

__all__ = ["RECENT_KEY", "DistAttnRuntimeKey", "RecentKey", "check_key"]


@dataclass(frozen=True)
class DistAttnRuntimeKey:
    """What :func:`dispatch`, :func:`calc_attn` and :func:`undispatch` need: the plan
    and the sequence bookkeeping. Frozen and hashable; equal arguments to the key
    functions give equal keys (the plan is cached).

    Attributes:
        plan: the core :class:`hamilton_attn.Plan` over the padded sequence.
        total_seqlen_q, total_seqlen_k: the unpadded global lengths.
        pad_size, kv_pad_size: tokens appended to the query / key side by this module.
        chunk_size: the dispatch chunk size (None: the core's default).
        is_same_source, is_q_permutable, is_k_permutable: as given.
        degree, node_size: the groupcast options used (None: the core's choice / flat).
    """

    plan: Plan
    total_seqlen_q: int
    total_seqlen_k: int
    pad_size: int
    kv_pad_size: int
    chunk_size: int | None
    is_same_source: bool
    is_q_permutable: bool
    is_k_permutable: bool
    degree: int | None
    node_size: int | None

    @property
    def cp_group(self):
        return self.plan.group

    @property
    def cp_size(self) -> int:
        return self.plan.world_size

    def _side(self, role: str) -> tuple[int, int, int]:
        """``(total, padded by us, local length)`` of the ``q`` or ``kv`` side."""
        if role == "q":
            total, pad, local = self.total_seqlen_q, self.pad_size, self.plan.local_len
        elif role == "kv":
            total, pad = self.total_seqlen_k, self.kv_pad_size
            local = self.plan.kv_placement.local_len
        else:
            raise ValueError(
                f"role: expected 'q' (query side) or 'kv' (key/value side), got {role!r}"
            )
        return total, total + pad, local


class RecentKey:
    """The runtime key this process built or used last (None before any).

    One per process, like MagiAttention's runtime dict: every key function records the
    key it returns, and dispatch / calc_attn / undispatch / get_position_ids the key
    they are given. It keeps that key (and so its plan and group) alive until the next
    one, or :meth:`clear` (e.g. before ``destroy_process_group``).
    """

    __slots__ = ("_key",)

    def __init__(self) -> None:
        self._key: DistAttnRuntimeKey | None = None

    def record(self, key: DistAttnRuntimeKey) -> DistAttnRuntimeKey:
        self._key = key
        return key

    def get(self) -> DistAttnRuntimeKey | None:
        return self._key

    def clear(self) -> None:
        self._key = None


RECENT_KEY = RecentKey()


def check_key(key) -> DistAttnRuntimeKey:
    """``key`` if it is a runtime key (recorded as the most recent), else ValueError."""
    if not isinstance(key, DistAttnRuntimeKey):
        raise ValueError(
            f"key: expected a DistAttnRuntimeKey (from magi_attn_*_key / *_dispatch), "
            f"got {type(key).__name__}"
        )
    return RECENT_KEY.record(key)
