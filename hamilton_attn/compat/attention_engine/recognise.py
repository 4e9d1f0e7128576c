"""Recognition: which known attention a user's ``score_mod`` and online function compute.

Nothing here reads source text. The online function is *run* (by the blockwise path's
own loop, in float64) on probe rows split into several key blocks, with rows that see
every key, rows whose first or last blocks are masked and a row that sees nothing, at
score spreads from 1.5 to 150, and its output is compared with softmax and with the
plain weighted sum ``sum_j x_ij v_j``.

The score_mod is not sampled (samples prove nothing between them): it is run once on
symbols (:mod:`.forms`), which gives its exact expression in the score when it is one
of ``c x + d``, ``cap * tanh(c x / cap)`` (plus a constant), ``sigmoid(c x + d)`` (also
spelt ``0.5 * tanh(...) + 0.5``) or ``relu(c x)``, and ``positional`` / ``function``
otherwise (the engine then runs it as written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import at_positions, run_online, visible_from_intervals
from .forms import read_form
from .symbolic import unwrap, wrap

_TOL = 1e-9


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = _TOL) -> bool:
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


# -- the online function -----------------------------------------------------------------


def _probe_rows():
    """Visibility of 6 probe rows over 11 keys (blocks of 4): all keys; keys 0-2 (its
    later blocks empty); keys 5-10 (its first block empty); none; a scattered subset;
    the last key only."""
    lo = torch.tensor([[0, 0, 5, 0, 1, 10], [0, 0, 0, 0, 7, 0]])
    hi = torch.tensor([[10, 2, 10, -1, 3, 10], [-1, -1, -1, -1, 8, -1]])
    return lo, hi


def classify_online(online, init) -> str | None:
    """``"softmax"``, ``"identity"`` (``out_i = sum_j x_ij v_j``) or None (neither)."""
    gen = torch.Generator().manual_seed(1234)
    lo, hi = _probe_rows()
    vis_block = visible_from_intervals(lo, hi)
    vis = vis_block(0, 11)
    matches = {"softmax": True, "identity": True}
    for spread in (1.5, 12.0, 150.0):
        x = torch.randn(1, 2, 6, 11, generator=gen, dtype=torch.float64) * spread
        v = torch.randn(1, 2, 11, 3, generator=gen, dtype=torch.float64)

        def score_block(k0, k1, rows, x=x):
            blk = x[:, :, :, k0:k1]
            return blk if rows is None else blk.index_select(2, rows)

        with torch.no_grad():
            out = run_online(online, init, score_block, vis_block, v, torch.arange(6), block=4)
        xm = x.masked_fill(~vis, -math.inf)
        p = torch.softmax(xm, -1).nan_to_num(0.0)
        matches["softmax"] &= _close(out, p @ v)
        matches["identity"] &= _close(out, x.masked_fill(~vis, 0.0) @ v)
    for kind, ok in matches.items():
        if ok:
            return kind
    return None


# -- the score_mod -----------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreFit:
    """What a score_mod is, exactly: ``kind`` one of ``affine`` (``c x + d``),
    ``sigmoid`` (``sigmoid(c x + d)``), ``relu`` (``relu(c x)``), ``softcap`` (``cap *
    tanh(c x / cap)`` plus a constant), ``function`` (anything else) or ``positional``
    (it reads b, h, q_idx, kv_idx or a custom input that varies)."""

    kind: str
    c: float = 1.0
    d: float = 0.0
    cap: float | None = None


def custom_constants(custom_values: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Each custom input's value when all its entries are equal, else None (one host
    synchronisation for all of them)."""
    if not custom_values:
        return {}
    ends = []
    for t4 in custom_values.values():
        flat = t4.detach().flatten()
        flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        ends.append(torch.stack(torch.aminmax(flat)).double())
    got = torch.stack([e.to(ends[0].device) for e in ends]).tolist()
    return {n: (lo if lo == hi else None) for n, (lo, hi) in zip(custom_values, got)}


def classify_score_mod(score_mod, custom, constants: dict[str, float | None]) -> ScoreFit:
    """The :class:`ScoreFit` of ``score_mod(score, custom_fwd_inputs, b, h, q_idx,
    kv_idx)`` with custom inputs ``constants`` (:func:`custom_constants`); None is
    ``x``."""
    if score_mod is None:
        return ScoreFit("affine", 1.0, 0.0)
    f = read_form(score_mod, custom, constants)
    if f.kind == "affine":
        return ScoreFit("affine", f.c, f.d)
    if f.kind == "sigmoid" and f.a == 1.0 and f.e == 0.0:
        return ScoreFit("sigmoid", f.c, f.d)
    if f.kind == "tanh" and f.a == 0.5 and f.e == 0.5:  # 0.5 tanh(y) + 0.5 = sigmoid(2y)
        return ScoreFit("sigmoid", 2.0 * f.c, 2.0 * f.d)
    if f.kind == "tanh" and f.d == 0.0 and f.a != 0.0:
        # a tanh(c x) = |a| tanh(a c x / |a|); a constant e cancels in a softmax.
        return ScoreFit("softcap", f.a * f.c, 0.0, abs(f.a))
    if f.kind == "relu" and f.e == 0.0 and f.a > 0.0:
        return ScoreFit("relu", f.a * f.c)
    return ScoreFit("positional" if f.kind == "positional" else "function")


def check_score_mod(score_mod, custom, custom_values, sizes, device, dtype) -> None:
    """ValueError when ``score_mod`` fails on a small probe: scores of ``dtype`` on
    ``device`` (q's: tensors the function closes over live there) at the first and last
    b, h, q_idx, kv_idx of the problem ``sizes = (B, H, Sq, Sk)``."""
    if score_mod is None:
        return
    ends = [torch.tensor(sorted({0, max(n - 1, 0)}), device=device) for n in sizes]
    b, h, qi, kj = (t.view([-1 if i == j else 1 for j in range(4)]) for i, t in enumerate(ends))
    shape = tuple(t.numel() for t in ends)
    s = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    vals = {}
    for name, t4 in custom_values.items():
        val = at_positions(t4, b, h, qi, kj).to(device)
        vals[name] = wrap(val.to(dtype) if val.is_floating_point() else val)
    try:
        got = score_mod(wrap(s), custom.bound(vals), wrap(b), wrap(h), wrap(qi), wrap(kj))
        torch.broadcast_to(unwrap(got, like=s), s.shape)
    except Exception as err:  # noqa: BLE001 - any failure is the user's score_mod
        raise ValueError(f"score_mod: failed on probe scores: {type(err).__name__}: {err}") from err
