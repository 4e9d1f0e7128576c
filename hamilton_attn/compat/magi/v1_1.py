"""MagiAttention 1.1's forms of the API, beside the seed's (``compat.magi``'s top level).

Porting code written for ``magi_attention`` 1.1::

    from hamilton_attn.compat.magi import v1_1 as magi_attention
    from hamilton_attn.compat.magi.v1_1 import magi_attn_varlen_key, calc_attn, dispatch

What changed from the seed's forms, and how it maps (legend: T tokens, Hq/Hk heads, D
head dim, W ranks):

* **Key functions take no ``x``** and take ``num_heads_q``, ``num_heads_kv``,
  ``head_dim``, ``pad_size`` and ``cp_group_or_mesh`` (a process group, a 1-d mesh, or a
  2-d ``(inter, intra)`` mesh) positionally, as 1.1 does. ``pad_size`` is deprecated
  there (padding follows the chunk size): a non-zero value warns and is ignored.
  ``chunk_size`` comes from the argument, else ``DispatchConfig(chunk_size=...)``.
  The heads are checked against every later ``calc_attn`` of the key.
* ``magi_attn_*_dispatch(x, ...)`` return ``(local_x, key)``; ``dispatch(x, key,
  pad_value)``, ``undispatch(x, key, is_partial_grad=False)`` (``True``, 1.1's reduce-
  scatter backward, is refused).
* ``calc_attn(q, k, v, key, sink=None, softmax_scale=None, softcap=0.0,
  return_max_logits=False)`` returns ``(out, AttnForwardMeta(lse, max_logits))``, lse
  ``(T_local, Hq)`` float32. ``sink`` ``(S_sink, Hq)`` (replicated) and ``softcap`` run
  as the core's ``Softmax(sink=..., softcap=...)`` variant where the core has variants:
  several sink tokens of a head are one sink logit, their logsumexp. ``max_logits``
  (``[Hq]``, the largest scaled score over the whole mask) is not computed: asking for it
  raises ValueError.
* ``AttnMaskType.from_int_type(i)`` / ``AttnMaskType.to_int_type(t)``: 0 FULL,
  1 CAUSAL, 2 INV_CAUSAL, 3 BI_CAUSAL; members are the core's (``AttnMaskType.CAUSAL``
  is ``hamilton_attn.AttnMaskType.CAUSAL``) and ``BICAUSAL`` / ``INVCAUSAL`` (1.1's
  spellings) are aliases.
* ``roll(x, shift, dim, key)`` / ``roll_simple``: ``undispatch -> torch.roll ->
  dispatch`` along the token dim 0 (differentiable; it gathers the global tensor, where
  1.1 sends only the shifted tokens); along any other dim a local ``torch.roll``.
* ``get_most_recent_key(cp_group)``, ``clear_cache(cp_group=None)``,
  ``get_position_ids(key)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ... import calc_attn as _core_calc_attn
from ...masks import AttnMaskType as _CoreMaskType
from ...runtime.comm import is_mesh
from .api import magi_attn_interface as _seed
from .config import DispatchConfig as _SeedDispatchConfig
from .config import DistAttnConfig
from .dist_attn_runtime_mgr import RECENT_KEY, DistAttnRuntimeKey, check_key

_INT_TYPES = (_CoreMaskType.FULL, _CoreMaskType.CAUSAL, _CoreMaskType.INV_CAUSAL,
              _CoreMaskType.BI_CAUSAL)  # fmt: skip


class _MaskTypeMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _CoreMaskType)

    def __iter__(cls):
        return iter(_CoreMaskType)

    def __call__(cls, value):
        return _CoreMaskType.parse(value, arg="attn_mask_type")


class AttnMaskType(metaclass=_MaskTypeMeta):
    """MagiAttention 1.1's ``AttnMaskType``: the core's members, with 1.1's int codes."""

    FULL = _CoreMaskType.FULL
    CAUSAL = _CoreMaskType.CAUSAL
    INV_CAUSAL = INVCAUSAL = _CoreMaskType.INV_CAUSAL
    BI_CAUSAL = BICAUSAL = _CoreMaskType.BI_CAUSAL

    @staticmethod
    def from_int_type(int_type: int) -> _CoreMaskType:
        """0 FULL, 1 CAUSAL, 2 INV_CAUSAL, 3 BI_CAUSAL."""
        if isinstance(int_type, bool) or not isinstance(int_type, int) or not 0 <= int_type < 4:
            raise ValueError(f"int_type: expected 0, 1, 2 or 3, got {int_type!r}")
        return _INT_TYPES[int_type]

    @staticmethod
    def to_int_type(mask_type) -> int:
        """The int code of a mask type (a member, or its name as a string)."""
        return _INT_TYPES.index(_CoreMaskType.parse(mask_type, arg="mask_type"))


@dataclass(frozen=True)
class DispatchConfig(_SeedDispatchConfig):
    """1.1's dispatch config: the seed's ``alg`` and the ``chunk_size`` tokens are cut
    into (None: the key function's argument, else the core's default)."""

    chunk_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        c = self.chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"chunk_size: expected a positive int or None, got {c!r}")


@dataclass
class AttnForwardMeta:
    """What 1.1's ``calc_attn`` returns beside ``out``: the local ``lse`` ``(T_local,
    Hq)`` float32 and ``max_logits`` (None: not computed here)."""

    lse: torch.Tensor | None
    max_logits: torch.Tensor | None


# Heads each key was made for (keys are hashable and equal for equal arguments).
_HEADS: dict = {}


def _group_kw(cp_group_or_mesh) -> dict:
    return (
        {"cp_mesh": cp_group_or_mesh}
        if is_mesh(cp_group_or_mesh)
        else {"cp_group": cp_group_or_mesh}
    )


def _common(num_heads_q, num_heads_kv, pad_size, dist_attn_config, chunk_size):
    for name, n in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {n!r}")
    if num_heads_q % num_heads_kv:
        raise ValueError(f"num_heads_kv: {num_heads_kv} must divide num_heads_q {num_heads_q}")
    if pad_size:
        warnings.warn(
            "pad_size is deprecated (MagiAttention 1.1): the padding follows chunk_size; "
            "the value given is ignored",
            DeprecationWarning,
            stacklevel=3,
        )
    config = DistAttnConfig() if dist_attn_config is None else dist_attn_config
    if chunk_size is None:
        chunk_size = getattr(config.dispatch_config, "chunk_size", None)
    return config, chunk_size


def magi_attn_varlen_key(cu_seqlens_q, cu_seqlens_k, num_heads_q: int, num_heads_kv: int,
                         head_dim: int, pad_size: int, cp_group_or_mesh, causal: bool = False,
                         window_size=(-1, -1), dist_attn_config: DistAttnConfig | None = None,
                         chunk_size: int | None = None) -> DistAttnRuntimeKey:  # fmt: skip
    """1.1's varlen key: documents ``cu_seqlens_q`` x ``cu_seqlens_k``, causal or windowed."""
    config, chunk_size = _common(num_heads_q, num_heads_kv, pad_size, dist_attn_config, chunk_size)
    _, key = _seed.magi_attn_varlen_key(
        None, cu_seqlens_q, cu_seqlens_k, head_dim=head_dim, chunk_size=chunk_size,
        causal=causal, dist_attn_config=config, window_size=window_size,
        **_group_kw(cp_group_or_mesh),
    )  # fmt: skip
    _HEADS[key] = (num_heads_q, num_heads_kv)
    return key


def magi_attn_flex_key(q_ranges, k_ranges, attn_mask_type, total_seqlen_q: int,
                       total_seqlen_k: int, num_heads_q: int, num_heads_kv: int, head_dim: int,
                       pad_size: int, cp_group_or_mesh,
                       dist_attn_config: DistAttnConfig | None = None,
                       is_same_source: bool = True, is_q_permutable: bool = True,
                       is_k_permutable: bool = True,
                       chunk_size: int | None = None) -> DistAttnRuntimeKey:  # fmt: skip
    """1.1's flex key: the union of rectangles ``q_ranges[i] x k_ranges[i]``."""
    config, chunk_size = _common(num_heads_q, num_heads_kv, pad_size, dist_attn_config, chunk_size)
    _, key = _seed.magi_attn_flex_key(
        None, q_ranges, k_ranges, attn_mask_type, total_seqlen_q, total_seqlen_k,
        head_dim=head_dim, chunk_size=chunk_size, dist_attn_config=config,
        is_same_source=is_same_source, is_q_permutable=is_q_permutable,
        is_k_permutable=is_k_permutable, **_group_kw(cp_group_or_mesh),
    )  # fmt: skip
    _HEADS[key] = (num_heads_q, num_heads_kv)
    return key


def magi_attn_varlen_dispatch(x, cu_seqlens_q, cu_seqlens_k, num_heads_q, num_heads_kv, head_dim,
                              pad_size, cp_group_or_mesh, causal=False, window_size=(-1, -1),
                              dist_attn_config=None, chunk_size=None):  # fmt: skip
    """:func:`magi_attn_varlen_key` then :func:`dispatch` of ``x``: ``(local_x, key)``."""
    key = magi_attn_varlen_key(cu_seqlens_q, cu_seqlens_k, num_heads_q, num_heads_kv, head_dim,
                               pad_size, cp_group_or_mesh, causal, window_size, dist_attn_config,
                               chunk_size)  # fmt: skip
    return dispatch(x, key), key


def magi_attn_flex_dispatch(x, q_ranges, k_ranges, attn_mask_type, total_seqlen_q, total_seqlen_k,
                            num_heads_q, num_heads_kv, head_dim, pad_size, cp_group_or_mesh,
                            dist_attn_config=None, is_same_source=True, is_q_permutable=True,
                            is_k_permutable=True, chunk_size=None):  # fmt: skip
    """:func:`magi_attn_flex_key` then :func:`dispatch` of ``x``: ``(local_x, key)``."""
    key = magi_attn_flex_key(q_ranges, k_ranges, attn_mask_type, total_seqlen_q, total_seqlen_k,
                             num_heads_q, num_heads_kv, head_dim, pad_size, cp_group_or_mesh,
                             dist_attn_config, is_same_source, is_q_permutable, is_k_permutable,
                             chunk_size)  # fmt: skip
    return dispatch(x, key), key


def dispatch(x: torch.Tensor, key: DistAttnRuntimeKey, pad_value: float = 0.0) -> torch.Tensor:
    """This rank's tokens of the global ``x`` ``(T, ...)``, padded with ``pad_value``."""
    return _seed.dispatch(x, key, pad_value=pad_value)


def undispatch(x: torch.Tensor, key: DistAttnRuntimeKey, is_partial_grad: bool = False):
    """The global tensor ``(T, ...)`` from every rank's local ``x``, padding removed."""
    if is_partial_grad:
        raise ValueError(
            "is_partial_grad: the reduce-scatter backward (partial gradients summed over "
            "ranks) is not supported; sum the gradients yourself"
        )
    return _seed.undispatch(x, key)


def roll(x: torch.Tensor, shift: int, dim: int, key: DistAttnRuntimeKey) -> torch.Tensor:
    """``torch.roll`` of the global tensor by ``shift`` along ``dim``, on local shards."""
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise ValueError(f"shift: expected an int, got {shift!r}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected a dim of x's {x.dim()}, got {dim!r}")
    if dim % x.dim() != 0:
        return torch.roll(x, shift, dim)  # not the token dim: nothing crosses ranks
    return dispatch(torch.roll(undispatch(x, key), shift, 0), key)


roll_simple = roll


def _sink_logit(sink, hq: int, q: torch.Tensor):
    if sink is None:
        return None
    if not isinstance(sink, torch.Tensor) or sink.dim() != 2 or sink.shape[1] != hq:
        got = tuple(sink.shape) if isinstance(sink, torch.Tensor) else type(sink).__name__
        raise ValueError(f"sink: expected a (num_sink_tokens, {hq}) tensor, got {got}")
    # Sink tokens add e^{sink} to each row's denominator and no value: one logit per head.
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.logsumexp(sink.to(device=q.device, dtype=torch.float64), dim=0).to(dtype)


def calc_attn(q, k, v, key: DistAttnRuntimeKey, sink=None, softmax_scale=None,
              softcap: float = 0.0, return_max_logits: bool = False):  # fmt: skip
    """1.1's ``calc_attn``: ``(out (T_local, Hq, D), AttnForwardMeta(lse (T_local, Hq),
    None))``; ``sink`` and ``softcap`` where the core has variants."""
    if return_max_logits:
        raise ValueError("return_max_logits: max_logits are not computed here")
    heads = _HEADS.get(key)
    if heads is not None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
        if q.dim() >= 2 and k.dim() >= 2 and (q.shape[-2], k.shape[-2]) != heads:
            raise ValueError(
                f"q, k: {q.shape[-2]} and {k.shape[-2]} heads, the key was made for "
                f"num_heads_q={heads[0]}, num_heads_kv={heads[1]}"
            )
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap: expected a number >= 0, got {softcap!r}")
    if sink is None and not softcap:
        out, lse = _seed.calc_attn(q, k, v, key, softmax_scale=softmax_scale)
        return out, AttnForwardMeta(lse=lse, max_logits=None)
    from inspect import signature

    if "variant" not in signature(_core_calc_attn).parameters:
        raise ValueError("sink, softcap: this hamilton_attn has no attention variants")
    from ...variants import Softmax

    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q: sink / softcap calls take token-major (T_local, Hq, D) tensors")
    key = check_key(key)
    variant = Softmax(softcap=float(softcap) or None, sink=_sink_logit(sink, q.shape[1], q))
    out, lse = _core_calc_attn(q[None], k[None], v[None], key.plan, scale=softmax_scale,
                               return_lse=True, variant=variant)  # fmt: skip
    return out[0], AttnForwardMeta(lse=lse[0].transpose(0, 1), max_logits=None)


def get_position_ids(key: DistAttnRuntimeKey) -> torch.Tensor:
    """Global position of each local token (``(T_local,)`` int64)."""
    return _seed.get_position_ids(key)


def get_most_recent_key(cp_group=None) -> DistAttnRuntimeKey:
    """The key built or used last in this process (ValueError if none)."""
    key = _seed.get_most_recent_key()
    if key is None:
        raise ValueError(f"cp_group: no dist-attn runtime key was made yet for {cp_group}")
    return key


def clear_cache(cp_group=None) -> None:
    """Forget the most recent key and the heads of every key (plans stay cached)."""
    RECENT_KEY.clear()
    _HEADS.clear()


__all__ = [
    "AttnForwardMeta",
    "AttnMaskType",
    "DispatchConfig",
    "calc_attn",
    "clear_cache",
    "dispatch",
    "get_most_recent_key",
    "get_position_ids",
    "magi_attn_flex_dispatch",
    "magi_attn_flex_key",
    "magi_attn_varlen_dispatch",
    "magi_attn_varlen_key",
    "roll",
    "roll_simple",
    "undispatch",
]
