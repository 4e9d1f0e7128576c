"""Registers and stack (spills) of the ``triton`` backend's kernels as a GPU call would
compile them, for sm_90, on CPU: each launch of a forward and backward captured and
compiled (``hamilton_attn.testing.triton_compile``), its cubin read by ``cuobjdump``.
Static: what the compiler allots, not what a run costs (time those with ``gpu_triton.py``).

Run: ``python benchmarks/triton_resources.py [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import hamilton_attn
from hamilton_attn.kernels import triton as tk
from hamilton_attn.masks import Mask
from hamilton_attn.testing.triton_compile import captured_launches, compile_sm90, resources
from hamilton_attn.variants import BlockVariant

HERE = Path(__file__).resolve().parent
_REL = torch.linspace(-1, 1, 32 * 65).sin().view(32, 65)
_ID = torch.arange(1 << 15) // 300


def _docs(total, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < total:
        cu.append(min(total, cu[-1] + int(torch.randint(lo, hi + 1, (1,), generator=g))))
    return Mask.varlen(cu, causal=True)


VARIANTS = {
    "plain": None,
    "softcap 30": dict(kind="softmax", softcap=30.0),
    "alibi": dict(kind="softmax", alibi=True),
    "sigmoid": dict(kind="sigmoid"),
    "score_mod relative bias": dict(
        kind="softmax", score_mod=lambda s, b, h, q, k: s - 0.01 * (q - k)
    ),
    "score_mod bucket table": dict(
        kind="softmax", score_mod=lambda s, b, h, q, k: s + _REL[h, (q - k).clamp(-32, 32) + 32]
    ),
    "score_mod document ids": dict(
        kind="softmax", score_mod=lambda s, b, h, q, k: torch.where(_ID[q] == _ID[k], s, -1e4)
    ),
    "score_mod tanh + square": dict(
        kind="softmax", score_mod=lambda s, b, h, q, k: 8 * torch.tanh(s / 8) + 0.05 * s * s
    ),
}
MASKS = {"causal 32K": Mask.causal(1 << 15), "docs 64-512, 32K": _docs(1 << 15, 64, 512)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    rows = []
    for vname, spec in VARIANTS.items():
        for mname, mask in MASKS.items():
            var = None
            if spec is not None:
                kw = dict(spec)
                if kw.pop("alibi", None):
                    kw["alibi"] = torch.rand(1, 32) * 0.01
                var = BlockVariant(**kw)
            sq, sk = mask.shape
            q = torch.empty(1, 32, sq, 128, dtype=torch.bfloat16).normal_()
            k = torch.empty(1, 32, sk, 128, dtype=torch.bfloat16).normal_()
            with captured_launches(1) as launches:
                kern = tk.TritonKernel()
                out, lse = kern.forward(q, k, k, mask, 0.088, variant=var)
                kern.backward(out, q, k, k, out, lse, mask, 0.088, variant=var)
            for fn, a, kw in launches:
                name = fn.fn.__name__
                if name == "delta_kernel":
                    continue
                res = resources(compile_sm90(fn, a, kw))
                tile = f"{kw['BM']} x {kw['BN']}"
                rows.append((vname, mname, name, tile, kw.get("num_warps"), kw.get("num_stages"),
                             res["regs"], res["stack"]))  # fmt: skip
                print(" | ".join(map(str, rows[-1])), flush=True)
    import triton

    lines = [
        f"# Triton kernels' registers and stack for sm_90 ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/triton_resources.py` on CPU (no GPU): torch "
        f"{torch.__version__}, triton {triton.__version__}, hamilton-attn "
        f"{hamilton_attn.__version__}. bf16, 32 heads, head dim 128; each launch a GPU "
        "forward and backward would make (dQ added in dK/dV by atomics), compiled for sm_90; "
        "registers per thread and stack bytes (spills) from `cuobjdump -res-usage`.",
        "",
        "| variant | mask | kernel | tile | warps | stages | registers | stack (B) |",
        "|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]
    out = Path(args.out_dir) / f"triton_resources_sm90_{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
