"""Any mask through FlexAttention (``torch.nn.attention.flex_attention``).

Layouts: ``bhsd`` q ``[B, Hq, Sq, D]``, k/v ``[B, Hk, Sk, D(v)]`` (GQA through
``enable_gqa``); out in q's dtype, lse ``[B, Hq, Sq]``, natural log, float32 (float64
for float64 inputs, which only the CPU path takes).

**Block mask.** The :class:`~torch.nn.attention.flex_attention.BlockMask` comes from
``mask.row_intervals()`` (per row, at most R key intervals ``[lo, hi]``), never from an
``Sq x Sk`` tensor: each (q-block, k-block) pair is classified from per-block
minima / maxima of the intervals (:func:`classify_blocks`) as

- empty: no row of the q-block has an interval reaching into the k-block;
- full: every row of the q-block has one interval covering the whole k-block, and
  neither block is a partial tail block;
- partial: everything else; flex evaluates ``lo[r, q] <= kv <= hi[r, q]`` there.

The classification is conservative (a full block may be called partial, an empty one
partial, never the reverse), which costs speed, not correctness. Block masks are
cached per (mask, device, block size).

**Compilation.** On CUDA flex runs through ``torch.compile(flex_attention,
dynamic=None)`` (compiled once, lazily, shared by every kernel instance). The first
block shape compiles a static kernel; the first *other* shape recompiles once with
symbolic sequence lengths, which then serves every later shape. With ``dynamic=False``
every new shape (a plan has a few per rank, packed documents many) recompiled, and
past dynamo's recompile limit flex silently fell back to its eager path, which
materialises the scores. Variants multiply the graphs (each score_mod structure, with
and without grad, static and symbolic), so our compiled calls run with dynamo's
per-code recompile limit raised to :data:`RECOMPILE_LIMIT` (and put back after each
call); at dynamo's default of 8, ``hamilton-attn verify``'s variants on CUDA fell back to
the eager path. On CPU it runs eagerly; that path materialises the scores
and exists for tests.

**lse.** ``flex_attention`` returns natural-log lse (it converts its internal log2),
float32 for half inputs; rows that see no key give lse -inf and out 0. Those rows are
also set explicitly from the mask, so the contract holds whatever flex returns there.

**Backward.** FlexAttention has no backward that takes an external (merged) lse, so
the block's share of the gradient comes from a recompute: with ``(out_i, lse_i)`` this
block's own forward and ``(out, lse)`` the merged result over all blocks,

    c     = exp(lse_i - lse)                        (0 where lse_i = -inf)
    g_out = c * dout
    g_lse = rowsum(g_out * out_i) - c * rowsum(dout * out)

and autograd through ``(out_i, lse_i)`` with upstream ``(g_out, g_lse)`` gives exactly
this block's share. Why: with scores S, block softmax P_i = exp(S - lse_i) and merged
P = c P_i, the true score gradient is ``dS = P (dout v^T - rowsum(dout * out))``; the
autograd of (out_i, lse_i) gives ``dS = P_i (g_out v^T - rowsum(g_out * out_i) + g_lse)``,
and the g_lse above makes the two equal (dV = P_i^T g_out = P^T dout likewise). Using
the rounded ``g_out`` inside g_lse makes flex's own ``rowsum(g_out * out_i) - g_lse``
equal ``c * rowsum(dout * out)`` to float32 accuracy. The recompute costs one extra
forward per backward. Flex has no CPU backward (torch 2.11 - 2.13 refuse inputs that
require grad on CPU), so on CPU the same formula runs through a dense masked torch
forward of the block.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ..masks import Mask
from .base import FastPathKernel, expand_kv, lse_dtype

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    _HAVE_FLEX = True
except ImportError:  # pragma: no cover - torch without flex
    BlockMask = flex_attention = None
    _HAVE_FLEX = False

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch: return_lse only
    AuxRequest = None

BLOCK_SIZE = 128
MAX_SLOTS = 16  # key intervals per row that the mask_mod unrolls
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_compiled = None


def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=None)``, built on first use."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=None)
    return _compiled


# ---------------------------------------------------------------------------------------
# Block mask from per-row intervals
# ---------------------------------------------------------------------------------------


def classify_blocks(
    lo: torch.Tensor, hi: torch.Tensor, seqlen_k: int, block_q: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``[NQ, NK]`` for the block grid of ``lo, hi`` ``[R, Sq]``.

    ``full`` blocks need no mask_mod; ``partial`` blocks do; the rest are empty.
    Conservative (see module docstring). Costs O(R * (Sq + NQ * NK)).
    """
    r, sq = lo.shape
    nq, nk = -(-sq // block_q), -(-seqlen_k // block_k)
    pad = nq * block_q - sq
    # Padded rows see nothing (lo = 0, hi = -1): they never make a block full.
    lo_b = torch.nn.functional.pad(lo.long(), (0, pad), value=0).view(r, nq, block_q)
    hi_b = torch.nn.functional.pad(hi.long(), (0, pad), value=-1).view(r, nq, block_q)
    valid = lo_b <= hi_b
    big = torch.iinfo(torch.int64).max
    kmin = torch.where(valid, lo_b, big).amin(-1)  # [R, NQ]: lowest key any row sees
    kmax = torch.where(valid, hi_b, -1).amax(-1)  # highest key any row sees
    lo_max = lo_b.amax(-1)  # every row sees keys from lo_max ...
    hi_min = torch.where(valid, hi_b, -1).amin(-1)  # ... up to hi_min (if all valid)
    all_valid = valid.all(-1)
    ka = torch.arange(nk, device=lo.device) * block_k  # first key of each k-block
    kb = torch.clamp(ka + block_k, max=seqlen_k) - 1  # last key
    kmin, kmax, lo_max, hi_min, all_valid = (
        t.unsqueeze(-1) for t in (kmin, kmax, lo_max, hi_min, all_valid)
    )
    touched = ((kmin <= kb) & (kmax >= ka)).any(0)
    whole_k = (ka + block_k) <= seqlen_k  # the tail k-block is never full
    full = (all_valid & (lo_max <= ka) & (hi_min >= ka + block_k - 1) & whole_k).any(0)
    return touched & ~full, full


def _indices(blocks_QK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks [1, 1, NQ], indices [1, 1, NQ, NK]) int32, selected blocks first."""
    num = blocks_QK.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks_QK).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


class FlexMask:
    """A :class:`Mask` prepared for flex: its BlockMask and the rows that see no key."""

    def __init__(self, mask: Mask, device: torch.device, block_q: int, block_k: int):
        sq, sk = mask.shape
        lo, hi = mask.row_intervals(device)
        self.slots = lo.shape[0]
        self.partial, self.full = classify_blocks(lo, hi, sk, block_q, block_k)
        kv_num, kv_idx = _indices(self.partial)
        full_num, full_idx = _indices(self.full)
        # mask_mod reads lo/hi at q_idx; pad to whole q-blocks so no read is out of range.
        pad = -(-sq // block_q) * block_q - sq
        lo_p = torch.nn.functional.pad(lo, (0, pad), value=0)
        hi_p = torch.nn.functional.pad(hi, (0, pad), value=-1)
        los, his = list(lo_p.unbind(0)), list(hi_p.unbind(0))

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (los[0][q_idx] <= kv_idx) & (kv_idx <= his[0][q_idx])
            for lo_r, hi_r in zip(los[1:], his[1:]):
                keep = keep | ((lo_r[q_idx] <= kv_idx) & (kv_idx <= hi_r[q_idx]))
            return keep

        self.block_mask = BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(block_q, block_k),
            mask_mod=mask_mod,
            seq_lengths=(sq, sk),
        )
        self.empty_rows = torch.nonzero((lo > hi).all(0)).flatten()
        # Keys no row sees: a difference array over the rows' intervals.
        valid = lo <= hi
        cover = torch.zeros(sk + 1, dtype=torch.int64, device=lo.device)
        cover.index_add_(0, lo[valid].long(), torch.ones_like(lo[valid], dtype=torch.int64))
        cover.index_add_(0, hi[valid].long() + 1, -torch.ones_like(hi[valid], dtype=torch.int64))
        unseen = torch.cumsum(cover[:sk], 0) == 0
        # Only keys in a tile that some partial block loads can meet a row in a product
        # (a full block's keys are all seen; other tiles are never read): zeroing those
        # alone keeps the copy of K and V off most blocks (packed documents: none).
        loaded = self.partial.any(0).repeat_interleave(block_k)[:sk]
        self.unseen_keys = torch.nonzero(unseen & loaded).flatten()


def _hide_unseen(k, v, fm: FlexMask):
    """K and V with the keys that no row of the block sees zeroed. Flex computes whole
    tiles, and a masked pair's zero probability times a NaN or inf value (or, for dq,
    key) is NaN: zeroing keys that nobody may read keeps such values out of every row.
    Keys that some rows see cannot be zeroed; docs/DESIGN.md says what holds there."""
    if fm.unseen_keys.numel() == 0:
        return k, v
    return k.index_fill(2, fm.unseen_keys, 0.0), v.index_fill(2, fm.unseen_keys, 0.0)


@functools.lru_cache(maxsize=64)
def flex_mask(
    mask: Mask, device: torch.device, block_q: int = BLOCK_SIZE, block_k: int = BLOCK_SIZE
) -> FlexMask:
    """The cached :class:`FlexMask` of ``mask`` on ``device``."""
    return FlexMask(mask, device, block_q, block_k)


# ---------------------------------------------------------------------------------------
# Forward / recompute
# ---------------------------------------------------------------------------------------


#: Compiled graphs dynamo may keep for flex_attention's code while our calls run (its
#: default, 8, counts every variant structure x grad mode x static / symbolic shapes, and
#: past it dynamo silently runs flex's eager path, which materialises the scores).
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _recompile_room():
    """Dynamo's recompile limit raised to :data:`RECOMPILE_LIMIT` for one call (restored
    after: the limit is per code object, and a user's own compiled code keeps theirs)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    setattr(cfg, name, max(old, RECOMPILE_LIMIT))
    try:
        yield
    finally:
        setattr(cfg, name, old)


def _call_flex(fn, q, k, v, fm: FlexMask, scale: float, score_mod=None):
    """(out, lse) from flex, lse natural log in flex's dtype (differentiable); a compiled
    ``fn`` runs with room for every variant's graph (:func:`_recompile_room`)."""
    room = contextlib.nullcontext() if fn is flex_attention else _recompile_room()
    with room:
        return _flex_call(fn, q, k, v, fm, scale, score_mod)


def _flex_call(fn, q, k, v, fm: FlexMask, scale: float, score_mod=None):
    gqa = q.shape[1] != k.shape[1]
    if AuxRequest is not None:
        out, aux = fn(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=fm.block_mask,
            scale=scale,
            enable_gqa=gqa,
            return_aux=AuxRequest(lse=True),
        )
        return out, aux.lse
    return fn(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=fm.block_mask,
        scale=scale,
        enable_gqa=gqa,
        return_lse=True,
    )


def variant_score_mod(variant, sq: int, sk: int, device, alibi=None):
    """A softmax :class:`~hamilton_attn.variants.BlockVariant` as one flex ``score_mod``
    (scores arrive scaled): the user's score_mod on global positions and heads, then
    softcap, then ALiBi; ``alibi`` overrides the variant's slopes (a leaf to
    differentiate against). None for plain softmax."""
    if variant is None:
        return None
    qp, kp = variant.positions(slice(0, sq), sk, device)
    user, cap, head0, shift = variant.score_mod, variant.softcap, variant.head0, variant.shift
    slopes = variant.alibi if alibi is None else alibi

    def mod(score, b, h, q_idx, kv_idx):
        i, j = qp[q_idx], kp[kv_idx]
        if user is not None:
            score = user(score, b, h + head0, i, j)
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[b, h].to(score.dtype) * (i + shift - j).abs().to(score.dtype)
        return score

    return mod


def _dense_forward(q, k, v, mask: Mask, scale: float, variant=None, alibi=None):
    """Differentiable masked softmax attention in torch (CPU recompute path)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq = q.shape[1]
    kf, vf = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
    s = torch.matmul(q.to(ct), kf.transpose(-1, -2)) * scale
    if variant is not None:
        s = variant.transform(s, slice(0, q.shape[2]), alibi=alibi)
    s = s.masked_fill(~mask.to_dense(q.device), float("-inf"))
    # A row that sees nothing (the mask, or a score_mod's -inf everywhere) takes lse -inf
    # outside autograd: logsumexp's backward there is 0 x NaN, which reached the ALiBi
    # slopes' gradient.
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, torch.zeros_like(s), s), dim=-1)
    lse = lse.masked_fill(dead.squeeze(-1), float("-inf"))
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(s - safe.unsqueeze(-1)), vf)
    return out.to(q.dtype), lse


def share_of_gradient(fwd, dout, q, k, v, out, lse, extra=None):
    """This block's share of ``(dq, dk, dv)`` by recompute (see module docstring).

    ``fwd(q, k, v) -> (out_i, lse_i)`` is the block's differentiable forward; ``out`` /
    ``lse`` the (possibly merged) result the loss saw. ``extra``: a leaf ``fwd`` also
    reads (ALiBi slopes); its gradient share comes back as a fourth result.
    """
    with torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out_i, lse_i = fwd(qg, kg, vg)
        ct = lse_dtype(q.dtype)  # float32 math, float64 for float64 inputs
        lse_f, lse_i_f = lse.to(ct), lse_i.detach().to(ct)
        dead = torch.isneginf(lse_i_f) | torch.isneginf(lse_f)
        c = torch.where(dead, torch.zeros_like(lse_f), torch.exp(lse_i_f - lse_f))
        g_out = (dout.to(ct) * c.unsqueeze(-1)).to(out_i.dtype)
        delta = (dout.to(ct) * out.to(ct)).sum(-1)
        g_lse = (g_out.to(ct) * out_i.detach().to(ct)).sum(-1) - c * delta
        g_lse = torch.where(dead, torch.zeros_like(g_lse), g_lse)
        leaves = (qg, kg, vg) if extra is None else (qg, kg, vg, extra)
        grads = torch.autograd.grad(
            (out_i, lse_i), leaves, (g_out, g_lse.to(lse_i.dtype)), allow_unused=True
        )
    dq, dk, dv = grads[:3]
    shares = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    return shares if extra is None else (*shares, grads[3])


class FlexKernel(FastPathKernel):
    """Any mask on FlexAttention; see the module docstring.

    Args:
        block_size: BlockMask block size (q and k); 128 matches flex's default kernels.
    """

    name = "flex"

    def __init__(self, block_size: int = BLOCK_SIZE):
        if block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        self.block_size = block_size

    def available(self, device: torch.device) -> bool:
        return _HAVE_FLEX and torch.device(device).type in ("cpu", "cuda")

    def unsupported_reason(self, q, k, v, mask: Mask) -> str | None:
        if not _HAVE_FLEX:
            return f"FlexAttention is not in torch {torch.__version__}"
        dev = q.device.type
        if dev not in ("cpu", "cuda"):
            return f"runs on cpu and cuda only, got {dev}"
        dtypes = _GPU_DTYPES if dev == "cuda" else _CPU_DTYPES
        if q.dtype not in dtypes:
            return f"dtype {q.dtype} unsupported on {dev} (supported: {dtypes})"
        d, dv = q.shape[-1], v.shape[-1]
        if dev == "cuda" and not (16 <= d <= 256 and 16 <= dv <= 256):
            return f"head dims {d}/{dv} outside 16..256 (compiled flex kernels)"
        slots = _slots(mask)
        if slots > MAX_SLOTS:
            return f"{slots} key intervals in one row, more than {MAX_SLOTS}"
        return None

    def variant_problem(self, variant, device=None) -> str | None:
        """Softmax variants (score_mod, softcap, ALiBi) through flex's own score_mod;
        not the unnormalised kinds (flex normalises)."""
        if variant.kind != "softmax":
            return f"FlexAttention normalises: it cannot run the {variant.kind} variant"
        return None

    def _prepared(self, q, mask: Mask) -> FlexMask:
        return flex_mask(mask, q.device, self.block_size, self.block_size)

    def _prepare(self, q, k, v, mask: Mask) -> None:
        # Only the check: the FlexMask is built where the fast path runs (a CPU block
        # with non-finite inputs goes to the reference kernel without one).
        reason = self.unsupported_reason(q, k, v, mask)
        if reason is not None:
            raise ValueError(f"flex backend cannot run this block: {reason}")

    def _forward(self, q, k, v, mask: Mask, scale: float, prepared: None, variant=None):
        # Flex's CPU path materialises the scores (0 x NaN at masked pairs): the base
        # class has sent CPU blocks with non-finite K or V to the reference kernel.
        fm = self._prepared(q, mask)
        # flex refuses CPU inputs that require grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
        if q.is_cuda:
            k, v = _hide_unseen(k, v, fm)
        mod = variant_score_mod(variant, q.shape[2], k.shape[2], q.device)
        with torch.no_grad():
            if q.is_cuda:
                out, lse = _call_flex(compiled_flex_attention(), q, k, v, fm, scale, mod)
            else:
                with warnings.catch_warnings():
                    # The eager-path performance warning is expected here.
                    warnings.simplefilter("ignore")
                    out, lse = _call_flex(flex_attention, q, k, v, fm, scale, mod)
        lse = lse.to(lse_dtype(q.dtype))
        if fm.empty_rows.numel():
            out = out.index_fill(2, fm.empty_rows, 0.0)
            lse = lse.index_fill(2, fm.empty_rows, float("-inf"))
        return out, lse

    def differentiable(self, q, k, v, mask: Mask, scale: float):
        """On GPU: compiled flex with its own backward (no recompute of the forward, which
        the block-share backward needs); None on CPU, where flex has no backward."""
        if not q.is_cuda or mask.is_empty() or self.unsupported_reason(q, k, v, mask):
            return None
        fm = self._prepared(q, mask)
        k, v = _hide_unseen(k, v, fm)  # differentiable: unseen keys get zero gradients
        out, lse = _call_flex(compiled_flex_attention(), q, k, v, fm, scale)
        lse = lse.detach().to(lse_dtype(q.dtype))
        if fm.empty_rows.numel():
            out = out.index_fill(2, fm.empty_rows, 0.0)
            lse = lse.index_fill(2, fm.empty_rows, float("-inf"))
        return out, lse

    def _backward(
        self, dout, q, k, v, out, lse, mask: Mask, scale: float, prepared: None, variant=None
    ):
        want_alibi = variant is not None and variant.alibi_grad is not None
        alibi = variant.alibi.detach().requires_grad_() if want_alibi else None
        if q.is_cuda:
            fm = self._prepared(q, mask)
            fn = compiled_flex_attention()
            mod = variant_score_mod(variant, q.shape[2], k.shape[2], q.device, alibi)

            def fwd(qg, kg, vg):
                return _call_flex(fn, qg, *_hide_unseen(kg, vg, fm), fm, scale, mod)
        else:

            def fwd(qg, kg, vg):
                return _dense_forward(qg, kg, vg, mask, scale, variant, alibi)

        got = share_of_gradient(fwd, dout, q, k, v, out, lse, alibi)
        if want_alibi:
            if got[3] is not None:
                variant.alibi_grad += got[3].to(variant.alibi_grad.dtype)
            got = got[:3]
        return got


@functools.lru_cache(maxsize=4096)
def _slots(mask: Mask) -> int:
    """Most bands covering one row (= R of ``row_intervals``), from the bands alone."""
    events = sorted([(b.q0, 1) for b in mask.bands] + [(b.q1, -1) for b in mask.bands])
    most = cur = 0
    for _, step in events:
        cur += step
        most = max(most, cur)
    return most


__all__ = [
    "BLOCK_SIZE",
    "FlexKernel",
    "FlexMask",
    "MAX_SLOTS",
    "classify_blocks",
    "compiled_flex_attention",
    "flex_mask",
    "share_of_gradient",
]
