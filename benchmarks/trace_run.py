"""Profile one context-parallel call (forward + backward) per rank and write a Chrome /
Perfetto trace and the profiler's summary: shows whether transfers hide under compute.

    python benchmarks/trace_run.py --out benchmarks/results [--device cuda] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def rank_fn(ctx, device, tokens, schedule, out_dir, name):
    import hamilton_attn as ha
    from hamilton_attn.runtime.profile import Profiler

    dev = torch.device("cuda", ctx.rank) if device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, d = (32, 128) if device == "cuda" else (4, 32)
    s = tokens * ctx.world_size
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule=schedule, dispatch="zigzag")
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, s, h, d, generator=gen).to(dev, dtype) for _ in range(4))
    ql, kl, vl, gl = (ha.dispatch(t, p) for t in (q, k, v, g))
    for _ in range(3):  # warm-up outside the profile
        a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
        ha.calc_attn(a, b, c, p).backward(gl)
    with Profiler() as prof:
        a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
        ha.calc_attn(a, b, c, p).backward(gl)
    prof.export_chrome_trace(os.path.join(out_dir, f"{name}_rank{ctx.rank}.json"))
    return {"summary": prof.summary(), "totals": prof.totals()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem (default trace_SCHEDULE)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--schedule", default="ring")
    ap.add_argument("--world-size", type=int, default=None)
    args = ap.parse_args()
    from hamilton_attn.testing import GlooPool

    name = args.name or f"trace_{args.schedule}"
    w = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    os.makedirs(args.out, exist_ok=True)
    with GlooPool(w, backend="nccl" if args.device == "cuda" else "gloo", timeout_s=600) as pool:
        res = pool.run(rank_fn, w, args.device, args.tokens, args.schedule, args.out, name)
    for r, item in enumerate(res):
        print(f"--- rank {r}\n{item['summary']}")
    with open(os.path.join(args.out, f"{name}_summary.json"), "w") as f:
        json.dump([item["totals"] for item in res], f, indent=1)


if __name__ == "__main__":
    main()
