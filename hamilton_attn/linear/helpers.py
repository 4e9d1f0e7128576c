"""Named forms on :func:`.api.linear_attention`: retention, simple GLA, Mamba2's SSD.

Each maps its model's parameters onto the one primitive (a log decay ``g`` per head or
per token and head, keys, queries, values, a scale) and takes the same keywords
(``plan=``, ``cu_seqlens=``, ``initial_state=``, ``return_final_state=``, ``backend=``,
``strategy=``), so each runs on one device or under context parallelism alike. Their
own argument checks raise under a plan on every rank, as ``linear_attention``'s do
(:func:`.api.raise_on_every_rank`).

Legend: B batch, S tokens, H heads, K key dim, V value dim; Mamba2's names: P head dim
(V), N state dim (K), G groups of B / C; tensors bshd.
"""

from __future__ import annotations

import torch

from .api import exchange_device, linear_attention, raise_on_every_rank
from .chunked import compute_dtype


def retnet_decay(heads: int, device=None) -> torch.Tensor:
    """RetNet's per-head decays ``gamma_h = 1 - 2 ** (-5 - h)``, h = 0..H-1 (Sun et al.
    2023, "Retentive Network", section 2.2; flash-linear-attention's retention uses the
    same), float32 ``[H]``."""
    return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32, device=device))


def retention(q, k, v, decay=None, **kwargs):
    """Retention: ``S_t = gamma_h S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, one
    constant decay per head.

    ``q, k [B, S, H, K]``, ``v [B, S, H, V]``; ``decay`` ``[H]`` decays in ``(0, 1]``
    (differentiable; default :func:`retnet_decay`). RetNet's group norm, gating and
    rotation of q, k (xPos) belong to the layer around it, not here. Other keywords as
    :func:`linear_attention` (``scale`` default ``K ** -0.5``)."""
    if isinstance(q, torch.Tensor) and q.dim() == 4 and decay is None:
        decay = retnet_decay(q.shape[2], q.device)
    if problem := _retention_problem(q, decay):
        raise_on_every_rank(problem, kwargs.get("plan"), exchange_device(q, k, v))
    # The log in the compute dtype: float64 inputs keep a float64 decay.
    return linear_attention(q, k, v, torch.log(decay.to(compute_dtype(q.dtype))), **kwargs)


def _retention_problem(q, decay) -> str | None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return "q: expected a 4-d bshd tensor [B, S, H, K]"
    if not isinstance(decay, torch.Tensor) or tuple(decay.shape) != (q.shape[2],):
        return f"decay: expected a tensor [H] = ({q.shape[2]},) of per-head decays"
    if not bool(((decay > 0) & (decay <= 1)).all()):
        return "decay: expected per-head decays in (0, 1] (gamma, not its log)"
    return None


def simple_gla(q, k, v, g, **kwargs):
    """Simple gated linear attention (flash-linear-attention's ``simple_gla``, Gated
    Retention): a data-dependent scalar gate per token and head, ``g [B, S, H]`` the log
    of the decay (``<= 0``, e.g. ``F.logsigmoid(x @ W) / 16``). GLA proper, with a gate per
    key channel, is not this primitive. Keywords as :func:`linear_attention`."""
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        problem = f"g: simple_gla takes a per-token log gate [B, S, H], got {shape}"
        raise_on_every_rank(problem, kwargs.get("plan"), exchange_device(q, k, v))
    return linear_attention(q, k, v, g, **kwargs)


def ssd(x, dt, A, B, C, *, D=None, initial_state=None, return_final_state=False, **kwargs):
    """Mamba2's state-space dual with a scalar ``A`` per head::

        h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t      (h_t [N, P] per head)
        y_t = C_t h_t (+ D x_t)

    i.e. ``linear_attention(q=C, k=B, v=x * dt, g=dt * A, scale=1)``.

    Args:
        x: ``[B, S, H, P]``; dt: ``[B, S, H]`` step sizes ``>= 0`` (after softplus and
            dt_bias); A: ``[H]`` ``<= 0`` (``-exp(A_log)``).
        B, C: ``[B, S, G, N]``, G groups dividing H (head h reads group ``h // (H / G)``).
        D: optional ``[H]`` skip.
        initial_state: ``[N_seq, H, P, N]`` (Mamba2's ``ssm_state`` layout).
        return_final_state: also return the final state ``[N_seq, H, P, N]``.
        Other keywords (``plan``, ``cu_seqlens``, ``backend``, ``strategy``) as
        :func:`linear_attention`.

    Returns ``y [B, S, H, P]`` in x's dtype, or ``(y, final_state)``.
    """
    if problem := _ssd_problem(x, dt, A, B, C, D, initial_state):
        raise_on_every_rank(problem, kwargs.get("plan"), exchange_device(C, B, x))
    rep = x.shape[2] // B.shape[2]
    q, k = C.repeat_interleave(rep, dim=2), B.repeat_interleave(rep, dim=2)
    v = (x * dt[..., None]).to(x.dtype)
    g = dt.float() * A.float() if x.dtype != torch.float64 else dt.double() * A.double()
    h0 = None if initial_state is None else initial_state.transpose(-1, -2)
    res = linear_attention(q, k, v, g, scale=1.0, initial_state=h0,
                           return_final_state=return_final_state, **kwargs)  # fmt: skip
    y, final = res if return_final_state else (res, None)
    if D is not None:
        y = y + (x * D[:, None]).to(y.dtype)
    return (y, final.transpose(-1, -2)) if return_final_state else y


def _ssd_problem(x, dt, A, B, C, D, initial_state=None) -> str | None:
    """What is wrong with :func:`ssd`'s model arguments (shapes, dtypes, signs), or None."""
    for t, name in ((x, "x"), (dt, "dt"), (A, "A"), (B, "B"), (C, "C")):
        if not isinstance(t, torch.Tensor):
            return f"{name}: expected a tensor, got {type(t).__name__}"
    if x.dim() != 4:
        return f"x: expected [B, S, H, P], got shape {tuple(x.shape)}"
    b, s, h, _ = x.shape
    if tuple(dt.shape) != (b, s, h):
        return f"dt: expected [B, S, H] = {(b, s, h)}, got {tuple(dt.shape)}"
    if tuple(A.shape) != (h,):
        return f"A: expected [H] = ({h},), got {tuple(A.shape)}"
    if B.dim() != 4 or B.shape != C.shape or B.shape[:2] != (b, s):
        return f"B, C: expected [B, S, G, N] alike, got {tuple(B.shape)}, {tuple(C.shape)}"
    groups = B.shape[2]
    if groups == 0 or h % groups:
        return f"B, C: {groups} groups must divide the {h} heads"
    if B.dtype != x.dtype or C.dtype != x.dtype:
        return f"B, C: expected x's dtype {x.dtype}, got {B.dtype}, {C.dtype}"
    if not bool((A <= 0).all()):
        return "A: expected A <= 0 per head (the decay exp(dt * A) must be <= 1)"
    if not bool(((dt >= 0) & torch.isfinite(dt)).all()):
        return "dt: expected finite step sizes >= 0 (after softplus)"
    if D is not None and (not isinstance(D, torch.Tensor) or tuple(D.shape) != (h,)):
        return f"D: expected None or a tensor [H] = ({h},)"
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        return f"initial_state: expected None or a tensor, got {type(initial_state).__name__}"
    return None
