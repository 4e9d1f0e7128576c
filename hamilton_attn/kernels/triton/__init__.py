"""``triton``: our own fused attention kernel, any mask in one launch.

A block's mask (a union of bands: MagiAttention's four rectangle types, windows,
packed documents, the staircase of a fused context-parallel step) becomes host-side
work lists (:mod:`.tiles`: per query tile the key tiles it meets, full or partial, and
the transposed lists for dK/dV), and one Triton kernel walks them (:mod:`.jit`):

- forward: ONE launch for the whole block, ``(out, lse)`` (``(out, None)`` for the
  unnormalised sigmoid / relu variants);
- backward: ``delta = rowsum(dout * out)`` (softmax), then dK/dV over key tiles (GQA
  heads summed in the program) with each query tile's dQ share added into a float32
  buffer by TMA reduce-adds on Hopper (:data:`DQ_ADD`), or, for short documents, older
  GPUs and ALiBi slope gradients, a dQ pass over query tiles of its own, first,
  which then makes delta itself (:data:`FUSED_DELTA`); from the given, possibly
  merged, ``out`` / ``lse``.

Variants (:class:`~hamilton_attn.variants.BlockVariant`) compile in as constexpr
specialisations: softmax with softcap and / or ALiBi (``alibi_grad`` gets this block's
d slopes), sigmoid, relu; ``score_mod`` is refused (``auto`` then takes flex or the
reference). Inputs: ``bhsd`` views with unit stride on D (bshd / thd memory passes its
strides, nothing is copied), GQA / MQA, head dims up to 256 (padded to a power of two),
fp16 / bf16 / fp32 (fp32 dots in IEEE precision, so the kernel is exact like the others).

On CPU the kernels run under Triton's interpreter when ``config.triton_interpret``
(``TRITON_INTERPRET=1``) is on; tile sizes are then 16 so tiny tests cover many tiles.
"""

from __future__ import annotations

import functools

import torch

from ... import config
from ...masks import Mask
from ..base import AttentionKernel, check_block, empty_result, zeros_bhsd
from . import score_mod as _score_mod
from .launch import _KINDS, LOG2E, _scalars, load, variant_args
from .tiles import TileLists, ragged_counts, ragged_lists, row_intervals, tile_counts, tile_lists

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Launch configurations ``(BM, BN, num_warps, num_stages)`` by head-dim bucket, per pass
#: (forward; dQ; dK/dV). The forward's first entry is its default; the others are
#: tried per mask by :func:`_pick` (small tiles waste less on short documents).
#: Tuned on one H200 (``benchmarks/gpu_triton.py``).
CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(64, 32, 4, 2)],
    },
    "dq": {
        64: [(64, 32, 4, 3)],
        128: [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 32, 8, 1)],
    },
    "dkdv": {
        64: [(32, 64, 4, 3)],
        128: [(64, 128, 8, 3), (32, 64, 4, 2)],
        256: [(32, 32, 8, 1)],
    },
}
#: Relative speed of each candidate on a dense tile (the first is 1): the pick minimises
#: ``tiles * BM * BN / speed``.
#: (2026-12-02 sweep, H200, D 128: causal 32K picks the first of each pass, lognormal
#: documents 128 x 128 / 64 x 64 / 64 x 128, 64-512-token documents the smallest; the
#: 2026-12-03 A/B: 64 x 64 forward tiles win on the 8K-per-rank fused document steps,
#: 342 against 316 TF/s, so the second forward candidate weighs 0.965 and the third 0.92,
#: which keeps every other case's pick.)
#: (2026-12-03 s6b: 128 x 128 dQ tiles on 2 stages lift dense causal forward+backward
#: from 395 to 404 TF/s, so they lead the dQ list at 0.98 for the former first.)
SPEED = {"fwd": (1.0, 0.965, 0.92), "dq": (1.0, 0.98, 0.97, 0.93), "dkdv": (1.0, 0.85)}
#: What a partial tile (its elements tested against the mask) costs beyond a full one,
#: in full tiles of its size, per pass. The forward's was fitted to the s6 / s6b runs:
#: long-tailed documents at 32K run 489 TF/s on 64 x 64 tiles against 441-452 on
#: 128 x 128 (a tenth of those partial), while dense causal keeps 128 x 128 (510 against
#: 482); counting tiles alone picked 128 x 128 for both. dQ's the same, which keeps those
#: documents on 64 x 64 dQ tiles (341 TF/s forward+backward against 314 on 128 x 64).
PARTIAL_COST = {"fwd": 1.0, "dq": 1.0}
#: Where a variant ranks the candidates otherwise, ``(pass, variant): speeds``. Softcap's
#: second special function per score (tanh before exp2) waits on latency that 128 x 128
#: tiles at 255 registers, one program per SM, cannot hide (Nsight Compute: 0.80x plain
#: inside the kernel); 64 x 64 tiles on 4 warps, several programs per SM, run it at 482
#: against 437-440 TF/s forward on causal 32K, where plain softmax runs 507-516 and 482
#: (results/triton_ab_H200_2026-12-03_s6.md).
#: A compiled score_mod that gathers from tables ranks them as softcap does (untimed, from
#: static resources: on 128 x 128 tiles, 8 warps, its forward spilled 480-568 bytes a
#: thread against plain's 144; on 64 x 64, 4 warps, 96-288, softcap's 80:
#: ``benchmarks/triton_resources.py``, results/triton_resources_sm90_2026-12-04.md).
SPEED_VARIANT = {("fwd", "softcap"): (1.0, 1.10, 1.05), ("fwd", "score_mod"): (1.0, 1.10, 1.05)}
_INTERP_CONFIG = (16, 16, 1, 1)
#: Test partial tiles against per-row key intervals where the mask allows
#: (:func:`.tiles.row_intervals`); off: always against the bands (tests switch it).
USE_ROW_INTERVALS = True
#: Walk every entry in one loop (``FLAT``: full tiles tested against the row intervals
#: too) instead of a loop per run of full tiles: None decides per work list
#: (:meth:`.tiles.TileLists.short_runs`: short documents); True / False force it where
#: row intervals exist (tests and the tuning sweep switch it).
FLAT_LOOP: bool | None = None
#: Load the tiles each kernel streams (K / V; Q / dO for dK/dV) through TMA tensor
#: descriptors (Hopper's bulk copies: no per-element address arithmetic, zeros past the
#: ends). False (default): on Triton 3.6 and an H200 they were slower than pointer loads
#: (results/triton_ab_H200_2026-12-03_s4.md); None: on where the GPU has TMA (compute
#: capability 9+) and the strides allow it; True forces it (tests, the A/B benchmark).
TMA: bool | None = False
#: ALiBi on implicit positions keeps scores shifted by a per-row term, so tiles whose
#: keys all precede their queries add one per-key term (:func:`.jit._fwd_tile`).
ALIBI_SPLIT = True
#: Where no visible key follows its query (given ALiBi's shift), the split scores skip
#: the test for such keys (``BEHIND``) and, with ``ALIBI_MMA``, start the QK^T dot from
#: the per-key term, taking plain softmax's fused update (causal 32K forward 480-489 TF/s
#: against 457-461, plain 512: results/triton_ab_H200_2026-12-04_s10b.md).
ALIBI_BEHIND = True
ALIBI_MMA = True
#: The forward's row-interval test as one unsigned comparison (:func:`.jit._rows_vis_u`);
#: None: where the ``FLAT`` loop tests every tile (short documents 188 against 184 TF/s;
#: dense causal 488 against 506, so off there: results/triton_ab_H200_2026-12-04_s10d.md).
UNSIGNED_ROWS: bool | None = None
#: Where the ``FLAT`` loop runs and every row tile's entries are consecutive columns
#: (packed causal documents, windows), walk them as a counted loop (no per-entry column
#: load between one tile's K / V and the next; 64-512-token documents 161 -> 166 TF/s
#: forward at 32K, 145 -> 156 at 128K, results/triton_ab_H200_2026-12-03_s5.md).
RANGE_LOOP = True
#: Ragged row tiles (:func:`.tiles.ragged_lists`: tiles start where documents start, keys
#: from each tile's first key): None takes them where the grid's lists would run the
#: ``FLAT`` loop anyway (short documents) and the ragged ones visit fewer tiles; True
#: wherever the mask allows (tests); False (default) never. On an H200 they visit 7-12%
#: fewer tiles on 64-512-token documents yet run no faster: forward 185 against 185
#: TF/s on the same 64 x 32 tiles (more, shorter programs: the per-program cost bounds
#: it, not the tiles), forward+backward 119 against 136 with ragged dK/dV tiles
#: (results/triton_ab_H200_2026-12-03_s7.md).
RAGGED: bool | None = False
#: dQ in the dK/dV pass (no dQ pass, no second QK^T / dO V^T): each query tile's share
#: added into a float32 buffer, then scaled and cast. 0: a dQ pass; 1: atomic adds; 2:
#: TMA reduce-adds (compiled, Hopper; 1 where a descriptor cannot address the buffer);
#: None (default): 2 on a GPU with TMA (compute capability 9+) unless the dK/dV lists
#: are short documents' (:meth:`.tiles.TileLists.short_runs`), else 0. Never where ALiBi
#: slopes want their gradient (the dQ pass sums it). On an H200 (results/
#: triton_ab_H200_2026-12-03_s7b.md, forward+backward TF/s, TMA reduce-adds against a
#: dQ pass): dense causal 32K 435-439 against 403-406, dense full 438 / 404, softcap 410 /
#: 364, ALiBi 416 / 383, long-tailed documents 359 / 342, the fused Hamilton steps at 8K
#: per rank 368 / 348 (causal) and 306 / 294 (documents); atomic adds gain nothing (404,
#: 339, 287); on 64-512-token documents both lose (100-103 against 135).
DQ_ADD: int | None = None
#: Where the backward runs a dQ pass on grid tiles (softmax), that pass makes each row's
#: ``delta = dO . out`` from its tiles of dO (already loaded) and out, for the dK/dV pass
#: after it, instead of a delta kernel reading both (``OWN_DELTA`` in :mod:`.jit_bwd`).
#: On an H100 (results/triton_ab_H100_2026-12-08_s16.md, forward+backward TF/s, against
#: the delta kernel): 64-512-token documents 130 / 129 against 125 / 124 at 32K, 108
#: against 105 at 128K, their ALiBi 128 against 122; the forward unchanged.
FUSED_DELTA = True
#: Heads per launch group (:func:`.jit._program`): 1, one head's row tiles (heaviest
#: first) before the next head's, so the last head's heaviest tiles start once every
#: other head's are dispatched and run on alone (the tail); ``n`` > 1: groups of ``n``
#: heads, within one each head's heaviest tile, then each head's next. A list-scheduling
#: model of the tile lists (132 SMs, each program one unit plus its tiles) puts the tail
#: of 1 at 5-10% of the 8K-per-rank Hamilton / direct steps and 3-5% of long-tailed
#: documents, of 8 below 1% (``benchmarks/launch_order_model.py``). Timed on an H100
#: (results/triton_ab_H100_2026-12-08_s16.md, forward / forward+backward TF/s, two runs
#: each): the 8K-per-rank Hamilton document step gains (1: 401-407 / 307-310; 4: 423-427 /
#: 318-322; 8: 413-420 / 322-326), but 8 heads cost 64-512-token documents 40% (105-106 /
#: 96-97 against 166-177 / 124-125) and long-tailed ones 7-10% forward (433-446 against
#: 479-480), 32 heads lose everywhere (dense causal 508 / 419 against 525 / 439); the
#: model sees no such cost (more heads' K / V in flight against L2 is a guess, not
#: profiled). So 1, the switch kept for a rule per mask that a later run can time.
HEAD_GROUP = 1


def _bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _pick(
    mask: Mask,
    pass_: str,
    d: int,
    interpret: bool,
    device: torch.device,
    wide=False,
    flavour="softmax",
):
    """``(config, tile lists)`` for one pass of ``mask``: the candidate with the least
    estimated work (tiles visited, partial ones weighted by :data:`PARTIAL_COST`, times
    their area, over the candidate's speed for this ``flavour`` of variant,
    :data:`SPEED_VARIANT`), on the grid or ragged (:data:`RAGGED`). ``wide`` (float32
    inputs): the smallest tiles (those of head dim 256), which fit shared memory.
    Cached per mask and the switches the lists depend on."""
    switches = (RAGGED, USE_ROW_INTERVALS, FLAT_LOOP, RANGE_LOOP)
    return _picked(mask, pass_, d, interpret, device, wide, flavour, switches)


@functools.lru_cache(maxsize=1024)
def _picked(mask, pass_, d, interpret, device, wide, flavour, switches):
    transpose = pass_ == "dkdv"
    if interpret:
        cfg = _INTERP_CONFIG
        lists = tile_lists(mask, cfg[0], cfg[1], transpose, device)
        return cfg, _ragged_or(lists, mask, cfg, transpose, device)
    best = None
    speeds = SPEED_VARIANT.get((pass_, flavour), SPEED[pass_])
    extra = PARTIAL_COST.get(pass_, 0.0)
    for cfg, speed in zip(CONFIGS[pass_][256 if wide else _bucket(d)], speeds, strict=False):
        lists = _ragged_or(tile_lists(mask, cfg[0], cfg[1], transpose, device), mask, cfg,
                           transpose, device)  # fmt: skip
        cost = (lists.n_entries + extra * lists.n_partial) * cfg[0] * cfg[1] / speed
        if best is None or cost < best[0]:
            best = (cost, cfg, lists)
    return best[1], best[2]


_pick.cache_clear = _picked.cache_clear  # the benchmarks' A/B clears it


def _ragged_or(lists: TileLists, mask: Mask, cfg, transpose: bool, device) -> TileLists:
    """The ragged lists for ``cfg`` where :data:`RAGGED` takes them, else ``lists``."""
    if RAGGED is False or not USE_ROW_INTERVALS or row_intervals(mask, device) is None:
        return lists
    if RAGGED is None:
        counts = ragged_counts(mask, cfg[0], cfg[1], transpose)
        if counts is None or counts[0] >= lists.n_entries or not _range(lists, True):
            return lists
    return ragged_lists(mask, cfg[0], cfg[1], transpose, device) or lists


def forward_work(mask: Mask, d: int) -> tuple[int, int, int]:
    """``(tiles, partial tiles, pairs of the tiles)`` the compiled forward visits for
    ``mask`` at head dim ``d`` (for :mod:`..choice`; host arrays only; cached per mask
    and the switches the lists depend on, as :func:`_pick`)."""
    return _forward_work(mask, d, (RAGGED, USE_ROW_INTERVALS, FLAT_LOOP, RANGE_LOOP))


@functools.lru_cache(maxsize=4096)
def _forward_work(mask: Mask, d: int, switches) -> tuple[int, int, int]:
    best = None
    extra = PARTIAL_COST.get("fwd", 0.0)
    for cfg, speed in zip(CONFIGS["fwd"][_bucket(d)], SPEED["fwd"], strict=False):
        n, partial = tile_counts(mask, cfg[0], cfg[1])
        if RAGGED is not False and USE_ROW_INTERVALS and _short(mask, cfg):
            ragged = ragged_counts(mask, cfg[0], cfg[1], False)
            if ragged is not None and ragged[0] < n:  # as _ragged_or picks them (None)
                n, partial = ragged
        cost = (n + extra * partial) * cfg[0] * cfg[1] / speed
        if best is None or cost < best[0]:
            best = (cost, n, partial, n * cfg[0] * cfg[1])
    return best[1], best[2], best[3]


def _short(mask: Mask, cfg) -> bool:
    """Whether the grid's forward lists of ``cfg`` take the ``RANGE`` loop (counts only)."""
    if FLAT_LOOP is False or not RANGE_LOOP:
        return False
    lists = tile_lists(mask, cfg[0], cfg[1], False, torch.device("cpu"))
    return _range(lists, True)


def _flat(lists: TileLists, rows) -> bool:
    if lists.ragged:
        return True
    if rows is None:
        return False
    return lists.short_runs() if FLAT_LOOP is None else FLAT_LOOP


def _unsigned_rows(lists: TileLists, rows) -> bool:
    """Whether the forward tests row intervals unsigned (:data:`UNSIGNED_ROWS`)."""
    return _flat(lists, rows) if UNSIGNED_ROWS is None else UNSIGNED_ROWS


def _range(lists: TileLists, rows) -> bool:
    """``RANGE``: the ``FLAT`` loop as a counted loop over each row tile's columns."""
    return lists.ragged or (RANGE_LOOP and lists.contiguous and _flat(lists, rows))


def _keys_behind(mask: Mask, shift: int) -> bool:
    """Whether every visible pair has its key at or before its query (``j <= i + shift``)."""
    return all(min(b.hi, b.k1 - 1 - b.q0) <= shift for b in mask.bands)


def _list_flags(L, rows) -> dict:
    """The constexprs every pass takes of its work lists."""
    return dict(FLAT=_flat(L, rows), RANGE=_range(L, rows), RAGGED=L.ragged)


def _descriptor(t: torch.Tensor, bn: int, bd: int):
    """A 4-d ``[B, H, S, D]`` TMA descriptor of ``t`` with ``[1, 1, bn, bd]`` boxes, or
    None where TMA cannot address it (unaligned base or strides, a zero stride). A size-1
    dimension's stride is never used, so it is replaced by an aligned one."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    item = t.element_size()
    strides = list(t.stride())
    for i in (2, 1, 0):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1] if i < 2 else t.shape[3]
    if t.data_ptr() % 16 or any(st <= 0 or st * item % 16 for st in strides[:3]):
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, bn, bd])


def _use_tma(q: torch.Tensor, interp: bool) -> bool:
    if TMA is not None:
        return TMA
    return not interp and torch.cuda.get_device_capability(q.device)[0] >= 9


def _interpret(device: torch.device) -> bool:
    return config.get().triton_interpret or device.type != "cuda"


class TritonKernel(AttentionKernel):
    """The ``triton`` backend (module docstring)."""

    name = "triton"

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type != "cuda" and not config.get().triton_interpret:
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return device.type != "cuda" or torch.cuda.is_available()

    def unsupported_reason(self, q, k, v, mask: Mask) -> str | None:
        if not self.available(q.device):
            return f"needs CUDA (or TRITON_INTERPRET=1 on CPU), got {q.device}"
        if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            return f"runs float16 / bfloat16 / float32 only, got {q.dtype}"
        d = q.shape[-1]
        if d > 256 or v.shape[-1] != d:
            return f"runs head dims up to 256 with Dv == D, got D={d}, Dv={v.shape[-1]}"
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return "needs unit stride on the head dim"
        return None

    def variant_problem(self, variant, device=None) -> str | None:
        if variant is None:
            return None
        if variant.kind not in _KINDS:
            return f"has no {variant.kind!r} variant"
        if variant.score_mod is not None:
            if device is None:
                return "compiles a score_mod only for a known device"
            got = _score_mod.compiled_for(variant, device)
            if isinstance(got, str):
                return got
        if variant.alibi is not None and variant.alibi.dtype != torch.float32:
            return f"takes float32 ALiBi slopes, got {variant.alibi.dtype}"
        return None

    # -- shared launch arguments ---------------------------------------------------------

    def _check(self, q, k, v, mask, variant):
        check_block(q, k, v, mask)
        reason = self.unsupported_reason(q, k, v, mask)
        if reason is None and variant is not None:
            reason = self.variant_problem(variant, q.device)
        if reason is not None:
            raise ValueError(f"backend: 'triton' cannot run this block: {reason}")

    _variant_args = staticmethod(variant_args)

    @staticmethod
    def _lists_args(L: TileLists, rows):
        rlo, rhi = rows if rows is not None else (L.ptr, L.ptr)
        r0, r1 = (L.r0, L.r1) if L.ragged else (L.ptr, L.ptr)
        return (
            L.order, L.ptr, L.mid, L.col, L.b0, L.b1, L.band_idx, L.bands,
            L.run_ptr, L.run_start, L.run_len, L.first, rlo, rhi, r0, r1,
        )  # fmt: skip

    @staticmethod
    def _rows(mask, device):
        return row_intervals(mask, device) if USE_ROW_INTERVALS else None

    # -- forward / backward --------------------------------------------------------------

    def forward(self, q, k, v, mask: Mask, scale: float, variant=None):
        """``(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] float32)``; lse is None for
        the sigmoid / relu variants."""
        self._check(q, k, v, mask, variant)
        normalised = variant is None or variant.kind == "softmax"
        if mask.is_empty():
            out, lse = empty_result(q, v)
            return (out, lse) if normalised else (out, None)
        interp = _interpret(q.device)
        if interp and q.dtype == torch.bfloat16:
            # Triton 3.6's interpreter (numpy) has no bfloat16: run float32 copies.
            out, lse = self.forward(q.float(), k.float(), v.float(), mask, scale, variant)
            return out.to(q.dtype), lse
        b, hq, sq, d = q.shape
        hk, sk = k.shape[1], k.shape[2]
        va = self._variant_args(q, variant)
        jit = load(interp, va["source"])
        flavour = "softcap" if va["SOFTCAP"] else "softmax"
        if va["gathers"]:  # a score_mod gathering from tables
            flavour = "score_mod"
        (bm, bn, warps, stages), L = _pick(
            mask, "fwd", d, interp, q.device, q.dtype == torch.float32, flavour
        )
        out = zeros_bhsd(q, fill=False)
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        extra = {} if interp else dict(num_warps=warps, num_stages=stages)
        rows = self._rows(mask, q.device)
        plain = va["kind"] == 0 and not (va["SOFTCAP"] or va["ALIBI_ON"] or va["MOD"])
        kd = vd = None
        if _use_tma(q, interp):
            kd, vd = _descriptor(k, bn, _pow2(d)), _descriptor(v, bn, _pow2(d))
        tma = kd is not None and vd is not None
        split = (
            ALIBI_SPLIT
            and va["kind"] == 0
            and va["ALIBI_ON"]
            and not va["QPOS_ON"]
            and not va["KPOS_ON"]
            and not va["MOD"]
        )
        behind = split and ALIBI_BEHIND and _keys_behind(mask, va["shift"])
        jit.fwd_kernel[(L.n_rows, b * hq)](
            q,
            kd if tma else k,
            vd if tma else v,
            out,
            lse,
            *self._lists_args(L, rows),
            va["alibi"],
            va["qpos"],
            va["kpos"],
            va["modf"],
            va["modi"],
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *out.stride()[:3],
            hq,
            hq // hk,
            sq,
            sk,
            *_scalars(scale, va),
            KIND=va["kind"],
            SOFTCAP=va["SOFTCAP"],
            ALIBI_ON=va["ALIBI_ON"],
            QPOS_ON=va["QPOS_ON"],
            KPOS_ON=va["KPOS_ON"],
            CAPMAX=va["CAPMAX"],
            SPLIT=split,
            BEHIND=behind,
            TMA=tma,
            ROWS=rows is not None,
            **_list_flags(L, rows),
            FUSE=(plain or (behind and ALIBI_MMA and not va["SOFTCAP"])) and scale > 0,
            FAST=q.dtype == torch.bfloat16 and not interp,
            D=d,
            BD=_pow2(d),
            BM=bm,
            BN=bn,
            PREC=prec,
            UNIT=LOG2E if va["kind"] == 0 else 1.0,
            INTERP=interp,
            UVIS=_unsigned_rows(L, rows),
            MOD=va["MOD"],
            HG=HEAD_GROUP,
            **extra,
        )
        return (out, lse) if normalised else (out, None)

    def backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, variant=None):
        """This block's share of ``(dq, dk, dv)`` given the (possibly merged) ``out`` /
        ``lse`` (unused by sigmoid / relu); adds d slopes into ``variant.alibi_grad``."""
        self._check(q, k, v, mask, variant)
        if mask.is_empty():
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        interp = _interpret(q.device)
        if interp and q.dtype == torch.bfloat16:  # as in forward
            f = [t.float() for t in (dout, q, k, v, out)]
            grads = self.backward(*f, lse, mask, scale, variant)
            return tuple(g.to(torch.bfloat16) for g in grads)
        from . import passes

        b, hq, sq, d = q.shape
        va = self._variant_args(q, variant)
        jit = load(interp, va["source"])
        softmax = va["kind"] == 0
        bd = _pow2(d)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        agrad = variant.alibi_grad if variant is not None else None
        agrad_on = agrad is not None and va["ALIBI_ON"]
        rows = self._rows(mask, q.device)
        dq_add = 0 if agrad_on else self._dq_add(q, mask, interp)
        # the dQ pass makes delta itself where it runs first on grid tiles (every row)
        own_delta = softmax and not dq_add and FUSED_DELTA and not self._ragged_dq(q, mask, interp)
        if softmax:
            if out.stride(-1) != 1:
                out = out.contiguous()
            lse = lse.to(torch.float32).contiguous()
            delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        if softmax and not own_delta:
            dbm = 16 if interp else 64
            jit.delta_kernel[(triton_cdiv(sq, dbm), b * hq)](
                out,
                dout,
                delta,
                *out.stride()[:3],
                *dout.stride()[:3],
                hq,
                sq,
                D=d,
                BD=bd,
                BM=dbm,
            )
        if not softmax:
            lse = delta = torch.zeros(1, dtype=torch.float32, device=q.device)
        ag = torch.zeros((b, hq), dtype=torch.float32, device=q.device) if agrad_on else lse
        dqa = None
        if dq_add:
            dqa = torch.zeros((b, hq, sq, d), dtype=torch.float32, device=q.device)
        else:
            dq = passes.dq_pass(q, k, v, dout, lse, delta, mask, scale, va, ag, agrad_on,
                                rows, interp, jit, out if own_delta else None)  # fmt: skip
        dk, dv, dq_added = passes.dkdv_pass(q, k, v, dout, lse, delta, mask, scale, va, rows,
                                            interp, jit, dqa, dq_add)  # fmt: skip
        if dq_add:
            # one pass: scaled and rounded to q's dtype (no in-place scale of the float32
            # buffer before the copy; within noise at 32K: 370 / 442 TF/s f+b, s9)
            dq = torch.mul(dq_added, scale, out=zeros_bhsd(q, fill=False))
        if agrad_on:
            agrad.add_(ag.to(agrad.dtype).view_as(agrad) if agrad.dim() == 2 else ag)
        return dq, dk, dv

    @staticmethod
    def _ragged_dq(q, mask, interp) -> bool:
        """Whether the dQ pass runs ragged row tiles (which need not cover every row)."""
        return _pick(mask, "dq", q.shape[-1], interp, q.device, q.dtype == torch.float32)[1].ragged

    @staticmethod
    def _dq_add(q, mask, interp) -> int:
        """How dQ is made (:data:`DQ_ADD`): 0 its own pass, 1 / 2 added in dK/dV."""
        if DQ_ADD is not None:
            return min(DQ_ADD, 1) if interp else DQ_ADD
        if interp or torch.cuda.get_device_capability(q.device)[0] < 9:
            return 0
        _, lists = _pick(mask, "dkdv", q.shape[-1], interp, q.device, q.dtype == torch.float32)
        return 0 if lists.short_runs() else 2


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["CONFIGS", "TritonKernel", "forward_work", "load"]
