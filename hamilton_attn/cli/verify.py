"""``hamilton-attn verify``: every backend available here against the reference."""

from __future__ import annotations

import sys
import time

import torch

from ..attention import attention
from ..kernels import get_kernel
from ..masks import Mask
from ..tables import format_table
from ..testing.oracle import dense_attention, error_bound, max_err, variant_attention_oracle
from ..variants import Softmax, bind
from .demo import demo_variant


def verify_masks(s: int) -> dict[str, tuple[Mask, int, int]]:
    """Named masks with (mask, Sq, Sk) used by verify and the GPU checks."""
    docs = [0, s // 7, s // 7 + 1, s // 2, s - s // 5, s]
    return {
        "full": (Mask.full(s), s, s),
        "causal": (Mask.causal(s), s, s),
        "causal Sq<Sk": (Mask.causal(s // 2, s), s // 2, s),
        "causal Sq>Sk": (Mask.causal(s, s // 2), s, s // 2),
        "docs causal": (Mask.varlen(docs, causal=True), s, s),
        "docs full": (Mask.varlen(docs), s, s),
        "sliding window": (Mask.sliding_window(s, (s // 8, 0)), s, s),
        "block causal": (Mask.block_causal(s, max(1, s // 5)), s, s),
        "prefix lm": (Mask.prefix_lm(s, s // 3), s, s),
        "overlapping": (
            Mask.from_ranges(
                [(0, s), (s // 4, s), (s // 2, s)],
                [(0, s // 3), (s // 5, s), (s // 2, s)],
                ["causal", "inv_causal", "bi_causal"],
                s,
                s,
            ),
            s,
            s,
        ),
    }


#: Variants verified beside plain softmax, on these masks (``demo_variant`` builds them).
VERIFY_VARIANTS = ("softcap", "alibi", "sink", "sigmoid", "relu", "score_mod")
VARIANT_MASKS = ("causal", "docs causal", "overlapping")


def _oracles(q64, k64, v64, g64, dense, dev, dtype, vname, seqlen):
    """The float64 oracle and the same math in ``dtype`` (its error sizes the bound):
    ``(ref, ref_grads, base_fwd_err, base_bwd_err, low_inputs)``."""

    def run(dt):
        x = [t.to(dev, dt).requires_grad_() for t in (q64, k64, v64)]
        if vname is None:
            out, params = dense_attention(*x, dense.to(dev)), []
        else:
            pdt = torch.float64 if dt == torch.float64 else torch.float32
            var, smod, params = demo_variant(vname, q64.shape[1], seqlen, dev, pdt)
            out, _ = variant_attention_oracle(
                *x, dense.to(dev), scale=None, variant=var or Softmax(), score_mod=smod, dtype=pdt
            )
            out = out.to(dt)
        gd = torch.float64 if dt == torch.float64 else torch.float32
        grads = torch.autograd.grad((out.to(gd) * g64.to(dev, gd)).sum(), x + params)
        return out, grads, x

    ref, ref_g, _ = run(torch.float64)
    low, low_g, low_in = run(dtype)
    base_b = max(max_err(a, b) for a, b in zip(low_g, ref_g))
    return ref, ref_g, max_err(low, ref), base_b, low_in


def _row(backend, name, sq, sk, dtype, vname, cells, ok):
    label = name if vname is None else f"{name}+{vname}"
    return (backend, label, f"{sq}x{sk}", str(dtype).replace("torch.", ""), *cells, ok)


def _runs_variant(kernel, var, smod) -> bool:
    """Whether ``kernel`` runs this variant (a sink alone reaches no kernel)."""
    bv = bind(var, smod, batch=1, heads=slice(0, 1))
    return bv is None or kernel.variant_problem(bv) is None


def run_verify(
    device: str,
    seqlen: int = 97,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 32,
    dtypes=None,
    backends=None,
    printer=print,
    plain: bool = True,
) -> bool:
    dev = torch.device(device)
    if dtypes is None:
        # On GPU each (mask, dtype) compiles FlexAttention anew: bf16, the dtype that
        # matters there, keeps verify to about a minute.
        dtypes = [torch.bfloat16] if dev.type == "cuda" else [torch.float32, torch.bfloat16]
    if backends is None:
        backends = ["reference", "sdpa", "flex", "triton", "auto"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    hq, hk = heads
    rows = []
    ok_all = True
    cases = [(name, None, dtypes) for name in verify_masks(seqlen)] if plain else []
    cases += [(name, v, dtypes[:1]) for v in VERIFY_VARIANTS for name in VARIANT_MASKS]
    masks = verify_masks(seqlen)
    for name, vname, case_dtypes in cases:
        mask, sq, sk = masks[name]
        for dtype in case_dtypes:
            q64 = torch.randn(2, hq, sq, head_dim, generator=gen, dtype=torch.float64)
            k64 = torch.randn(2, hk, sk, head_dim, generator=gen, dtype=torch.float64)
            v64 = torch.randn(2, hk, sk, head_dim, generator=gen, dtype=torch.float64)
            g64 = torch.randn(2, hq, sq, head_dim, generator=gen, dtype=torch.float64)
            ref, ref_g, base_f, base_b, low_in = _oracles(
                q64, k64, v64, g64, mask.to_dense(), dev, dtype, vname, sk
            )
            for backend in backends:
                kernel = None if backend == "auto" else get_kernel(backend)
                x = [t.detach().requires_grad_() for t in low_in]
                var, smod, params = demo_variant(vname, hq, sk, dev, torch.float32)
                if kernel is not None and (
                    not kernel.available(dev)
                    or kernel.unsupported_reason(*x, mask) is not None
                    or not _runs_variant(kernel, var, smod)
                ):
                    continue
                t0 = time.perf_counter()
                try:
                    out = attention(
                        *x, mask, layout="bhsd", backend=backend, variant=var, score_mod=smod
                    )
                    grads = torch.autograd.grad(
                        (out.float() * g64.to(dev, torch.float32)).sum(), x + params
                    )
                except Exception as err:  # noqa: BLE001 - a failing backend is a FAIL row
                    ok_all = False
                    why = f"{type(err).__name__}: {str(err).splitlines()[0][:50]}"
                    rows.append(
                        _row(backend, name, sq, sk, dtype, vname, ("error", why, "-", "-"), "FAIL")
                    )
                    print(" ".join(rows[-1]), file=sys.stderr, flush=True)
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                ef = max_err(out, ref)
                eb = max(max_err(a, b) for a, b in zip(grads, ref_g))
                atol = 1e-5 if dtype == torch.float32 else 1e-3
                ok = ef <= error_bound(base_f, atol=atol) and eb <= error_bound(base_b, atol=atol)
                ok_all &= ok
                cells = (f"{ef:.2e}", f"{eb:.2e}", f"{base_f:.1e}/{base_b:.1e}", f"{ms:.0f}")
                rows.append(
                    _row(backend, name, sq, sk, dtype, vname, cells, "PASS" if ok else "FAIL")
                )
                # progress on stderr: a run cut short by a time limit still shows its rows
                print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    header = (
        "backend",
        "mask",
        "Sq x Sk",
        "dtype",
        "err fwd",
        "err bwd",
        "same-prec ref f/b",
        "ms",
        "result",
    )
    printer(format_table(header, rows))
    printer(
        f"{sum(r[-1] == 'PASS' for r in rows)} passed, {sum(r[-1] == 'FAIL' for r in rows)} failed"
    )
    return ok_all
