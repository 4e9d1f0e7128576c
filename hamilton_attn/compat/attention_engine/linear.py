"""``LinearAttentionEngine``: AttentionEngine's linear-attention entry point, on
:func:`hamilton_attn.linear.linear_attention`.

AttentionEngine's linear examples (``retention_linear.py``, ``simple_gla.py``,
``mamba2_ngroup1.py``) give elementwise modifiers of the inputs to
``LinearAttentionEngine(qkv_meta, q_mod=, k_mod=, v_mod=, decay_mod=, custom_io=, ...)``
and call ``mod(q, k, v, decay, *custom_inputs)``. With ``q' = q_mod(q)``, ``k' =
k_mod(k)``, ``v' = v_mod(v)`` and ``g = decay_mod(decay)``, the log of the per-step
decay (``<= 0``), per batch row and value head::

    S_t = exp(g_t) S_{t-1} + k'_t^T v'_t,    o_t = q'_t S_t        (S_{-1} = 0)

with no implicit scale (the seed's examples scale in ``q_mod``) and no normaliser. A mod
left None is the identity: ``decay`` itself is then the log decay, and a None
``decay`` means no decay. The seed's examples, in these terms:

* retention (RetNet's recurrent form): ``decay`` the factor ``gamma`` in ``(0, 1]``,
  ``decay_mod = decay.log()``, ``q_mod = q * D ** -0.5``;
* simple gated retention / simple GLA: ``decay`` the log gate (e.g. ``logsigmoid``),
  ``q_mod = q * D ** -0.5``;
* Mamba2's SSD with one group: q = C and k = B with one head shared by every value
  head, v = x, ``decay = dt``, custom inputs ``A (1, "heads")`` and ``dt ("batch",
  "heads", "seq_len")``, ``decay_mod = decay * A``, ``v_mod = v * dt``.

Layouts follow those examples: ``q, k [B, Hq|Hk, T, D]``, ``v [B, H, T, DV]``,
``decay [B, H, T]``, out ``[B, H, T, DV]`` (heads before tokens, unlike the softmax
engine's quick start); H is the value heads, and Hq, Hk divide it (head ``h`` reads q
head ``h // (H / Hq)``). Legend: B batch, H heads, T tokens, D / DV head dims.
"""

from __future__ import annotations

import os
import warnings

import torch

from ... import Plan, get_position_ids
from .engine import _meta_dtype, _meta_shape
from .symbolic import CustomIO, unwrap, wrap

_AXES = {"batch": 0, "heads": 1, "seq_len": 2}


def _check_mod(fn, name: str):
    if fn is not None and not callable(fn):
        raise ValueError(f"{name}: expected a callable fn(x, custom_io) or None")
    return fn


class LinearAttentionEngine(torch.nn.Module):
    """Linear attention with elementwise modifiers, as a module (module docstring).

    Args:
        qkv_meta: ``(q, k, v)`` descriptions ``[B, H, T, D]`` (:func:`meta_tensor`); k's
            head dim equals q's, and q's and k's heads divide v's. Calls must match them
            (dtype included; with ``context_parallel`` the token dim is the local one).
        q_mod, k_mod, v_mod: ``fn(x, custom_io) -> x'``, elementwise (the result is
            broadcast to x's shape and cast to its dtype); None: the identity.
        decay_mod: ``fn(decay, custom_io) -> g``, the log decay ``[B, H, T]`` (``<= 0``:
            a positive one is a ValueError); None: ``g = decay``.
        custom_io: a :class:`CustomIO` of extra inputs; declared dims are aligned left
            with ``(B, H, T)``, each its name (``"batch"``, ``"heads"``, ``"seq_len"``)
            or 1 (the seed's ``A: (1, "heads")``). Inside a mod, ``custom_io.input_tensors[name]`` is the tensor shaped to
            broadcast against the mod's operand (``[B|1, H|1, T|1]`` for decay, with a
            trailing 1 for q, k, v). Under ``context_parallel`` a ``seq_len`` dim is
            this rank's shard, like q.
        tune, tune_filename, tune_bwd: accepted; there is no tuning run (``tune=True``
            warns).
        context_parallel: a :class:`hamilton_attn.Plan` with ``dispatch="contiguous"``
            over a causal mask of T tokens: calls take this rank's shards (tokens along
            dim 2: ``dispatch(x, plan, seq_dim=2)``) and the ranks exchange states
            (:func:`hamilton_attn.linear.linear_attention`).
    """

    def __init__(
        self,
        qkv_meta,
        q_mod=None,
        k_mod=None,
        v_mod=None,
        decay_mod=None,
        custom_io=None,
        tune=False,
        tune_filename="tune_result",
        tune_bwd=False,
        *,
        context_parallel: Plan | None = None,
    ):
        super().__init__()
        if not isinstance(qkv_meta, (tuple, list)) or len(qkv_meta) != 3:
            raise ValueError("qkv_meta: expected (q, k, v) meta tensors")
        (b, hq, t, d), (bk, hk, tk, dk), (bv, h, tv, dv) = (
            _meta_shape(m, n) for m, n in zip(qkv_meta, "qkv")
        )
        if not (b == bk == bv and t == tk == tv and d == dk) or h % hq or h % hk:
            raise ValueError(
                f"qkv_meta: shapes disagree: q {[b, hq, t, d]}, k {[bk, hk, tk, dk]}, "
                f"v {[bv, h, tv, dv]} (q's and k's heads must divide v's)"
            )
        self.dtype = _meta_dtype(qkv_meta)
        self.shapes = {"q": (b, hq, t, d), "k": (b, hk, t, d), "v": (b, h, t, dv)}
        self.q_mod, self.k_mod = _check_mod(q_mod, "q_mod"), _check_mod(k_mod, "k_mod")
        self.v_mod, self.decay_mod = _check_mod(v_mod, "v_mod"), _check_mod(decay_mod, "decay_mod")
        custom_io = CustomIO() if custom_io is None else custom_io
        if not isinstance(custom_io, CustomIO):
            raise ValueError(f"custom_io: expected a CustomIO, got {type(custom_io).__name__}")
        for name, sym in custom_io.input_tensors.items():
            dims = sym.shape
            if len(dims) > 3 or any(
                (w not in _AXES or _AXES[w] != i) if isinstance(w, str) else w != 1
                for i, w in enumerate(dims)
            ):
                raise ValueError(
                    f"custom_io[{name!r}]: expected dims aligned with (batch, heads, seq_len), "
                    f'each its name or 1 (e.g. (1, "heads")), got {dims}'
                )
        self.custom = custom_io
        for name, val in (("tune", tune), ("tune_bwd", tune_bwd)):
            if not isinstance(val, bool):
                raise ValueError(f"{name}: expected a bool, got {val!r}")
        if tune_filename is not None and not isinstance(tune_filename, (str, os.PathLike)):
            raise ValueError(f"tune_filename: expected a path or None, got {tune_filename!r}")
        if tune or tune_bwd:
            warnings.warn(
                "LinearAttentionEngine(tune=True): no tuning run here; tune_filename="
                f"{tune_filename!r} is neither read nor written",
                UserWarning,
                stacklevel=2,
            )
        if context_parallel is not None:
            if not isinstance(context_parallel, Plan):
                raise ValueError(
                    "context_parallel: expected a hamilton_attn.Plan, got "
                    f"{type(context_parallel).__name__}"
                )
            if context_parallel.user_mask.shape != (t, t):
                raise ValueError(
                    f"context_parallel: the plan's mask is {context_parallel.user_mask.shape}, "
                    f"qkv_meta says ({t}, {t}) global tokens"
                )
        self.plan = context_parallel

    def _check(self, q, k, v, decay) -> int:
        """The call's token count (local under a plan); ValueError naming an input."""
        seq = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        if self.plan is not None and seq != self.plan.local_len:
            raise ValueError(
                f"q: expected this rank's {self.plan.local_len} tokens along dim 2 "
                f"(dispatch(x, plan, seq_dim=2)), got shape "
                f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}"
            )
        for name, x in (("q", q), ("k", k), ("v", v)):
            want = list(self.shapes[name])
            if self.plan is not None:
                want[2] = seq
            if not isinstance(x, torch.Tensor) or list(x.shape) != want:
                got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected [B, H, T, D] = {want} (qkv_meta), got {got}")
            if x.dtype != self.dtype:
                raise ValueError(f"{name}: expected dtype {self.dtype} (qkv_meta), got {x.dtype}")
        b, h = v.shape[:2]
        if decay is None:
            if self.decay_mod is not None:
                raise ValueError("decay: decay_mod needs the decay input [B, H, T]")
        elif not isinstance(decay, torch.Tensor) or list(decay.shape) != [b, h, seq]:
            got = list(decay.shape) if isinstance(decay, torch.Tensor) else type(decay).__name__
            raise ValueError(f"decay: expected [B, H, T] = {[b, h, seq]}, got {got}")
        return seq

    def _custom_values(self, args, kwargs, seq: int) -> dict[str, torch.Tensor]:
        """Each custom input as ``[B|1, H|1, T|1]`` (declared dims aligned left)."""
        names = self.custom.names
        given = self.custom.given(args, kwargs, "custom_io", "q, k, v, decay")
        b, h = self.shapes["v"][:2]
        sizes = (b, h, seq)
        out = {}
        for n in names:
            x = given[n]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            decl = self.custom.input_tensors[n].shape
            want = tuple(sizes[i] if isinstance(w, str) else w for i, w in enumerate(decl))
            if tuple(x.shape) != want:
                raise ValueError(
                    f"{n}: declared {decl} against (B, H, T) = {sizes}, got {list(x.shape)}"
                )
            out[n] = x.reshape(tuple(x.shape) + (1,) * (3 - x.dim()))
        return out

    def _apply(self, fn, name: str, x: torch.Tensor, values, shape, dtype) -> torch.Tensor:
        if fn is None:
            return x
        trail = (1,) * (len(shape) - 3)
        io = self.custom.bound({n: wrap(t.reshape(t.shape + trail)) for n, t in values.items()})
        try:
            got = unwrap(fn(wrap(x), io), like=x)
            return torch.broadcast_to(got, shape).to(dtype)
        except Exception as err:  # noqa: BLE001 - any failure is the user's mod
            raise ValueError(f"{name}: failed: {type(err).__name__}: {err}") from err

    def forward(self, q, k, v, decay=None, *custom_inputs, **custom_kw):
        """``o [B, H, T, DV]`` (this rank's tokens under a plan) in q's dtype;
        differentiable in q, k, v, decay and the custom inputs. Under a plan, a bad
        input on one rank is a ValueError on every rank."""
        from ...linear import linear_attention
        from ...linear.api import exchange_device, raise_on_every_rank

        try:
            q, k, v, g = self._inputs(q, k, v, decay, custom_inputs, custom_kw)
        except ValueError as err:
            if self.plan is None:
                raise
            raise_on_every_rank(str(err), self.plan, exchange_device(q, k, v))
        o = linear_attention(q, k, v, g, scale=1.0, plan=self.plan)
        return o.transpose(1, 2)

    def _inputs(self, q, k, v, decay, custom_inputs, custom_kw):
        """Checked and modified inputs of :func:`linear_attention`: q, k, v ``[B, T, H,
        D]`` (q's and k's heads repeated to v's) and ``g [B, T, H]`` or None."""
        seq = self._check(q, k, v, decay)
        values = self._custom_values(custom_inputs, custom_kw, seq)
        b, h = v.shape[:2]
        q = self._apply(self.q_mod, "q_mod", q, values, q.shape, q.dtype)
        k = self._apply(self.k_mod, "k_mod", k, values, k.shape, k.dtype)
        v = self._apply(self.v_mod, "v_mod", v, values, v.shape, v.dtype)
        g = None
        if decay is not None:
            gt = torch.float64 if q.dtype == torch.float64 else torch.float32
            g = self._apply(self.decay_mod, "decay_mod", decay, values, (b, h, seq), gt)
            g = g.transpose(1, 2)  # [B, T, H]
        if self.plan is not None:
            # Padding after the last token (dispatch's zeros) went through the mods too
            # (log 0 = -inf, 0 / 0): it must enter the exchange as zeros, with no decay.
            real = get_position_ids(self.plan, q.device) < self.shapes["v"][2]
            q, k, v = (torch.where(real[:, None], x, 0.0) for x in (q, k, v))
            g = None if g is None else torch.where(real[:, None], g, 0.0)
        q, k = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (q, k))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return q, k, v, g

    def extra_repr(self) -> str:
        b, h, t, dv = self.shapes["v"]
        cp = f", context_parallel=W{self.plan.world_size}" if self.plan is not None else ""
        return f"B={b}, H={h}, T={t}, DV={dv}{cp}"
