"""Argument checks of the mask builders: ranges, lengths, windows, offsets, blocks."""

from __future__ import annotations

import torch


def _as_range(value, arg: str, limit: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg}: expected a (start, end) pair of ints, got {value!r}") from None
    if not 0 <= a <= b <= limit:
        raise ValueError(f"{arg}: expected 0 <= start <= end <= {limit}, got ({a}, {b})")
    return a, b


def _check_lens(seqlen_q, seqlen_k, name_q: str = "seqlen_q") -> int:
    """Validate sequence lengths before they reach range checks; returns seqlen_k."""
    for name, val in ((name_q, seqlen_q), ("seqlen_k", seqlen_k)):
        if val is None and name == "seqlen_k":
            continue
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    return seqlen_q if seqlen_k is None else seqlen_k


def _check_window(window, arg: str = "window") -> tuple[int, int]:
    """flash-attn's ``(left, right)`` window as two ints, each >= -1 (-1: unbounded)."""
    try:
        left, right = (int(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"{arg}: expected (left, right) ints, got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{arg}: expected each side >= -1 (-1 = unbounded), got {window!r}")
    return left, right


def _check_cu_seqlens(cu, arg: str) -> list[int]:
    if isinstance(cu, torch.Tensor):
        cu = cu.tolist()
    try:
        vals = [int(x) for x in cu]
    except (TypeError, ValueError):
        raise ValueError(f"{arg}: expected a sequence of ints, got {cu!r}") from None
    if len(vals) < 1 or vals[0] != 0:
        raise ValueError(f"{arg}: expected a non-empty sequence starting at 0, got {vals[:8]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{arg}: expected non-decreasing offsets, got {vals[:8]}...")
    return vals


def _block_bounds(seqlen: int, block_size) -> list[int]:
    if isinstance(block_size, int):
        if block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        bounds = list(range(0, seqlen, block_size)) + [seqlen]
    else:
        sizes = [int(s) for s in block_size]
        if any(s < 0 for s in sizes) or sum(sizes) != seqlen:
            raise ValueError(f"block_size: expected non-negative sizes summing to {seqlen}")
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
    return bounds
