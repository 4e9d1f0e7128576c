"""``AttentionEngine``: the seed's entry point, as a torch module over our paths.

Built once from the input shapes, the score_mod, the block mask and the online function;
then ``mod(q, k, v, *custom_inputs)`` on ``[B, S, H, D]`` tensors. What runs (the
*route*) is decided by recognition (:mod:`.recognise`):

==========================  ===============================  ==============================
online function             score_mod (on the raw ``q.k``)   runs as
==========================  ===============================  ==============================
softmax                     ``c x + d``                      ``attention(scale=c)``
softmax                     ``cap tanh(c x / cap) + e``      ``Softmax(softcap=cap)``
softmax                     anything else                    ``attention(score_mod=...)``
weighted sum (identity)     ``sigmoid(c x + d)``             ``Sigmoid(bias=d)``, scale c
weighted sum (identity)     ``relu(c x)``                    ``ReLU()``, scale c
anything else               anything                         the blockwise path
==========================  ===============================  ==============================

where the score_mod's form is its exact expression (:mod:`.forms`), never a fit to
samples; ``attention(score_mod=...)`` and the blockwise path run the user's function as
written. ``context_parallel=plan`` runs the same through :func:`hamilton_attn.calc_attn`.
"""

from __future__ import annotations

import os
import warnings

import torch

from ... import Mask, Plan, attention, calc_attn, dispatch, get_position_ids, undispatch
from ...runtime.checks import agreed_before, exchange_rows
from ...variants import ReLU, Sigmoid, Softmax
from .blockwise import DEFAULT_BLOCK, at_positions, blockwise_attention
from .masks import resolve_block_mask
from .online import OnlineFunc, initial_values
from .recognise import check_score_mod, classify_online, classify_score_mod, custom_constants
from .symbolic import CustomIO, unwrap, wrap

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton", "blockwise")
#: The seed's code generators; both mean "the fastest we have".
SEED_BACKENDS = ("tl", "cute")
MASK_VALUES = ("-inf", "0")
_AXES = {"batch": 0, "heads": 1, "seq_len": 2, "seq_len_kv": 3}


def _meta_shape(t, name: str) -> tuple[int, int, int, int]:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(
            f"qkv_meta: {name} must be a 4-d tensor [B, H, S, D] (meta_tensor(B, H, S, D)), "
            f"got {type(t).__name__}{list(t.shape) if isinstance(t, torch.Tensor) else ''}"
        )
    return tuple(int(x) for x in t.shape)


def _meta_dtype(qkv_meta) -> torch.dtype:
    """The one floating dtype of q, k and v's meta tensors (ValueError otherwise)."""
    dtypes = {t.dtype for t in qkv_meta}
    if len(dtypes) != 1 or not qkv_meta[0].is_floating_point():
        raise ValueError(f"qkv_meta: expected one floating dtype, got {sorted(map(str, dtypes))}")
    return qkv_meta[0].dtype


class _Route:
    """Where calls go: ``kind`` is ``fast`` (attention / calc_attn with ``scale``,
    ``variant``, ``score_mod``) or ``blockwise``; ``what`` says it in words."""

    def __init__(self, kind, what, scale=1.0, variant=None, score_mod=None):
        self.kind, self.what = kind, what
        self.scale, self.variant, self.score_mod = scale, variant, score_mod


class _AllGatherKV(torch.autograd.Function):
    """The full key sequence from every rank's shard; its gradient is summed over the
    ranks (each rank's queries read every key) before this rank's shard is taken."""

    @staticmethod
    def forward(ctx, x_local, plan, role):
        ctx.plan, ctx.role = plan, role
        return undispatch(x_local.detach(), plan, role=role)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous()
        if ctx.plan.world_size > 1:
            dist.all_reduce(g, group=ctx.plan.group)
        with torch.no_grad():
            return dispatch(g, ctx.plan, role=ctx.role), None, None


class AttentionEngine(torch.nn.Module):
    """A customised attention as a module (AttentionEngine's API).

    Args:
        qkv_meta: ``(q, k, v)`` descriptions ``[B, H, S, D]`` (:func:`meta_tensor`;
            AttentionEngine's order, heads before tokens); k / v may have fewer heads
            (GQA / MQA), v another head dim. Calls must match them (dtype included).
        custom_fwd_inputs: a :class:`CustomIO` of extra tensors ``score_mod`` reads.
        score_mod: ``score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx)`` on the
            raw ``q . k`` (no implicit scale: the seed's quick start scales in it);
            None leaves it raw.
        block_mask: None (full), ``mask_mod(b, h, q_idx, kv_idx) -> bool``, the result
            of :func:`create_block_mask`, or a :class:`hamilton_attn.Mask`.
        online_func: an :class:`OnlineFunc` instance.
        mask_value: ``"-inf"`` or ``"0"``: accepted; masked pairs take no part in any
            reduction or sum whichever it is.
        tune, tune_file: accepted. There is no separate tuning run here: the Triton
            kernel autotunes itself on first use and ``tune_file`` is neither read nor
            written (``tune=True`` warns so).
        device: AttentionEngine's target description; accepted and unused.
        backend: ``auto`` (or the seed's ``tl`` / ``cute``), ``reference``, ``sdpa``,
            ``flex``, ``triton`` for recognised functions, or ``blockwise`` to force the
            blockwise path.
        context_parallel: a :class:`hamilton_attn.Plan`: calls then take this rank's
            local shards (``dispatch``) and run under the plan's schedule.
        block_size: keys per block of the blockwise path.

    ``route`` says which path calls take. The score_mod is read when the engine is built
    (AttentionEngine compiles it then): numbers it closes over are taken as they are
    then, tensors it closes over are never read into a route (it runs as written).
    Values that change between calls belong in custom inputs: with them the route is
    decided at every call from their values (one host synchronisation per call).
    """

    def __init__(
        self,
        qkv_meta,
        custom_fwd_inputs=None,
        score_mod=None,
        block_mask=None,
        online_func=None,
        mask_value="-inf",
        device=None,
        backend="auto",
        tune=False,
        tune_file="tuned_result.json",
        *,
        context_parallel: Plan | None = None,
        block_size: int = DEFAULT_BLOCK,
    ):
        super().__init__()
        if not isinstance(qkv_meta, (tuple, list)) or len(qkv_meta) != 3:
            raise ValueError("qkv_meta: expected (q, k, v) meta tensors")
        (b, hq, sq, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = (
            _meta_shape(t, n) for t, n in zip(qkv_meta, "qkv")
        )
        if not (b == bk == bv) or d != dk or (hk, sk) != (hv, sv) or hk < 1 or hq % hk:
            raise ValueError(
                f"qkv_meta: shapes disagree: q {[b, hq, sq, d]}, k {[bk, hk, sk, dk]}, "
                f"v {[bv, hv, sv, dv]} (k / v heads must divide q's)"
            )
        self.dtype = _meta_dtype(qkv_meta)
        self.sizes = (b, hq, sq, sk)
        self.heads_kv, self.dims = hk, (d, dv)
        if custom_fwd_inputs is None:
            custom_fwd_inputs = CustomIO()
        if not isinstance(custom_fwd_inputs, CustomIO):
            raise ValueError(
                f"custom_fwd_inputs: expected a CustomIO, got {type(custom_fwd_inputs).__name__}"
            )
        self.custom = custom_fwd_inputs
        if score_mod is not None and not callable(score_mod):
            raise ValueError(f"score_mod: expected a callable, got {type(score_mod).__name__}")
        self.score_mod = score_mod
        self.online = online_func if online_func is not None else OnlineFunc()
        self.init = initial_values(self.online)
        if mask_value not in MASK_VALUES:
            raise ValueError(f"mask_value: expected one of {MASK_VALUES}, got {mask_value!r}")
        self.mask_value = mask_value
        if backend in SEED_BACKENDS:
            backend = "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"backend: expected one of {BACKENDS + SEED_BACKENDS}, got {backend!r}"
            )
        self.backend = backend
        if not isinstance(tune, bool):
            raise ValueError(f"tune: expected a bool, got {tune!r}")
        if tune_file is not None and not isinstance(tune_file, (str, os.PathLike)):
            raise ValueError(f"tune_file: expected a path or None, got {type(tune_file).__name__}")
        self.tune, self.tune_file = tune, tune_file
        if tune:
            warnings.warn(
                "AttentionEngine(tune=True): no tuning run here; the Triton kernel autotunes "
                f"itself on first use and tune_file={tune_file!r} is neither read nor written",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        self.block_size = block_size
        self.plan = self._check_plan(context_parallel)
        self.mask = (
            resolve_block_mask(block_mask, b, hq, sq, sk) if block_mask is not None else None
        )
        if self.plan is not None:
            if self.mask is None:
                self.mask = self.plan.user_mask
            elif self.mask != self.plan.user_mask:
                raise ValueError(
                    "context_parallel: the plan was made for another mask than block_mask "
                    "(plan with the engine's mask, or leave block_mask None to take the plan's)"
                )
        elif self.mask is None:
            self.mask = Mask.full(sq, sk)
        self.online_kind = classify_online(self.online, self.init)
        self._route = self._decide({}) if not self.custom.names else None
        self._checked_on: set[torch.device] = set()
        self._agreed: set = set()  # input signatures the ranks agreed on (context_parallel)
        #: The leaves made of the last call's q, k, v where none required grad (with grad
        #: mode on); ``out.backward()`` fills their ``.grad``.
        self.last_leaves: tuple | None = None
        self._lo_hi = None

    def _check_plan(self, plan):
        if plan is None:
            return None
        if not isinstance(plan, Plan):
            raise ValueError(
                f"context_parallel: expected a hamilton_attn.Plan, got {type(plan).__name__}"
            )
        b, hq, sq, sk = self.sizes
        if plan.user_mask.shape != (sq, sk):
            raise ValueError(
                f"context_parallel: the plan's mask is {plan.user_mask.shape}, qkv_meta says "
                f"({sq}, {sk}) global tokens"
            )
        return plan

    # -- routes --------------------------------------------------------------------------
    def _decide(self, custom_values) -> _Route:
        kind = self.online_kind
        if self.backend == "blockwise" or kind is None:
            why = "forced" if self.backend == "blockwise" else "online function not recognised"
            return _Route("blockwise", f"blockwise ({why})")
        fit = classify_score_mod(self.score_mod, self.custom, custom_constants(custom_values))
        if kind == "softmax":
            if fit.kind == "affine":
                return _Route("fast", f"softmax, scale {fit.c:.6g}", fit.c)
            if fit.kind == "softcap":
                return _Route(
                    "fast", f"softmax, softcap {fit.cap:.6g}", fit.c, Softmax(softcap=fit.cap)
                )
            return _Route(
                "fast",
                f"softmax with score_mod ({fit.kind})",
                1.0,
                None,
                self._flex_mod(custom_values),
            )
        if fit.kind == "sigmoid":
            return _Route("fast", f"sigmoid, bias {fit.d:.6g}", fit.c, Sigmoid(bias=fit.d))
        if fit.kind == "relu":
            return _Route("fast", f"relu, scale {fit.c:.6g}", fit.c, ReLU())
        return _Route("blockwise", f"blockwise (weighted sum of a {fit.kind} score_mod)")

    def _flex_mod(self, custom_values):
        """The user's score_mod with FlexAttention's signature (global indices)."""
        user, custom = self.score_mod, self.custom

        def score_mod(score, b, h, q_idx, kv_idx):
            vals = {}
            for name, t4 in custom_values.items():
                val = at_positions(t4, b, h, q_idx, kv_idx)
                vals[name] = wrap(val.to(score.dtype) if val.is_floating_point() else val)
            got = user(wrap(score), custom.bound(vals), wrap(b), wrap(h), wrap(q_idx), wrap(kv_idx))
            return unwrap(got, like=score)

        return score_mod

    def route_for(self, custom_values) -> _Route:
        """The route of a call with these custom inputs: read from their values at every
        call (an in-place change, even through ``.data``, is seen), fixed without them."""
        if self.custom.names:
            self._route = self._decide(custom_values)
        return self._route

    @property
    def route(self) -> str:
        """The path of the last call (or of every call, without custom inputs)."""
        return self._route.what if self._route is not None else "decided at the first call"

    # -- calls ---------------------------------------------------------------------------
    def _custom_values(self, args, kwargs) -> dict[str, torch.Tensor]:
        names = self.custom.names
        given = self.custom.given(args, kwargs, "custom_fwd_inputs", "q, k, v")
        b, hq, sq, sk = self.sizes
        sizes = (b, hq, sq, sk)
        out = {}
        for n in names:
            t = given[n]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t)
            decl = self.custom.input_tensors[n].shape
            if t.dim() != len(decl):
                raise ValueError(
                    f"{n}: declared shape {decl}, got a {t.dim()}-d tensor {list(t.shape)}"
                )
            for i, (want, got) in enumerate(zip(decl, t.shape)):
                want = sizes[_AXES[want]] if isinstance(want, str) and want in _AXES else want
                if isinstance(want, int) and want != got:
                    raise ValueError(f"{n}: declared shape {decl}, got {list(t.shape)} (dim {i})")
            t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
            for i, (m, full) in enumerate(zip(t4.shape, sizes)):
                if m not in (1, full):
                    raise ValueError(
                        f"{n}: shape {list(t.shape)} does not broadcast against [B, H, Sq, Sk] = "
                        f"{list(sizes)} (dim {i})"
                    )
            out[n] = t4
        return out

    def _agree(self, q, problem: str | None) -> None:
        """Under ``context_parallel``: this rank's input problem raised on EVERY rank, before
        any transfer (a status exchange, skipped as :func:`calc_attn` skips its own under
        ``check="first"`` once the ranks agreed)."""
        plan = self.plan
        dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        sig = tuple(q.shape) if isinstance(q, torch.Tensor) else None
        if agreed_before(plan, self._agreed, sig, problem):
            return
        exchange_rows(plan, [int(problem is not None), *plan.fingerprint], problem, dev,
                      "AttentionEngine", "")  # fmt: skip
        self._agreed.add(sig)

    def _check_inputs(self, q, k, v):
        b, hq, sq, sk = self.sizes
        d, dv = self.dims
        hk = self.heads_kv
        if self.plan is None:
            want = {"q": (b, sq, hq, d), "k": (b, sk, hk, d), "v": (b, sk, hk, dv)}
        else:
            want = {"q": (b, None, hq, d), "k": (b, None, hk, d), "v": (b, None, hk, dv)}
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            w = want[name]
            ok = t.dim() == 4 and all(x is None or x == y for x, y in zip(w, t.shape))
            if not ok:
                shown = [("S_local" if x is None else x) for x in w]
                raise ValueError(
                    f"{name}: expected [B, S, H, D] = {shown} (qkv_meta, bshd), got {list(t.shape)}"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"{name}: expected dtype {self.dtype} (qkv_meta), got {t.dtype}")

    def forward(self, q, k, v, *custom_inputs, **custom_kw):
        """``out [B, S, H, DV]`` (or this rank's ``[B, S_local, H, DV]``) in q's dtype;
        differentiable in q, k, v (and, on the blockwise path, in custom inputs that
        require grad)."""
        try:
            self._check_inputs(q, k, v)
            values = self._custom_values(custom_inputs, custom_kw)
            if q.device not in self._checked_on:
                ct = torch.float64 if q.dtype == torch.float64 else torch.float32
                check_score_mod(self.score_mod, self.custom, values, self.sizes, q.device, ct)
                self._checked_on.add(q.device)
            problem = None
        except ValueError as err:
            if self.plan is None:
                raise
            problem = str(err)
        if self.plan is not None:
            self._agree(q, problem)
        if torch.is_grad_enabled() and not any(t.requires_grad for t in (q, k, v)):
            # The seed's quick start calls out.backward() on inputs that do not require
            # grad: they become the engine's own leaves (their gradients: last_leaves).
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            self.last_leaves = (q, k, v)
        if torch.is_grad_enabled() and any(t.requires_grad for t in values.values()):
            self._route = _Route("blockwise", "blockwise (a custom input requires grad)")
            return self._blockwise(q, k, v, values)
        route = self.route_for(values)
        if route.kind == "fast":
            if self.plan is not None:
                return calc_attn(
                    q, k, v, self.plan, scale=route.scale, variant=route.variant,
                    score_mod=route.score_mod,
                )  # fmt: skip
            backend = "auto" if self.backend == "blockwise" else self.backend
            return attention(
                q, k, v, self.mask, scale=route.scale, layout="bshd", backend=backend,
                variant=route.variant, score_mod=route.score_mod,
            )  # fmt: skip
        return self._blockwise(q, k, v, values)

    def _blockwise(self, q, k, v, values):
        plan = self.plan
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        if plan is None:
            if self._lo_hi is None:
                lo, hi = self.mask.row_intervals(q.device)
                self._lo_hi = (lo.long(), hi.long())
            lo, hi = self._lo_hi
            q_pos = torch.arange(q.shape[1], device=q.device)
        else:
            if plan.heads is not None:
                raise ValueError(
                    "context_parallel: an unrecognised online function runs context-parallel "
                    "only on plans without head parallelism (ulysses_degree)"
                )
            role = "q" if plan.self_attention else "kv"
            k, v = (_AllGatherKV.apply(t, plan, role) for t in (k, v))
            q_pos = get_position_ids(plan, q.device)
            lo_all, hi_all = self.mask.row_intervals(q.device)
            real = q_pos < self.sizes[2]
            at = q_pos.clamp(max=self.sizes[2] - 1)
            lo = torch.where(real, lo_all.long()[:, at], 0)
            hi = torch.where(real, hi_all.long()[:, at], -1)
        rep = q.shape[2] // k.shape[2]
        q4, k4, v4 = (t.transpose(1, 2).to(ct) for t in (q, k, v))
        if rep > 1:
            k4, v4 = (t.repeat_interleave(rep, dim=1) for t in (k4, v4))
        out = blockwise_attention(
            q4, k4, v4, lo, hi, q_pos, self.score_mod, self.custom, values, self.online,
            self.init, block=self.block_size,
        )  # fmt: skip
        return out.transpose(1, 2).to(q.dtype)

    def extra_repr(self) -> str:
        b, hq, sq, sk = self.sizes
        cp = f", context_parallel=W{self.plan.world_size}" if self.plan is not None else ""
        return f"B={b}, H={hq}, Sq={sq}, Sk={sk}, route={self.route!r}{cp}"
