"""The blockwise path: a user's online function run as written, one key block at a time.

Exact for any online function (it is the function's own arithmetic), differentiable by
autograd through every block, and slow: plain torch matmuls per block, and autograd
keeps each block's scores for the backward (``O(B H Sq Sk)`` memory in all, as an
unfused attention). Only online functions the recogniser does not know run here.

Rules that keep the user's code free of special cases (what a fused kernel does with
branches):

* a row that sees no key of a block is left out of that block (its row scales and
  ``o`` are untouched), so ``online_fwd`` never meets a row of masked scores and an
  initial ``m = -inf`` is never subtracted from itself;
* inside a block, masked scores are replaced by the row's largest visible score before
  ``online_fwd`` (so elementwise maths on them stays finite and their gradient is 0),
  reductions (``get_reduce``) skip them, and their weights are set to 0;
* rows that see no key at all skip the epilogue and get ``out = 0`` (the library's
  convention for empty rows).

Legend: B batch, H query heads, S/R rows, N keys of a block, D / DV head dims.
"""

from __future__ import annotations

import math

import torch

from .online import OnlineFunc
from .symbolic import SymbolicArray, SymbolScalar, unwrap, wrap

#: Keys per block of the blockwise path.
DEFAULT_BLOCK = 128


def _call(fn, what: str, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(f"{what}: failed while evaluating: {type(err).__name__}: {err}") from err


def _row_value(x, like_BHR1: torch.Tensor, name: str) -> torch.Tensor:
    t = unwrap(x, like=like_BHR1)
    try:
        return torch.broadcast_to(t, like_BHR1.shape)
    except RuntimeError as err:
        raise ValueError(
            f"online_func: {name} must be one value per row (shape {list(like_BHR1.shape)}), "
            f"got shape {list(t.shape)}"
        ) from err


def _pick(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows ``rows`` (dim 2) of ``t``; all of them for None."""
    return t if rows is None else t.index_select(2, rows)


def run_online(
    online: OnlineFunc,
    init: dict[str, float],
    score_block,
    visible_block,
    v_BHKD: torch.Tensor,
    q_pos_R: torch.Tensor,
    *,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """``out [B, H, R, DV]`` of ``online`` over the keys of ``v_BHKD`` (already one value
    head per query head), in blocks of ``block`` keys.

    ``score_block(k0, k1, rows)`` returns the score_mod'ed scores ``[B, H, R', N]`` of
    rows ``rows`` (an index tensor, or None for all); ``visible_block(k0, k1)`` the bool
    ``[R, N]`` visibility; ``q_pos_R`` the rows' global indices (given to the user's
    methods as ``q_idx``)."""
    b_, h_, nk, dv = v_BHKD.shape
    r = q_pos_R.numel()
    ct, dev = v_BHKD.dtype, v_BHKD.device
    b_idx = wrap(torch.arange(b_, device=dev).view(-1, 1, 1, 1))
    h_idx = wrap(torch.arange(h_, device=dev).view(1, -1, 1, 1))
    state = {n: torch.full((b_, h_, r, 1), val, dtype=ct, device=dev) for n, val in init.items()}
    o = torch.zeros(b_, h_, r, dv, dtype=ct, device=dev)
    seen = torch.zeros(r, dtype=torch.bool, device=dev)
    neg_inf = torch.full((), -math.inf, dtype=ct, device=dev)
    for k0 in range(0, nk, block):
        k1 = min(nk, k0 + block)
        vis = visible_block(k0, k1)
        any_r = vis.any(1)
        if not bool(any_r.any()):
            continue
        rows = None if bool(any_r.all()) else torch.nonzero(any_r).flatten()
        vis_r = vis if rows is None else vis[rows]
        s = score_block(k0, k1, rows)
        fill = torch.where(vis_r, s, neg_inf).amax(-1, keepdim=True).detach()
        scores = SymbolicArray("scores", torch.where(vis_r, s, fill), visible=vis_r)
        q_idx = wrap(q_pos_R.view(1, 1, -1, 1) if rows is None else q_pos_R[rows].view(1, 1, -1, 1))
        mine = {n: SymbolScalar(n, _pick(t, rows)) for n, t in state.items()}
        got = _call(online.online_fwd, "online_func.online_fwd", scores, mine, b_idx, h_idx, q_idx)
        if not (isinstance(got, tuple) and len(got) == 3):
            raise ValueError(
                "online_func.online_fwd: must return (scores, online_rowscales, o_scale)"
            )
        w, new_state, o_scale = got
        if not isinstance(new_state, dict) or set(new_state) != set(init):
            raise ValueError(
                f"online_func.online_fwd: must return the row scales {sorted(init)}, got "
                f"{sorted(new_state) if isinstance(new_state, dict) else type(new_state).__name__}"
            )
        like_row = _pick(o[..., :1], rows)
        w = torch.broadcast_to(unwrap(w, like=s), s.shape)
        w = torch.where(vis_r, w, torch.zeros((), dtype=ct, device=dev))
        o_r = _pick(o, rows) * _row_value(o_scale, like_row, "o_scale") + w @ v_BHKD[:, :, k0:k1]
        new = {n: _row_value(new_state[n], like_row, f"online_rowscales[{n!r}]") for n in init}
        if rows is None:
            o, state = o_r, new
        else:
            o = o.index_copy(2, rows, o_r)
            state = {n: state[n].index_copy(2, rows, new[n]) for n in init}
        seen = seen | any_r
    if not bool(seen.any()):
        return o
    rows = None if bool(seen.all()) else torch.nonzero(seen).flatten()
    q_idx = wrap(q_pos_R.view(1, 1, -1, 1) if rows is None else q_pos_R[rows].view(1, 1, -1, 1))
    mine = {n: SymbolScalar(n, _pick(t, rows)) for n, t in state.items()}
    got = _call(
        online.online_fwd_epilogue,
        "online_func.online_fwd_epilogue",
        wrap(_pick(o, rows)),
        mine,
        b_idx,
        h_idx,
        q_idx,
    )
    if not (isinstance(got, tuple) and len(got) == 2):
        raise ValueError("online_func.online_fwd_epilogue: must return (o, final_rowscales)")
    o_fin = torch.broadcast_to(unwrap(got[0], like=o), _pick(o, rows).shape)
    if rows is None:
        return o_fin
    return torch.zeros_like(o).index_copy(2, rows, o_fin)


def visible_from_intervals(lo_RS: torch.Tensor, hi_RS: torch.Tensor):
    """``visible_block(k0, k1)`` for rows whose visible keys are ``lo[r] <= k <= hi[r]``
    for some slot r (:meth:`hamilton_attn.Mask.row_intervals`, int64 ``[slots, S]``)."""

    def visible_block(k0: int, k1: int) -> torch.Tensor:
        kk = torch.arange(k0, k1, device=lo_RS.device)
        return ((lo_RS[:, :, None] <= kk) & (kk <= hi_RS[:, :, None])).any(0)

    return visible_block


def at_positions(t4: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """``t4[b, h, q_idx, kv_idx]`` of a 4-d tensor broadcast against ``[B, H, Sq, Sk]``
    (a dim of size 1 is read at 0; indices are clamped, so a probe past the end reads
    the last entry)."""
    idx = []
    for x, n in zip((b, h, q_idx, kv_idx), t4.shape):
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        x = x.to(device=t4.device, dtype=torch.long)
        idx.append(torch.zeros_like(x) if n == 1 else x.clamp(0, n - 1))
    return t4[tuple(idx)]


def blockwise_attention(
    q_BHSD: torch.Tensor,
    k_BHKD: torch.Tensor,
    v_BHKD: torch.Tensor,
    lo_RS: torch.Tensor,
    hi_RS: torch.Tensor,
    q_pos_S: torch.Tensor,
    score_mod,
    custom,
    custom_values: dict[str, torch.Tensor],
    online: OnlineFunc,
    init: dict[str, float],
    *,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Attention of queries ``q_BHSD`` (global positions ``q_pos_S``) against all keys,
    ``score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx)`` on the raw ``q . k``
    (None: unchanged), rows' visible keys from ``lo_RS, hi_RS``. Inputs already in the
    compute dtype, k / v with one head per query head. Returns ``[B, H, S, DV]``."""
    b_, h_ = q_BHSD.shape[:2]
    dev = q_BHSD.device
    b_idx = torch.arange(b_, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(h_, device=dev).view(1, -1, 1, 1)

    def score_block(k0: int, k1: int, rows):
        q = q_BHSD if rows is None else q_BHSD.index_select(2, rows)
        s = q @ k_BHKD[:, :, k0:k1].transpose(-1, -2)
        if score_mod is None:
            return s
        qi = (q_pos_S if rows is None else q_pos_S[rows]).view(1, 1, -1, 1)
        kj = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
        vals = {}
        for name, t4 in custom_values.items():
            val = at_positions(t4, b_idx, h_idx, qi, kj)
            vals[name] = wrap(val.to(s.dtype) if val.is_floating_point() else val)
        got = _call(
            score_mod,
            "score_mod",
            wrap(s),
            custom.bound(vals),
            wrap(b_idx),
            wrap(h_idx),
            wrap(qi),
            wrap(kj),
        )
        return torch.broadcast_to(unwrap(got, like=s), s.shape)

    return run_online(
        online,
        init,
        score_block,
        visible_from_intervals(lo_RS, hi_RS),
        v_BHKD,
        q_pos_S,
        block=block,
    )
