"""``OnlineFunc``: how a row's attention is accumulated over key blocks (AttentionEngine's
contract), and what the engine does with it.

For each row the engine keeps ``online_rowscales`` (declared with their initial values)
and an output accumulator ``o`` (zeros). For every block of keys::

    scores, rowscales, o_scale = online_fwd(scores, rowscales, b, h, q_idx)
    o = o * o_scale + scores @ V_block          # scores: the block's weights

and after the last block ``o, final_rowscales = online_fwd_epilogue(o, rowscales, b, h,
q_idx)``. ``forward(scores, final_rowscales, ...)`` (the weights recomputed from the
final scales) and ``backward(dp, scores, final_rowscales, doosum_rowscales, ...)``
describe AttentionEngine's generated backward; here gradients are autograd's (exact for
the forward above), so those two methods are read only by the recogniser's docs and
never needed to be right.
"""

from __future__ import annotations

import math

from .symbolic import CustomIO, SymbolicArray, SymbolScalar, Var


class OnlineFunc:
    """Subclass it and override the static methods, as in AttentionEngine.

    Args:
        online_rowscales: name -> ``SymbolScalar(name, Var(initial))`` carried across key
            blocks (e.g. ``m`` from ``Var("-inf")``, ``r`` from ``Var("0.0")``).
        final_rowscales: name -> ``SymbolScalar`` returned by the epilogue (e.g. ``lse``).
        external_fwd_inputs: a :class:`CustomIO` (accepted, as in the seed; the online
            methods do not receive custom inputs).
    """

    def __init__(self, online_rowscales=None, final_rowscales=None, external_fwd_inputs=None):
        self.online_rowscales = dict(online_rowscales or {})
        self.final_rowscales = dict(final_rowscales or {})
        self.external_fwd_tensors = (
            external_fwd_inputs if external_fwd_inputs is not None else CustomIO()
        )
        self.vars = {"scores": SymbolicArray(), "o_scale": None}
        self.doosum_rowscales = SymbolScalar("doosum", Var("doosum"))

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        """One key block: ``(weights, new online_rowscales, o_scale)``."""
        return scores, online_rowscales, SymbolScalar("o_scale", Var("1"))

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        """After the last block: ``(o, final_rowscales)``."""
        return o, online_rowscales

    @staticmethod
    def forward(scores, final_rowscales, b, h, q_idx, kv_idx):
        """The weights recomputed from the final row scales (AttentionEngine's backward)."""
        return scores

    @staticmethod
    def backward(dp, scores, final_rowscales, doosum_rowscales, b, h, q_idx, kv_idx):
        """``d(scores)`` from ``dp = dO V^T`` (AttentionEngine's backward)."""
        return dp


def initial_values(online) -> dict[str, float]:
    """The initial value of each online row scale; ValueError naming one without a
    number."""
    if not isinstance(online, OnlineFunc):
        raise ValueError(
            f"online_func: expected an OnlineFunc instance, got {type(online).__name__}"
        )
    if not isinstance(online.online_rowscales, dict):
        raise ValueError("online_func: online_rowscales must be a dict of name -> SymbolScalar")
    init = {}
    for name, s in online.online_rowscales.items():
        if isinstance(s, SymbolScalar):
            val = s.code.number if s.code is not None else s._value
        else:
            val = s
        if isinstance(val, bool) or not isinstance(val, (int, float)) or math.isnan(val):
            raise ValueError(
                f"online_func: online_rowscales[{name!r}] needs a numeric initial value, "
                f'e.g. SymbolScalar({name!r}, Var("0.0")), got {s!r}'
            )
        init[name] = float(val)
    return init
