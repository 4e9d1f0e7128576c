"""The oracle of scalar-gated linear attention: the recurrence itself, token by token.

Written from the definition only (nothing from :mod:`hamilton_attn.linear`)::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

per batch row and head, the state reset to the sequence's initial state (or zero) at
every sequence start. Differentiable: autograd through the loop gives the reference
gradients of q, k, v, g and the initial state.

Legend: B batch, S tokens, H heads, K key dim, V value dim; tensors bshd.
"""

from __future__ import annotations

import torch


def linear_recurrence_oracle(
    q, k, v, g=None, *, scale=None, cu_seqlens=None, initial_state=None, dtype=torch.float64
):
    """``(o [B, S, H, V], final_state [N, H, K, V])`` computed in ``dtype``.

    ``g`` is None, ``[H]`` (one log decay per head) or ``[B, S, H]``; ``scale`` defaults
    to ``K ** -0.5``; ``cu_seqlens`` (B = 1) lists sequence starts and the end, else each
    batch row is one sequence; ``initial_state`` is ``[N, H, K, V]`` (N sequences)."""
    b, s, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if g is None:
        g = torch.zeros(b, s, h, dtype=dtype)
    g = g.to(dtype).expand(b, s, h) if g.dim() == 1 else g.to(dtype)
    if cu_seqlens is None:  # each row its own sequence: the same starts in every row
        starts, n_seq = {0: 0}, b
    else:
        bounds = [int(x) for x in cu_seqlens]
        starts, n_seq = {t: i for i, t in enumerate(bounds[:-1])}, len(bounds) - 1
    zero = torch.zeros(b, h, dk, v.shape[-1], dtype=dtype)
    finals: list = [None] * n_seq
    state, outs, seq = zero, [], -1
    for t in range(s):
        if t in starts:
            if seq >= 0:
                finals[seq] = state
            seq = starts[t]
            if initial_state is None:
                state = zero
            elif cu_seqlens is None:
                state = initial_state.to(dtype)
            else:
                state = initial_state[seq].to(dtype).unsqueeze(0)
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        state = g[:, t].exp()[..., None, None] * state + kv
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    finals[seq] = state
    final = finals[0] if cu_seqlens is None else torch.cat(finals)
    return torch.stack(outs, dim=1), final
