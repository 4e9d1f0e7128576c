"""The plain-torch local path of scalar-gated linear attention: chunked, exact, stable.

The recurrence (flash-linear-attention's convention), per sequence and head::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t        (S_{-1} = the initial state, or 0)
    o_t = scale * q_t S_t

Chunked form: every sequence is cut into chunks of at most ``C`` tokens that never cross
a sequence boundary (a sequence's last chunk may be short; its empty slots hold zeros).
Inside a chunk, with ``Gc`` the running sum of g from the chunk's start (inclusive)::

    o_t = scale * (sum_{s <= t} (q_t . k_s) exp(Gc_t - Gc_s) v_s + q_t exp(Gc_t) E_c)

where ``E_c`` is the state entering chunk c. Every exponent is a difference
``Gc_t - Gc_s`` with ``s <= t`` (or ``Gc_t`` itself), a sum of log decays, so it is
``<= 0``: no exp of a positive number, no ``exp(G) * exp(-G)`` factorisation. Across
chunks, ``E_{c+1} = a_c E_c + M_c`` with ``a_c = exp(Gc_last)`` and
``M_c = sum_s exp(Gc_last - Gc_s) k_s^T v_s``; the scan runs over chunk index within a
sequence, all sequences at once (as many steps as the longest sequence has chunks).

Memory: the chunk tensors copy q, k, v once; the decay and score blocks hold
``T * H * C`` numbers each; the states ``n * H * K * V`` (n chunks): the chunks' own and
those entering them (the scan copies neither where chunks are already in level order,
and keeps only each sequence's last exit). Sequences shorter
than ``C`` still take a whole chunk (many one-token documents pad to ``C`` slots each).

Legend: B batch, S tokens per batch row, T = B * S flat tokens, N sequences, n chunks,
C chunk size, H heads, K key dim (Dk), V value dim (Dv).
"""

from __future__ import annotations

import torch

#: Tokens per chunk of the torch path (flash-linear-attention's default, 64).
CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the precision of gates, sums and states."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_table(cu: list[int], chunk: int):
    """Per chunk, on the CPU: first token, length, sequence, index within its sequence;
    and per sequence, its last chunk."""
    cu_t = torch.tensor(cu, dtype=torch.int64)
    lens = cu_t[1:] - cu_t[:-1]
    per_seq = (lens + chunk - 1) // chunk
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    first = torch.cumsum(per_seq, 0) - per_seq
    j = torch.arange(len(seq)) - first[seq]
    start = cu_t[seq] + j * chunk
    length = torch.minimum(cu_t[seq + 1] - start, torch.tensor(chunk))
    return start, length, seq, j, first + per_seq - 1


def _scan(a_nH, m_nHKV, seq, j, init_NHKV):
    """States entering each chunk, ``E_c`` (the sequence's initial state at its first
    chunk), ``[n, H, K, V]``, and the state leaving each sequence's last chunk,
    ``X_c = a_c E_c + M_c``, ``[N, H, K, V]``; one step per chunk index."""
    n = len(seq)
    levels = [torch.nonzero(j == i).flatten() for i in range(int(j.max()) + 1)]
    has_next = torch.zeros(n, dtype=torch.bool)
    has_next[:-1] = seq[1:] == seq[:-1]
    dev = m_nHKV.device
    if init_NHKV is None:
        e = m_nHKV.new_zeros((len(levels[0]), *m_nHKV.shape[1:]))
    else:
        e = init_NHKV.to(m_nHKV.dtype)[seq[levels[0]].to(dev)]
    # Chunks in level order once, then split into views: indexing the full tensors per
    # level would cost each level's backward a zeroed full-size gradient (quadratic).
    # One sequence (or one chunk per sequence) is already in level order: no copies.
    order_cpu = torch.cat(levels)
    in_order = bool((order_cpu == torch.arange(n)).all())
    order = order_cpu.to(dev)
    sizes = [len(lev) for lev in levels]
    m_lev = torch.split(m_nHKV if in_order else m_nHKV[order], sizes)
    a_lev = torch.split(a_nH if in_order else a_nH[order], sizes)
    enters, ends, finals = [e], [], []
    for i, lev in enumerate(levels):
        x = a_lev[i][..., None, None] * e + m_lev[i]
        last = ~has_next[lev]
        if bool(last.any()):  # only a sequence's last chunk's exit is returned
            ends.append(seq[lev][last])
            finals.append(x if bool(last.all()) else x[last.to(dev)])
        if i + 1 < len(levels):
            e = x[has_next[lev].to(dev)]
            enters.append(e)
    enter = torch.cat(enters)
    if not in_order:
        enter = enter[torch.argsort(order)]
    final = torch.cat(finals)
    if len(finals) > 1:
        final = final[torch.argsort(torch.cat(ends)).to(dev)]
    return enter, final


def chunked_local(q, k, v, g, scale, cu_seqlens=None, initial_state=None, *, chunk=CHUNK):
    """Scalar-gated linear attention on one device, plain torch, differentiable.

    The local-backend interface: ``(q, k, v, g, scale, cu_seqlens, initial_state) ->
    (o, final_state)``.

    Args:
        q, k: ``[B, S, H, K]``; v ``[B, S, H, V]`` (bshd).
        g: ``[B, S, H]`` log decays (<= 0), float32 (float64 for float64 inputs).
        scale: the output scale.
        cu_seqlens: None (each batch row is one sequence) or ``[N + 1]`` int64 sequence
            starts (B must be 1); states reset at each start.
        initial_state: None or ``[N, H, K, V]`` (N = B without cu_seqlens): the state
            before each sequence's first token.

    Returns ``o`` ``[B, S, H, V]`` in q's dtype and ``final_state`` ``[N, H, K, V]`` (the
    state after each sequence's last token) in float32 (float64 for float64 inputs).
    """
    b, s, h, _ = q.shape
    dv = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    if cu_seqlens is None:
        cu = [i * s for i in range(b + 1)]
    else:
        cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    start, length, seq, j, _ = _chunk_table(cu, chunk)
    slot = torch.arange(chunk)
    valid = slot < length[:, None]
    idx = torch.where(valid, start[:, None] + slot, 0).to(q.device)
    valid = valid.to(q.device)

    def chunks(x):  # [T, H, ...] -> [n, H, C, ...], empty slots zero
        x = x.reshape(b * s, *x.shape[2:]).to(cdt)[idx]
        x = x * valid.view(*valid.shape, *([1] * (x.dim() - 2)))
        return x.transpose(1, 2)

    q_c, k_c, v_c, g_c = chunks(q), chunks(k), chunks(v), chunks(g)  # g_c [n, H, C]
    # Running sums and their differences in float64: a float32 difference of two sums
    # of up to C terms loses ~C ulps of the decay, 16x the recurrence's own error.
    gcum64 = g_c.double().cumsum(-1)
    gcum = gcum64.to(cdt)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp(Gc_t - Gc_s) for s <= t; the masked side (positive exponents) never reaches exp.
    diff = (gcum64[..., :, None] - gcum64[..., None, :]).to(cdt)
    decay = diff.masked_fill(~causal, float("-inf")).exp()
    o_c = ((q_c @ k_c.transpose(-1, -2)) * decay) @ v_c
    g_last = gcum[..., -1]  # empty slots add 0: the sum up to the chunk's last token
    tail = (gcum64[..., -1:] - gcum64).to(cdt).exp()
    m = (k_c * tail[..., None]).transpose(-1, -2) @ v_c
    init = None if initial_state is None else initial_state.to(cdt)
    enter, final = _scan(g_last.exp(), m, seq, j, init)
    o_c = (o_c + (q_c * gcum.exp()[..., None]) @ enter) * scale
    o = o_c.transpose(1, 2).reshape(-1, h, dv)[valid.reshape(-1)]
    return o.reshape(b, s, h, dv).to(q.dtype), final
