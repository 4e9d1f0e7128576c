"""``hamilton-attn verify``: every backend available here against the reference."""

from __future__ import annotations

import time

import torch

from ..attention import attention
from ..kernels import get_kernel
from ..masks import Mask
from ..tables import format_table
from ..testing.oracle import dense_attention, error_bound, max_err


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


def run_verify(
    device: str,
    seqlen: int = 97,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 32,
    dtypes=None,
    backends=None,
    printer=print,
) -> bool:
    dev = torch.device(device)
    if dtypes is None:
        # On GPU each (mask, dtype) compiles FlexAttention anew: bf16, the dtype that
        # matters there, keeps verify to about a minute.
        dtypes = [torch.bfloat16] if dev.type == "cuda" else [torch.float32, torch.bfloat16]
    if backends is None:
        backends = ["reference", "sdpa", "flex", "auto"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    hq, hk = heads
    rows = []
    ok_all = True
    for name, (mask, sq, sk) in verify_masks(seqlen).items():
        for dtype in dtypes:
            q64 = torch.randn(2, hq, sq, head_dim, generator=gen, dtype=torch.float64)
            k64 = torch.randn(2, hk, sk, head_dim, generator=gen, dtype=torch.float64)
            v64 = torch.randn(2, hk, sk, head_dim, generator=gen, dtype=torch.float64)
            g64 = torch.randn(2, hq, sq, head_dim, generator=gen, dtype=torch.float64)
            dense = mask.to_dense()
            ref_in = [t.to(dev).requires_grad_() for t in (q64, k64, v64)]
            ref = dense_attention(*ref_in, dense.to(dev))
            ref_g = torch.autograd.grad((ref * g64.to(dev)).sum(), ref_in)
            low_in = [t.to(dev, dtype).requires_grad_() for t in (q64, k64, v64)]
            low = dense_attention(*low_in, dense.to(dev))
            low_g = torch.autograd.grad((low.float() * g64.to(dev, torch.float32)).sum(), low_in)
            base_f = max_err(low, ref)
            base_b = max(max_err(a, b) for a, b in zip(low_g, ref_g))
            for backend in backends:
                kernel = None if backend == "auto" else get_kernel(backend)
                x = [t.detach().requires_grad_() for t in low_in]
                if kernel is not None and (
                    not kernel.available(dev) or kernel.unsupported_reason(*x, mask) is not None
                ):
                    continue
                t0 = time.perf_counter()
                try:
                    out = attention(*x, mask, layout="bhsd", backend=backend)
                    grads = torch.autograd.grad((out.float() * g64.to(dev, torch.float32)).sum(), x)
                except Exception as err:  # noqa: BLE001 - a failing backend is a FAIL row
                    ok_all = False
                    rows.append(
                        (
                            backend,
                            name,
                            f"{sq}x{sk}",
                            str(dtype).replace("torch.", ""),
                            "error",
                            f"{type(err).__name__}: {str(err).splitlines()[0][:50]}",
                            "-",
                            "-",
                            "FAIL",
                        )
                    )
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                ef = max_err(out, ref)
                eb = max(max_err(a, b) for a, b in zip(grads, ref_g))
                atol = 1e-5 if dtype == torch.float32 else 1e-3
                ok = ef <= error_bound(base_f, atol=atol) and eb <= error_bound(base_b, atol=atol)
                ok_all &= ok
                rows.append(
                    (
                        backend,
                        name,
                        f"{sq}x{sk}",
                        str(dtype).replace("torch.", ""),
                        f"{ef:.2e}",
                        f"{eb:.2e}",
                        f"{base_f:.1e}/{base_b:.1e}",
                        f"{ms:.0f}",
                        "PASS" if ok else "FAIL",
                    )
                )
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
