"""Attention variants as data: what a score becomes before it weighs a value.

For query i and key j (global token indices) with ``s = scale * q_i . k_j``::

    s = score_mod(s, b, h, i, j)                 # if given (FlexAttention's signature)
    Softmax:  s = softcap * tanh(s / softcap)    # if softcap
              s = s - slope[h] * |i + Sk - Sq - j|   # if alibi_slopes (flash-attn's rule)
              out_i = sum_j e^{s_ij} v_j / (e^{sink_h} + sum_j e^{s_ij})  # sink: no value
    Sigmoid:  out_i = sum_j sigmoid(s_ij + bias) v_j
    ReLU:     out_i = sum_j relu(s_ij) v_j

the sums over the keys the mask lets row i see. Softmax results carry an lse and merge
by :mod:`..merge`; Sigmoid and ReLU are not normalised: partial results over disjoint
keys merge by a plain sum and have no lse.

**Sinks** are counted once per row whatever the number of blocks: kernels never see
them; the finished (merged) ``(out, lse)`` of a row becomes
``out * sigmoid(lse - sink)``, ``lse' = logaddexp(lse, sink)`` (:func:`apply_sink`), and
the kernels' backward runs on that final pair, which is exact (``p_ij = e^{s_ij - lse'}``
and ``delta_i = dout_i . out_i`` hold with the sink). Its gradient is
``-sum_i e^{sink_h - lse'_i} (dout_i . out_i)`` over the rows a call holds: under context
parallelism each rank gets its own rows' share, as for any parameter used on sharded
tokens (sum it over the ranks, as data-parallel training sums any gradient).

Kernels receive a :class:`BlockVariant`: the variant bound to one block, with the global
positions of the block's rows and keys (so ALiBi and ``score_mod`` mean the same under
context parallelism) and the global index of its first head (head parallelism).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class Variant:
    """Base of the variants; ``kind`` names the weighting, ``normalised`` says whether
    partial results merge by lse (softmax) or by a sum."""

    kind = "?"
    normalised = True

    @property
    def plain(self) -> bool:
        """Plain softmax: what every kernel runs."""
        return False


@dataclass(frozen=True, eq=False)
class Softmax(Variant):
    """Softmax attention, optionally with logit soft-capping (Gemma 2), ALiBi slopes
    ``[Hq]`` or ``[B, Hq]`` (float32; flash-attn's distance rule) and a per-head sink
    logit ``[Hq]`` (gpt-oss; may require grad)."""

    softcap: float | None = None
    alibi_slopes: torch.Tensor | None = None
    sink: torch.Tensor | None = None

    kind = "softmax"
    normalised = True

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.alibi_slopes is None and self.sink is None

    def __repr__(self) -> str:
        parts = [f"softcap={self.softcap}"] if self.softcap is not None else []
        if self.alibi_slopes is not None:
            parts.append(f"alibi_slopes={tuple(self.alibi_slopes.shape)}")
        if self.sink is not None:
            parts.append(f"sink={tuple(self.sink.shape)}")
        return f"Softmax({', '.join(parts)})"


@dataclass(frozen=True, eq=False)
class Sigmoid(Variant):
    """Sigmoid attention: ``out_i = sum_j sigmoid(s_ij + bias) v_j`` (no normalisation)."""

    bias: float = 0.0

    kind = "sigmoid"
    normalised = False


@dataclass(frozen=True, eq=False)
class ReLU(Variant):
    """ReLU attention: ``out_i = sum_j relu(s_ij) v_j`` (no normalisation)."""

    kind = "relu"
    normalised = False


VARIANTS = (Softmax, Sigmoid, ReLU)


def _check_param(t, name: str, shapes: list[tuple], device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device} (q's device), got {t.device}")


def probe_score_mod(
    score_mod: Callable, heads: int = 2, seqlen_q: int = 3, seqlen_k: int = 4, device=None
):
    """Call ``score_mod`` on a small broadcast probe (scores ``[1, h, i, j]`` with h, i, j
    at most 2, 3, 4 and within the call's heads and lengths, indices broadcastable to
    it, as the reference kernel calls it) on ``device`` (the call's: a score_mod that
    reads tensors it captured on that device must see its own device); ValueError if it
    fails or returns something that is not a tensor broadcastable to the scores' shape."""
    h_n, q_n, k_n = (max(1, min(n, cap)) for n, cap in ((heads, 2), (seqlen_q, 3), (seqlen_k, 4)))
    dev = torch.device("cpu") if device is None else torch.device(device)
    s = torch.randn(1, h_n, q_n, k_n).to(dev)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    h = torch.arange(h_n, device=dev).view(1, h_n, 1, 1)
    qi = torch.arange(q_n, device=dev).view(1, 1, q_n, 1)
    kj = torch.arange(k_n, device=dev).view(1, 1, 1, k_n)
    shape = list(s.shape)
    try:
        got = score_mod(s, b, h, qi, kj)
    except Exception as err:  # noqa: BLE001 - any failure is the user's score_mod
        raise ValueError(
            f"score_mod: failed on a small probe (scores {shape} with broadcast b, h, "
            f"q_idx, kv_idx index tensors): {type(err).__name__}: {err}"
        ) from err
    ok = isinstance(got, torch.Tensor)
    if ok:
        try:
            ok = torch.broadcast_shapes(got.shape, s.shape) == s.shape
        except RuntimeError:
            ok = False
    if not ok:
        got_desc = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(
            f"score_mod: must return a tensor broadcastable to the scores' shape {shape}, "
            f"got {got_desc}"
        )


def resolve_variant(
    variant, score_mod, *, batch: int, heads: int, device=None, seqlen_q: int = 3, seqlen_k: int = 4
):
    """``variant`` checked against a call's batch and query heads (and q's device, and
    for ``score_mod``'s probe the sequence lengths), or None for plain softmax without
    ``score_mod``. Raises ValueError naming the argument."""
    if variant is None:
        variant = Softmax()
    if isinstance(variant, str):
        named = {"softmax": Softmax, "sigmoid": Sigmoid, "relu": ReLU}
        if variant.lower() not in named:
            raise ValueError(
                f"variant: expected one of {sorted(named)} or a Variant, got {variant!r}"
            )
        variant = named[variant.lower()]()
    if not isinstance(variant, VARIANTS):
        raise ValueError(
            "variant: expected Softmax(...), Sigmoid(...), ReLU() or None, got "
            f"{type(variant).__name__}"
        )
    if score_mod is not None:
        if not callable(score_mod):
            raise ValueError(f"score_mod: expected a callable, got {type(score_mod).__name__}")
        probe_score_mod(score_mod, heads, seqlen_q, seqlen_k, device)
    if isinstance(variant, Softmax):
        cap = variant.softcap
        if cap is not None and (
            isinstance(cap, bool)
            or not isinstance(cap, numbers.Real)
            or not math.isfinite(cap)
            or cap <= 0
        ):
            raise ValueError(f"softcap: expected a finite number > 0 or None, got {cap!r}")
        if variant.alibi_slopes is not None:
            _check_param(variant.alibi_slopes, "alibi_slopes", [(heads,), (batch, heads)], device)
        if variant.sink is not None:
            _check_param(variant.sink, "sink", [(heads,)], device)
    elif isinstance(variant, Sigmoid):
        bias = variant.bias
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias):
            raise ValueError(f"bias: expected a finite real number, got {bias!r}")
    if variant.plain and score_mod is None:
        return None
    return variant


def is_plain(variant) -> bool:
    return variant is None or variant.plain


def kernel_variant(variant, score_mod):
    """What the kernels see of a call's variant: None when they run plain softmax (a
    sink alone is applied after the merge, outside the kernels)."""
    if variant is None and score_mod is None:
        return None
    if (
        score_mod is None
        and isinstance(variant, Softmax)
        and variant.softcap is None
        and variant.alibi_slopes is None
    ):
        return None
    return variant or Softmax()


@dataclass(eq=False)
class BlockVariant:
    """A variant bound to one block of ``Sq_blk`` rows and ``Sk_blk`` keys, what a
    kernel receives (None means plain softmax).

    ``alibi`` is float32 ``[B, Hq_blk]`` (this block's heads; float64 for float64 slopes); ``q_pos`` / ``k_pos`` the
    global int64 positions of the block's rows and keys (None: ``arange``); the ALiBi
    distance is ``|q_pos + shift - k_pos|`` with ``shift = Sk - Sq`` of the whole
    problem; ``score_mod`` gets ``h + head0``. ``alibi_grad``, when the slopes require
    grad, is a ``[B, Hq_blk]`` tensor of ``alibi``'s dtype to which a kernel's backward adds its
    share of d(slopes)."""

    kind: str
    softcap: float | None = None
    bias: float = 0.0
    alibi: torch.Tensor | None = None
    score_mod: Callable | None = None
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    shift: int = 0
    head0: int = 0
    alibi_grad: torch.Tensor | None = field(default=None, repr=False)
    #: What kernels derive from the variant once per call (a compiled score_mod), shared
    #: by the blocks of the call (``dataclasses.replace`` passes the same dict on).
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def normalised(self) -> bool:
        return self.kind == "softmax"

    # -- the score pipeline in plain torch (the reference kernel; any backend's oracle) --

    def positions(self, rows: slice, sk: int, device):
        """Global positions ``[R]`` of rows ``rows`` and ``[Sk]`` of the keys."""
        qp, kp = self.q_pos, self.k_pos
        r0, r1 = rows.start, rows.stop
        qp = torch.arange(r0, r1, device=device) if qp is None else qp[r0:r1].to(device)
        kp = torch.arange(sk, device=device) if kp is None else kp.to(device)
        return qp, kp

    def transform(self, s: torch.Tensor, rows: slice, alibi: torch.Tensor | None = None):
        """Scores ``s`` ``[B, H, R, Sk]`` (scaled, rows ``rows`` of the block) after
        score_mod, softcap and ALiBi. ``alibi`` overrides :attr:`alibi` (a leaf to
        differentiate against)."""
        b, h, _, sk = s.shape
        need_pos = self.score_mod is not None or self.alibi is not None
        if need_pos:
            qp, kp = self.positions(rows, sk, s.device)
        if self.score_mod is not None:
            bi = torch.arange(b, device=s.device).view(b, 1, 1, 1)
            hi = (torch.arange(h, device=s.device) + self.head0).view(1, h, 1, 1)
            s = torch.broadcast_to(
                self.score_mod(s, bi, hi, qp.view(1, 1, -1, 1), kp.view(1, 1, 1, -1)), s.shape
            ).to(s.dtype)
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        slopes = self.alibi if alibi is None else alibi
        if slopes is not None:
            dist = (qp.view(-1, 1) + self.shift - kp.view(1, -1)).abs().to(s.dtype)
            s = s - slopes.to(s.dtype).view(b, h, 1, 1) * dist
        return s

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Unnormalised variants' weights ``f(t)`` of transformed scores."""
        if self.kind == "sigmoid":
            return torch.sigmoid(t + self.bias)
        return torch.relu(t)

    def weights_grad(self, t: torch.Tensor) -> torch.Tensor:
        """``f'(t)`` for :meth:`weights`."""
        if self.kind == "sigmoid":
            g = torch.sigmoid(t + self.bias)
            return g * (1 - g)
        return (t > 0).to(t.dtype)


def bind(
    variant,
    score_mod,
    *,
    batch: int,
    heads: slice,
    q_pos=None,
    k_pos=None,
    shift: int = 0,
    alibi_grad=None,
) -> BlockVariant | None:
    """The :class:`BlockVariant` of a call's (resolved) variant for a block whose heads
    are ``heads`` of the call's query heads; None for plain softmax."""
    kv = kernel_variant(variant, score_mod)
    if kv is None:
        return None
    alibi = None
    if isinstance(kv, Softmax) and kv.alibi_slopes is not None:
        # float32 (flash-attn's), float64 for float64 slopes (so float64 runs stay exact)
        a = kv.alibi_slopes.detach()
        a = a.double() if a.dtype == torch.float64 else a.float()
        a = a.expand(batch, -1) if a.dim() == 1 else a
        alibi = a[:, heads].contiguous()
    return BlockVariant(
        kind=kv.kind,
        softcap=getattr(kv, "softcap", None),
        bias=float(getattr(kv, "bias", 0.0)),
        alibi=alibi,
        score_mod=score_mod,
        q_pos=q_pos,
        k_pos=k_pos,
        shift=shift,
        head0=heads.start or 0,
        alibi_grad=alibi_grad,
    )


def apply_sink(out: torch.Tensor, lse: torch.Tensor, sink_H: torch.Tensor):
    """The finished rows ``out`` ``[B, H, S, D]`` / ``lse`` ``[B, H, S]`` with the sink
    logits ``[H]`` counted once in every row's denominator; returns ``(out', lse')`` in
    the inputs' dtypes (a row that saw nothing keeps out 0, and gets lse = sink)."""
    s = sink_H.detach().to(lse.dtype).view(1, -1, 1)
    new_lse = torch.logaddexp(lse, s.expand_as(lse))
    w = torch.exp(lse - new_lse)  # e^lse / (e^lse + e^sink); 0 for rows that saw nothing
    return (out.to(lse.dtype) * w.unsqueeze(-1)).to(out.dtype), new_lse


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sink_H: torch.Tensor):
    """d(loss)/d(sink) ``[H]`` from the rows held: ``-sum_i e^{sink - lse'_i} (dout_i .
    out_i)`` with ``out``, ``lse`` the final (sunk) results, ``[B, H, S, D]`` / ``[B, H, S]``."""
    ct = lse.dtype
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    p = torch.exp(sink_H.detach().to(ct).view(1, -1, 1) - lse)
    return -(p * delta).sum((0, 2)).to(sink_H.dtype)


__all__ = [
    "BlockVariant",
    "ReLU",
    "Sigmoid",
    "Softmax",
    "Variant",
    "apply_sink",
    "bind",
    "resolve_variant",
    "sink_grad",
]
