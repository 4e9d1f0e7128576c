"""The one place where partial attention results are combined.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``
with ``out`` of shape ``[..., S, D]`` and ``lse`` of shape ``[..., S]`` (natural log),
combine to::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

computed in float32 (float64 for float64 inputs) with the larger lse factored out. A row that saw no key has
``lse = -inf`` and contributes nothing; if both are ``-inf`` the row stays ``out = 0``,
``lse = -inf`` (no NaN).
"""

from __future__ import annotations

import warnings

import torch

from . import config


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for partial results of ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor):
    lse_max = torch.maximum(lse_a, lse_b)
    # Rows where both are -inf: use 0 as the pivot so the exps below give 0, not NaN.
    safe_max = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    wa = torch.exp(lse_a - safe_max)
    wb = torch.exp(lse_b - safe_max)
    total = wa + wb
    lse = safe_max + torch.log(total)  # log(0) = -inf for empty rows
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    return lse, wa * inv, wb * inv


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results; returns ``(out, lse)`` in the accumulator dtype."""
    dt = acc_dtype(torch.promote_types(out_a.dtype, out_b.dtype))
    lse, wa, wb = _weights(lse_a.to(dt), lse_b.to(dt))
    out = out_a.to(dt) * wa.unsqueeze(-1) + out_b.to(dt) * wb.unsqueeze(-1)
    return out, lse


def _merge_into(acc_out, acc_lse, out, lse) -> None:
    # The math runs in acc_lse's dtype (float32 or float64) whatever acc_out's dtype.
    dt = acc_lse.dtype
    new_lse, wa, wb = _weights(acc_lse, lse.to(dt))
    acc_out.copy_(acc_out.to(dt) * wa.unsqueeze(-1) + out.to(dt) * wb.unsqueeze(-1))
    acc_lse.copy_(new_lse)


_compiled_merge = None
_compile_failed = False


def _fused_merge(acc_out, acc_lse, out, lse) -> bool:
    """The merge as one compiled kernel on CUDA (an eager merge makes several passes over
    the float32 accumulator: about 4x slower, GPU_FACTS). False if unavailable."""
    global _compiled_merge, _compile_failed
    if _compile_failed or not config.get().compile_merge:
        return False
    try:
        if _compiled_merge is None:
            # dynamic=None: one recompile with symbolic shapes, so the many block shapes
            # of a plan do not exhaust dynamo's recompile limit.
            _compiled_merge = torch.compile(_merge_into, dynamic=None)
        _compiled_merge(acc_out, acc_lse, out, lse)
        return True
    except Exception as err:  # noqa: BLE001 - fall back to the eager merge, once
        _compile_failed = True
        warnings.warn(
            f"hamilton_attn: compiled merge unavailable ({type(err).__name__}: {err}); "
            "using the eager merge",
            stacklevel=3,
        )
        return False


def merge_(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """In place: fold ``(out, lse)`` into the accumulators ``acc_out``, ``acc_lse`` (float32,
    or float64)."""
    if acc_out.dtype not in (torch.float32, torch.float64) or acc_lse.dtype != acc_out.dtype:
        raise ValueError(
            "acc_out, acc_lse: expected float32 (or float64) accumulators of one "
            f"dtype, got {acc_out.dtype}, {acc_lse.dtype}"
        )
    if acc_out.is_cuda and _fused_merge(acc_out, acc_lse, out, lse):
        return
    new_lse, wa, wb = _weights(acc_lse, lse.to(acc_lse.dtype))
    acc_out.mul_(wa.unsqueeze(-1)).add_(out.to(acc_out.dtype) * wb.unsqueeze(-1))
    acc_lse.copy_(new_lse)


def merge_last_(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Like :func:`merge_`, for an ``acc_out`` in the inputs' own dtype (say bfloat16)
    that holds one block's unmerged output: the merge is computed in float32 and
    rounded once into ``acc_out``. This gives the same numbers as converting to a
    float32 accumulator, merging and rounding at the end, without the float32 passes
    (the executor uses it for a rank's last merge when nothing was merged before)."""
    if acc_lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"acc_lse: expected float32 (or float64), got {acc_lse.dtype}")
    if not (acc_out.is_cuda and _fused_merge(acc_out, acc_lse, out, lse)):
        _merge_into(acc_out, acc_lse, out, lse)


def merge_many(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine any number of partial results at once (one exp per part)."""
    if not parts:
        raise ValueError("parts: expected at least one (out, lse) pair")
    dt = acc_dtype(parts[0][0].dtype)
    lses = torch.stack([lse.to(dt) for _, lse in parts])
    lse_max = lses.max(dim=0).values
    safe_max = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - safe_max)
    total = w.sum(dim=0)
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    out = sum(o.to(dt) * (wi * inv).unsqueeze(-1) for (o, _), wi in zip(parts, w))
    return out, safe_max + torch.log(total)


__all__ = ["acc_dtype", "merge", "merge_", "merge_last_", "merge_many"]
