"""MagiAttention's distributed entry points (``magi_attention.api.magi_attn_interface``):
the key functions, dispatch / calc_attn / undispatch, position ids and the most recent
key, on the core's :func:`hamilton_attn.plan` and its dispatch / calc_attn / undispatch.
"""

from __future__ import annotations

import inspect

import torch

from .... import api as _core
from .._args import check_int, check_optional_ints, check_unsupported, flag, is_int, lse_dtype
from .._groups import resolve_group
from ..common.mask import mask_from_ranges
from ..common.ranges import as_rects
from ..config import DistAttnConfig, plan_options
from ..dist_attn_runtime_mgr import RECENT_KEY, DistAttnRuntimeKey, check_key
from .functools import compute_pad_size, infer_attn_mask_from_cu_seqlens, pad_at_dim

__all__ = [
    "calc_attn",
    "dispatch",
    "get_most_recent_key",
    "get_position_ids",
    "magi_attn_flex_dispatch",
    "magi_attn_flex_key",
    "magi_attn_varlen_dispatch",
    "magi_attn_varlen_key",
    "undispatch",
]


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


def _padding(total_q: int, total_k: int, pad_size, chunk_size, w: int, same: bool):
    """``(query pad, key pad)``. This module pads, not the core, so that ``pad_size``
    means what MagiAttention says (more than the least is honoured); with ``chunk_size``
    the core's chunks then tile the padded length and it adds none. Without
    ``chunk_size`` nothing is padded here and the core pads to its own chunks."""

    def least(n: int) -> int:
        return 0 if chunk_size is None else compute_pad_size(n, w, None, chunk_size)

    if pad_size is not None and chunk_size is not None and (total_q + pad_size) % (w * chunk_size):
        raise ValueError(
            f"pad_size: total_seqlen_q + pad_size = {total_q + pad_size} must be a "
            f"multiple of cp_size * chunk_size = {w} x {chunk_size} (compute_pad_size("
            f"{total_q}, {w}, head_dim, {chunk_size}) = {least(total_q)})"
        )
    pad_q = least(total_q) if pad_size is None else pad_size
    return pad_q, pad_q if same else least(total_k)


def magi_attn_flex_key(
    x: torch.Tensor | None,
    q_ranges,
    k_ranges,
    attn_mask_type,
    total_seqlen_q: int,
    total_seqlen_k: int,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    dist_attn_config: DistAttnConfig | None = None,
    is_same_source: bool = True,
    is_q_permutable: bool = True,
    is_k_permutable: bool = True,
    *,
    seq_dim: int | None = None,
) -> tuple[torch.Tensor | None, DistAttnRuntimeKey]:
    """Build the runtime key of a mask given as rectangles; return ``(x padded, key)``.

    Args:
        x: the global query-source tensor ``(T, ...)`` (or ``(B, T, ...)``), or None.
        q_ranges, k_ranges: :class:`AttnRanges`, lists of ``(start, end)`` or int tensors
            ``[n, 2]``; rectangle i is ``q_ranges[i] x k_ranges[i]``.
        attn_mask_type: one of ``full | causal | inv_causal | bi_causal`` (str,
            :class:`AttnMaskType` or 0..3) for all rectangles, or one per rectangle.
        total_seqlen_q, total_seqlen_k: the global sequence lengths (mask rows, columns).
        head_dim: accepted, unused. pad_size, chunk_size: see the package docstring.
        cp_group: the process group (None with ``cp_mesh=None``: the default group, or one
            process when torch.distributed is not initialised). cp_mesh: a 1-d or 2-d
            ``DeviceMesh`` instead of ``cp_group`` (2-d: hierarchical).
        dist_attn_config: :class:`DistAttnConfig` (default: min-heap dispatch, one stage).
        is_same_source, is_q_permutable, is_k_permutable: see the package docstring.
        seq_dim: x's sequence dim (default: 0 if its size there is ``total_seqlen_q``,
            else 1).

    Returns ``(x padded with pad_size zero tokens at the end, key)`` (x None: None).
    Every rank of the group must call this with equal arguments.
    """
    check_int(total_seqlen_q, "total_seqlen_q")
    check_int(total_seqlen_k, "total_seqlen_k")
    check_optional_ints(head_dim=(head_dim, 1), pad_size=(pad_size, 0), chunk_size=(chunk_size, 1))
    config = DistAttnConfig() if dist_attn_config is None else dist_attn_config
    if not isinstance(config, DistAttnConfig):
        raise ValueError(f"dist_attn_config: expected a DistAttnConfig, got {config!r}")
    same = flag(is_same_source, "is_same_source")
    q_perm = flag(is_q_permutable, "is_q_permutable")
    k_perm = flag(is_k_permutable, "is_k_permutable")
    if same and total_seqlen_q != total_seqlen_k:
        raise ValueError(
            f"total_seqlen_k: is_same_source=True needs total_seqlen_q == total_seqlen_k, "
            f"got {total_seqlen_q} and {total_seqlen_k} (use is_same_source=False for "
            "cross-attention)"
        )
    rects = as_rects(q_ranges, k_ranges, attn_mask_type, "attn_mask_type")
    group, w, node_size = resolve_group(cp_group, cp_mesh, config.high_bandwith_domain_size)
    pad_q, pad_k = _padding(total_seqlen_q, total_seqlen_k, pad_size, chunk_size, w, same)
    mask = mask_from_ranges(*rects, total_seqlen_q + pad_q, total_seqlen_k + pad_k)
    options = plan_options(config, same=same, q_perm=q_perm, k_perm=k_perm)
    if node_size is not None:
        options["node_size"] = node_size
    p = _core.plan(mask, group, schedule="groupcast", chunk_size=chunk_size, **options)
    key = DistAttnRuntimeKey(
        plan=p,
        total_seqlen_q=total_seqlen_q,
        total_seqlen_k=total_seqlen_k,
        pad_size=pad_q,
        kv_pad_size=pad_k,
        chunk_size=chunk_size,
        is_same_source=same,
        is_q_permutable=q_perm,
        is_k_permutable=k_perm,
        degree=options.get("degree"),
        node_size=node_size,
    )
    RECENT_KEY.record(key)
    if x is None:
        return None, key
    total, padded, _ = key._side("q")
    dim = _find_seq_dim(x, seq_dim, (total, padded), "x")
    return pad_at_dim(x, dim, padded - x.shape[dim]), key


def magi_attn_varlen_key(
    x: torch.Tensor | None,
    cu_seqlens_q,
    cu_seqlens_k,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    causal: bool = False,
    dist_attn_config: DistAttnConfig | None = None,
    *,
    window_size=(-1, -1),
    seq_dim: int | None = None,
) -> tuple[torch.Tensor | None, DistAttnRuntimeKey]:
    """flash-attn varlen style: packed documents from ``cu_seqlens_q`` / ``cu_seqlens_k``
    (int tensors or lists), FULL or (``causal=True``) bottom-right CAUSAL in each, or a
    sliding ``window_size`` (see :func:`infer_attn_mask_from_cu_seqlens`);
    self-attention. Otherwise as :func:`magi_attn_flex_key`."""
    q_ranges, k_ranges, types, total_q, total_k = infer_attn_mask_from_cu_seqlens(
        cu_seqlens_q, cu_seqlens_k, causal=flag(causal, "causal"), window_size=window_size
    )
    return magi_attn_flex_key(
        x,
        q_ranges,
        k_ranges,
        types,
        total_q,
        total_k,
        head_dim=head_dim,
        pad_size=pad_size,
        chunk_size=chunk_size,
        cp_group=cp_group,
        cp_mesh=cp_mesh,
        dist_attn_config=dist_attn_config,
        seq_dim=seq_dim,
    )


def _key_then_dispatch(key_fn, name: str, doc: str):
    """``key_fn``'s ``*_dispatch`` twin, with its signature: the key, then
    :func:`dispatch` of the padded x (MagiAttention's ``*_dispatch`` are exactly that)."""
    signature = inspect.signature(key_fn)

    def key_then_dispatch(*args, **kwargs):
        x_padded, key = key_fn(*args, **kwargs)
        seq_dim = signature.bind(*args, **kwargs).arguments.get("seq_dim")
        return dispatch(x_padded, key, seq_dim=seq_dim), key

    key_then_dispatch.__name__ = key_then_dispatch.__qualname__ = name
    key_then_dispatch.__doc__ = doc
    x, *rest = signature.parameters.values()
    key_then_dispatch.__signature__ = signature.replace(
        parameters=[x.replace(annotation="torch.Tensor"), *rest],
        return_annotation="tuple[torch.Tensor, DistAttnRuntimeKey]",
    )
    return key_then_dispatch


magi_attn_flex_dispatch = _key_then_dispatch(
    magi_attn_flex_key,
    "magi_attn_flex_dispatch",
    """:func:`magi_attn_flex_key`, then :func:`dispatch` of x: returns ``(local_x, key)``
    with local_x ``((T + pad) / cp_size, ...)`` this rank's tokens (differentiable).""",
)

magi_attn_varlen_dispatch = _key_then_dispatch(
    magi_attn_varlen_key,
    "magi_attn_varlen_dispatch",
    """:func:`magi_attn_varlen_key`, then :func:`dispatch` of x: ``(local_x, key)``.""",
)


def get_most_recent_key() -> DistAttnRuntimeKey | None:
    """The key most recently built or used by this process (None before any): see
    :class:`~hamilton_attn.compat.magi.dist_attn_runtime_mgr.RecentKey`."""
    return RECENT_KEY.get()


# ---------------------------------------------------------------------------------------
# dispatch / calc_attn / undispatch
# ---------------------------------------------------------------------------------------


def _find_seq_dim(x: torch.Tensor, seq_dim: int | None, lengths: tuple[int, ...], name: str) -> int:
    """The sequence dim of x: ``seq_dim`` if given, else 0 (token-major, MagiAttention's
    layout) when x.shape[0] is one of ``lengths``, else 1 (batched) when x.shape[1] is."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    want = " or ".join(str(n) for n in sorted(set(lengths)))
    if seq_dim is not None:
        if not is_int(seq_dim) or not -x.dim() <= seq_dim < x.dim():
            raise ValueError(f"seq_dim: {seq_dim!r} is out of range for a {x.dim()}-d {name}")
        dim = seq_dim % x.dim()
        if x.shape[dim] not in lengths:
            raise ValueError(
                f"{name}: expected {want} tokens along seq_dim={dim}, got shape {tuple(x.shape)}"
            )
        return dim
    for dim in (0, 1):
        if dim < x.dim() and x.shape[dim] in lengths:
            return dim
    raise ValueError(
        f"{name}: expected {want} tokens along dim 0 (token-major) or dim 1 (batched), got "
        f"shape {tuple(x.shape)}"
    )


def _role_kw(key: DistAttnRuntimeKey, role: str) -> dict:
    """The core's ``role=`` keyword: none where K/V share the queries' placement."""
    key._side(role)  # validates
    if role == "q" or key.plan.kv_placement is key.plan.placement:
        return {}
    return {"role": "kv"}


def dispatch(
    x: torch.Tensor,
    key: DistAttnRuntimeKey,
    *,
    role: str = "q",
    seq_dim: int | None = None,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """This rank's tokens of the global tensor ``x`` (identical on every rank).

    ``x`` is ``(T, ...)`` or ``(T + pad_size, ...)`` (padded by the key functions), or
    batched ``(B, T, ...)``; the result is ``(T_local, ...)`` (``(B, T_local, ...)``).
    ``role="kv"`` dispatches the key/value source of a cross-attention key
    (``is_same_source=False``). Padding tokens hold ``pad_value``. Differentiable: x's
    gradient is the full gradient on every rank.
    """
    key = check_key(key)
    total, padded, _ = key._side(role)
    kw = _role_kw(key, role)
    dim = _find_seq_dim(x, seq_dim, (total, padded), "x")
    # The core pads to its own placement (nothing more when our padding already tiles
    # its chunks); it gets x padded to our length so that pad_size means Magi's.
    x_padded = pad_at_dim(x, dim, padded - x.shape[dim])
    local = _core.dispatch(x_padded, key.plan, seq_dim=dim, **kw)
    if pad_value != 0:
        pos = _core.get_position_ids(key.plan, device=local.device, **kw)
        shape = [1] * local.dim()
        shape[dim] = pos.numel()
        local = local.masked_fill((pos >= total).view(shape), pad_value)
    return local


def undispatch(
    x: torch.Tensor,
    key: DistAttnRuntimeKey,
    *,
    role: str = "q",
    seq_dim: int | None = None,
) -> torch.Tensor:
    """The global tensor ``(T, ...)`` (padding removed) from every rank's ``(T_local,
    ...)`` shard, on every rank; batched ``(B, T_local, ...)`` gives ``(B, T, ...)``.
    ``role="kv"`` for key-side shards of a cross-attention key. Differentiable."""
    key = check_key(key)
    total, _, local = key._side(role)
    kw = _role_kw(key, role)
    dim = _find_seq_dim(x, seq_dim, (local,), "x")
    full = _core.undispatch(x, key.plan, seq_dim=dim, **kw)
    return full.narrow(dim, 0, total)


def calc_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key: DistAttnRuntimeKey,
    sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention of this rank's local shards; differentiable.

    Args:
        q: ``(T_local, Hq, D)`` (MagiAttention's layout) or ``(B, T_local, Hq, D)``.
        k, v: ``(Tk_local, Hk, D)`` / ``(B, Tk_local, Hk, D)``, Hq % Hk == 0.
        key: from the dispatch / key functions.
        softmax_scale: default ``1 / sqrt(D)``.
        sink, softcap: unsupported (must be None / 0).

    Returns ``(out, lse)``: out like q; lse ``(T_local, Hq)`` (``(B, T_local, Hq)``),
    float32 (float64 for float64 inputs), -inf where a query sees no key.
    """
    key = check_key(key)
    check_unsupported(sink, softcap)
    dims = {t.dim() for t in (q, k, v)}
    if len(dims) != 1 or dims.pop() not in (3, 4):
        raise ValueError(
            "q, k, v: expected all (T_local, H, D) or all (B, T_local, H, D), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    token_major = q.dim() == 3
    if token_major:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out, lse = _core.calc_attn(q, k, v, key.plan, scale=softmax_scale, return_lse=True)
    lse = lse_dtype(lse.transpose(1, 2))  # [B, Hq, T] -> [B, T, Hq]: token-major
    if token_major:
        return out.squeeze(0), lse.squeeze(0)
    return out, lse


def get_position_ids(key: DistAttnRuntimeKey, *, role: str = "q", device=None) -> torch.Tensor:
    """Global position of each of this rank's local tokens (int64, ``(T_local,)``);
    padding tokens get positions ``>= total_seqlen``."""
    key = check_key(key)
    return _core.get_position_ids(key.plan, device=device, **_role_kw(key, role))
