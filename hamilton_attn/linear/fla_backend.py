"""flash-linear-attention (``fla-core``) for the local chunks of linear attention on CUDA.

One entry point, :func:`fla_local`, around ``fla.ops.simple_gla.chunk_simple_gla``
(written against fla-core 0.6.0, :data:`FLA_VERSION`; ``pip install
'hamilton-attn[linear]'``). Every other use of fla in the project goes through this
file, so a change in fla's signature is fixed here once.

Conventions, ours against fla's (none needs a copy except where said):

- layout: ours is ``bshd`` (q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``); fla 0.6 takes
  ``[B, T, H, K]`` only (``head_first`` was removed), the same thing.
- gate: ``g`` ``[B, S, H]``, float32, the natural log of the per-token decay (<= 0).
  fla's ``g`` is the same quantity: it takes the running sum inside each 64-token chunk
  itself (``chunk_local_cumsum``, then a 1/ln 2 factor to use exp2), so the output is
  ``o_t = scale * q_t . sum_{s <= t} exp(G_t - G_s) k_s^T v_s`` with ``G`` the running
  sum of ``g``, and the state recurrence ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` (the
  initial state is decayed by the first token's gate too). A constant decay ``[H]``
  goes to fla's ``g_gamma`` (no copy, no expansion, and no gradient: fla returns none
  for it, so a ``g`` ``[H]`` that requires grad is refused).
- scale: passed explicitly (fla's default, ``Dk ** -0.5``, is also ours).
- packed documents: ``cu_seqlens`` ``[N + 1]`` with ``B == 1`` (fla refuses other
  batches); fla wants int64, so it is cast, and a CPU ``cu_seqlens`` is also handed to
  fla as its CPU copy, which saves fla a device-to-host sync when it builds its chunk
  index.
- states: ``[N or B, H, Dk, Dv]`` (fla's default ``state_v_first=False`` layout). fla
  loads the initial state in any dtype and computes in float32; the final state comes
  back float32, its gradient float32 (autograd casts it to the initial state's dtype).
- output: fla returns ``o`` in q's dtype.

Gradients flow through fla's own ``autograd.Function`` to q, k, v, g and the initial
state (and from the final state's gradient). **One refusal to know about**: fla 0.6.0
raises in the backward of a per-token gate on Hopper GPUs (H100 / H200) with Triton in
``[3.4.0, 3.7.1)`` -- a Triton code-generation bug gave wrong ``dk`` / ``dg`` there
(fla-org/flash-linear-attention issue 640) -- which includes the GPU image's torch
2.11 / Triton 3.6. :func:`fla_unsupported_reason` says so before any kernel runs, so a
caller can fall back to the plain-torch path instead of failing in the backward; the
forward, and a constant decay's backward, are unaffected.

fla's kernels do not run under ``TRITON_INTERPRET=1`` (its kernels call ``.to`` on loop
counters, which are plain ints in the interpreter, and its autotuner needs a GPU
driver), so off CUDA :func:`fla_available` is False and fla is not even imported.
"""

from __future__ import annotations

import functools
import re

import torch

FLA_VERSION = "0.6.0"  # the fla-core version this wrapper was written and checked against
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _load():
    """``(chunk_simple_gla, gated_backward_refused, problem)``: fla imported once.

    Any failure (fla missing, or its import-time GPU queries failing) is kept as
    ``problem`` rather than raised: CPU users and machines without fla never see it.
    """
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # any import failure means "not available"
        return None, False, f"fla-core is not importable ({type(err).__name__}: {err})"
    # The condition of fla 0.6.0's guard in chunk_bwd_dqkwg (fla/ops/common/chunk_o.py),
    # computed here rather than read from fla's module flags, which differ by version.
    hopper = torch.cuda.get_device_capability()[0] == 9
    refused = hopper and (3, 4, 0) <= _triton_version_tuple() < (3, 7, 1)
    return chunk_simple_gla, refused, None


def _triton_version_tuple() -> tuple[int, ...]:
    import triton

    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])


def fla_available(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA device and fla-core imports (checked once)."""
    return torch.device(device).type == "cuda" and _load()[2] is None


def fla_unsupported_reason(
    q: torch.Tensor, g: torch.Tensor | None, *, needs_grad: bool
) -> str | None:
    """Why :func:`fla_local` cannot run this call (None when it can).

    ``needs_grad``: a backward will follow. Checks the device, fla's import, the dtype,
    a constant gate that requires grad, and fla's Hopper refusal of the gated backward.
    """
    if q.device.type != "cuda":
        return f"fla needs CUDA, got {q.device}"
    fn, gated_bwd_refused, problem = _load()
    if fn is None:
        return problem
    if q.dtype not in _DTYPES:
        return f"fla runs float16 / bfloat16 / float32, got {q.dtype}"
    if g is not None and g.dim() == 1 and g.requires_grad:
        return "fla has no gradient for a constant decay [H] (its g_gamma)"
    if needs_grad and g is not None and g.dim() == 3 and gated_bwd_refused:
        return (
            "fla-core refuses the backward of a per-token gate on Hopper with Triton "
            f"{'.'.join(map(str, _triton_version_tuple()))} (< 3.7.1; fla issue 640)"
        )
    return None


def fla_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar-gated linear attention of one local chunk through fla, ``bshd``.

    q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]`` (one dtype); ``g`` the log decay per
    token, float32, ``[B, S, H]`` (<= 0; not checked here), or ``[H]`` for a constant
    decay without gradient, or None (no decay); ``scale`` multiplies q . k;
    ``cu_seqlens`` None or an integer tensor ``[N + 1]`` (0, ..., S) of document starts,
    with ``B == 1``; ``initial_state`` None (zeros) or ``[N or B, H, Dk, Dv]``.

    Returns ``(o, final_state)``: ``o`` ``[B, S, H, Dv]`` in q's dtype and the state after
    each sequence's last token, float32 ``[N or B, H, Dk, Dv]``. Differentiable (fla's
    autograd) in q, k, v, ``g`` ``[B, S, H]`` and ``initial_state``. Raises
    RuntimeError with :func:`fla_unsupported_reason`'s text when fla cannot run it.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
    )
    reason = fla_unsupported_reason(q, g, needs_grad=needs_grad)
    if reason is not None:
        raise RuntimeError(reason)
    chunk_simple_gla = _load()[0]
    cu, cu_cpu = None, None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
        if cu_seqlens.device.type == "cpu":
            cu_cpu = cu_seqlens.to(torch.long)
    constant = g is not None and g.dim() == 1
    o, final_state = chunk_simple_gla(
        q,
        k,
        v,
        g=None if constant else g,
        g_gamma=g if constant else None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=cu,
        cu_seqlens_cpu=cu_cpu,
    )
    return o, final_state
