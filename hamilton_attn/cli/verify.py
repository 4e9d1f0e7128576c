"""``hamilton-attn verify``: every backend available here against the reference."""

from __future__ import annotations

import sys
import time

import torch

from ..attention import attention
from ..kernels import get_kernel, unavailable_hint
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
    ``(ref, ref_grads, base_fwd_err, base_bwd_errs, low_inputs)``, ``base_bwd_errs`` the
    baseline's largest error on the q / k / v gradients and on the variant's parameters'.

    The baseline computes in ``dtype`` throughout (flash-attention's tests' reference
    without upcasting), plain softmax and variants alike; a variant's parameters stay
    float32, as the backends get them."""

    def run(dt):
        x = [t.to(dev, dt).requires_grad_() for t in (q64, k64, v64)]
        if vname is None:
            out, params = dense_attention(*x, dense.to(dev)), []
        else:
            # parameters as the backends get them (float32), the math in ``dt``
            pdt = torch.float64 if dt == torch.float64 else torch.float32
            var, smod, params = demo_variant(vname, q64.shape[1], seqlen, dev, pdt)
            out, _ = variant_attention_oracle(
                *x, dense.to(dev), scale=None, variant=var or Softmax(), score_mod=smod, dtype=dt
            )
            out = out.to(dt)
        gd = torch.float64 if dt == torch.float64 else torch.float32
        grads = torch.autograd.grad((out.to(gd) * g64.to(dev, gd)).sum(), x + params)
        return out, grads, x

    ref, ref_g, _ = run(torch.float64)
    low, low_g, low_in = run(dtype)
    errs = [max_err(a, b) for a, b in zip(low_g, ref_g)]
    return ref, ref_g, max_err(low, ref), (max(errs[:3]), max(errs[3:], default=0.0)), low_in


def within_bound(dtype, errs, base, ref, ref_g) -> bool:
    """Whether a backend's errors ``(fwd, q/k/v grads, parameter grads)`` sit within
    flash-attention's bound of the baseline's ``(fwd, q/k/v grads, parameter grads)``:
    twice the baseline's error plus two ulps of ``dtype`` at the reference's magnitude
    (the test suite's ``assert_close_to_oracle``; at least 1e-5 in float32, 1e-3 below
    it).

    A parameter's gradient (sink, slopes) is a sum over every row and key of one head:
    its error is a few roundings at its magnitude and varies tenfold from draw to draw,
    so its bound takes eight ulps there (a sink counted twice or lost errs by the whole
    gradient, one 10% off by twice this allowance in bfloat16)."""
    floor = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-3)

    def mag(ts):
        return max((t.detach().abs().max().item() for t in ts if t.numel()), default=0.0)

    def ulps(n, ts):
        return max(floor, n * torch.finfo(dtype).eps * max(1.0, mag(ts)))

    return (
        errs[0] <= error_bound(base[0], atol=ulps(2, [ref]))
        and errs[1] <= error_bound(base[1], atol=ulps(2, ref_g[:3]))
        and errs[2] <= error_bound(base[2], atol=ulps(8, ref_g[3:]))
    )


def _row(backend, name, sq, sk, dtype, vname, cells, ok):
    label = name if vname is None else f"{name}+{vname}"
    return (backend, label, f"{sq}x{sk}", str(dtype).replace("torch.", ""), *cells, ok)


def _runs_variant(kernel, var, smod, device) -> bool:
    """Whether ``kernel`` runs this variant on ``device`` (a sink alone reaches no kernel)."""
    bv = bind(var, smod, batch=1, heads=slice(0, 1))
    return bv is None or kernel.variant_problem(bv, device) is None


def run_verify(
    device: str,
    seqlen: int = 97,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 32,
    dtypes=None,
    backends=None,
    printer=print,
    plain: bool = True,
    seed: int = 0,
) -> bool:
    dev = torch.device(device)
    if dtypes is None:
        # On GPU each (mask, dtype) compiles FlexAttention anew: bf16, the dtype that
        # matters there, keeps verify to about a minute.
        dtypes = [torch.bfloat16] if dev.type == "cuda" else [torch.float32, torch.bfloat16]
    if backends is None:
        backends = ["reference", "sdpa", "flex", "triton", "auto"]
    for backend in backends:
        if backend != "auto" and not get_kernel(backend).available(dev):
            print(f"{backend}: not available on {dev}, skipped{unavailable_hint(backend)}",
                  file=sys.stderr, flush=True)  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(seed)
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
            ref, ref_g, base_f, (base_b, base_p), low_in = _oracles(
                q64, k64, v64, g64, mask.to_dense(), dev, dtype, vname, sk
            )
            for backend in backends:
                kernel = None if backend == "auto" else get_kernel(backend)
                x = [t.detach().requires_grad_() for t in low_in]
                var, smod, params = demo_variant(vname, hq, sk, dev, torch.float32)
                if kernel is not None and (
                    not kernel.available(dev)
                    or kernel.unsupported_reason(*x, mask) is not None
                    or not _runs_variant(kernel, var, smod, dev)
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
                eg = [max_err(a, b) for a, b in zip(grads, ref_g)]
                errs = (ef, max(eg[:3]), max(eg[3:], default=0.0))
                ok = within_bound(dtype, errs, (base_f, base_b, base_p), ref, ref_g)
                ok_all &= ok
                eb = f"{errs[1]:.2e}" + (f" p {errs[2]:.1e}" if len(eg) > 3 else "")
                bb = f"{base_f:.1e}/{base_b:.1e}" + (f" p {base_p:.1e}" if len(eg) > 3 else "")
                cells = (f"{ef:.2e}", eb, bb, f"{ms:.0f}")
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
