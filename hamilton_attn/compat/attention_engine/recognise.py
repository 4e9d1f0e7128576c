"""Recognition: which known attention a user's ``score_mod`` and online function compute.

Nothing here reads source text. The online function is *run* (by the blockwise path's
own loop, in float64) on probe rows split into several key blocks, with rows that see
every key, rows whose first or last blocks are masked and a row that sees nothing, and
its output is compared with softmax and with the plain weighted sum ``sum_j x_ij v_j``.
The score_mod is evaluated on probe scores at probe positions (b, h, q_idx, kv_idx
spread over the problem, custom inputs bound): if it does not depend on the position it
is a function ``g(x)`` of the raw score, fitted against ``c x + d``, ``sigmoid(c x +
d)``, ``relu(c x)`` and ``cap * tanh(c x / cap)`` and accepted when the fit holds at
every probe to float64 precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import at_positions, run_online, visible_from_intervals
from .symbolic import unwrap, wrap

_TOL = 1e-9
_PROBE_X = torch.tensor(
    [-4.0, -2.5, -1.3, -1.0, -0.7, -0.2, -0.03, 0.0, 0.05, 0.3, 0.5, 1.0, 2.0, 3.0, 5.5],
    dtype=torch.float64,
)


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
    for spread in (1.5, 12.0):
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
    """What a score_mod is: ``kind`` one of ``affine`` (``c x + d``), ``sigmoid``
    (``sigmoid(c x + d)``), ``relu`` (``relu(c x)``), ``softcap`` (``cap * tanh(c x /
    cap)``), ``function`` (another function of the score alone) or ``positional``
    (depends on b, h, q_idx, kv_idx or on custom inputs that vary)."""

    kind: str
    c: float = 1.0
    d: float = 0.0
    cap: float | None = None


def _probe_positions(sizes, gen, n: int = 64):
    b_, h_, sq, sk = sizes
    cols = [torch.randint(0, max(m, 1), (n,), generator=gen) for m in sizes]
    pos = torch.stack(cols, 1)
    pos[0] = 0
    pos[1] = torch.tensor([b_ - 1, h_ - 1, max(sq - 1, 0), max(sk - 1, 0)])
    return [pos[:, i].view(-1, 1) for i in range(4)]


def evaluate_score_mod(score_mod, custom, custom_values, sizes, x: torch.Tensor):
    """``G [P, X]``: the score_mod on float64 scores ``x`` at probe positions."""
    gen = torch.Generator().manual_seed(4321)
    b, h, qi, kj = _probe_positions(sizes, gen)
    vals = {}
    for name, t4 in custom_values.items():
        val = at_positions(t4, b, h, qi, kj).cpu()
        vals[name] = wrap(val.double() if val.is_floating_point() else val)
    s = x.view(1, -1).expand(b.shape[0], -1).clone()
    try:
        got = score_mod(wrap(s), custom.bound(vals), wrap(b), wrap(h), wrap(qi), wrap(kj))
        return torch.broadcast_to(unwrap(got, like=s), s.shape)
    except Exception as err:  # noqa: BLE001 - any failure is the user's score_mod
        raise ValueError(f"score_mod: failed on probe scores: {type(err).__name__}: {err}") from err


def _at(x, g, point: float) -> float:
    return float(g[int((x == point).nonzero())])


def _fit_affine(x, g):
    """``(c, d)`` with ``g = c x + d``, read at x = 0 and x = 1 (so a score_mod
    ``score * scale`` gives the user's scale to the bit, equal on every rank), or None."""
    d = _at(x, g, 0.0)
    c = _at(x, g, 1.0) - d
    return (c, d) if _close(c * x + d, g, 1e-7) else None


def _fit_softcap(x, g):
    x1, x2 = 0.5, 3.0
    g1, g2 = _at(x, g, x1), _at(x, g, x2)
    if g1 <= 0 or g2 <= g1:
        return None
    ratio = g2 / g1  # tanh(u x2) / tanh(u x1), from x2/x1 at u -> 0 down to 1
    if not 1.0 < ratio < x2 / x1:
        return None
    lo, hi = -30.0, 30.0  # bisection on log u
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        u = math.exp(mid)
        if math.tanh(u * x2) / math.tanh(u * x1) > ratio:
            lo = mid
        else:
            hi = mid
    u = math.exp(0.5 * (lo + hi))
    cap = g1 / math.tanh(u * x1)
    c = u * cap
    return (cap, c) if _close(cap * torch.tanh(c * x / cap), g, 1e-7) else None


def classify_score_mod(score_mod, custom, custom_values, sizes) -> ScoreFit:
    """The :class:`ScoreFit` of ``score_mod(score, custom_fwd_inputs, b, h, q_idx,
    kv_idx)`` for a problem of ``sizes = (B, H, Sq, Sk)``; None score_mod is ``x``."""
    if score_mod is None:
        return ScoreFit("affine", 1.0, 0.0)
    x = _PROBE_X
    for t4 in custom_values.values():
        # A custom input that varies makes the score depend on the position, exactly.
        if t4.numel() > 1 and not bool((t4 == t4.flatten()[0]).all()):
            return ScoreFit("positional")
    with torch.no_grad():
        grid = evaluate_score_mod(score_mod, custom, custom_values, sizes, x)
    if not _close(grid, grid[:1].expand_as(grid), 1e-12):
        return ScoreFit("positional")
    g = grid[0]
    if not bool(torch.isfinite(g).all()):
        return ScoreFit("function")
    fit = _fit_affine(x, g)
    if fit is not None:
        return ScoreFit("affine", *fit)
    if bool(((g > 0) & (g < 1)).all()):
        fit = _fit_affine(x, torch.logit(g))
        if fit is not None and _close(torch.sigmoid(fit[0] * x + fit[1]), g, 1e-7):
            return ScoreFit("sigmoid", *fit)
    pos = g > 0
    if bool(pos.any()) and bool((g >= 0).all()):
        c = _at(x, g, 1.0) or -_at(x, g, -1.0)
        if c != 0 and _close(torch.relu(c * x), g, 1e-7):
            return ScoreFit("relu", c)
    fit = _fit_softcap(x, g)
    if fit is not None:
        return ScoreFit("softcap", fit[1], 0.0, fit[0])
    return ScoreFit("function")
