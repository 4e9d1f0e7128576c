"""Where a context-parallel forward's time goes between its kernels (two GPUs, NCCL).

Runs the bench's timed loop (``inner`` back-to-back ``calc_attn`` calls) under
``torch.profiler`` and reads the kernel timeline of each rank: the window from the
first kernel to the last, the time the compute stream is busy, its idle gaps (and the
kernel that ends each one), the attention kernels' durations and the NCCL kernels'
intervals. The events-timed median of the same loop is printed beside it, so the
profiler's own cost shows.

    python benchmarks/gpu_timeline.py --out DIR [--masks causal full] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def _kernels(path):
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    ks = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy")]
    ks.sort(key=lambda e: e["ts"])
    return ks


def _summary(ks, calls):
    # The rendezvous's long spin (before the timed calls) is not part of any call.
    ks = [e for e in ks if not ("spin_kernel" in e["name"] and e["dur"] > 1000)]
    if not ks:
        return {}
    streams: dict = {}
    for e in ks:
        streams.setdefault(e["args"].get("stream"), []).append(e)

    def busy(lst):
        return sum(e["dur"] for e in lst)

    def attn_time(lst):
        return sum(e["dur"] for e in lst if "sdpa" in e["name"] or "flash" in e["name"])

    # The compute stream: the one with the most attention-kernel time.
    comp = max(streams, key=lambda s: (attn_time(streams[s]), busy(streams[s])))
    lst = streams[comp]
    t0, t1 = lst[0]["ts"], max(e["ts"] + e["dur"] for e in lst)
    gaps = []
    for a, b in zip(lst, lst[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g > 3:
            gaps.append((round(g, 1), a["name"][:40], b["name"][:40]))
    attn = [round(e["dur"] / 1e3, 3) for e in lst if "sdpa" in e["name"] or "flash" in e["name"]]
    nccl = [
        (round((e["ts"] - t0) / 1e3, 3), round(e["dur"] / 1e3, 3))
        for s, l2 in streams.items()
        for e in l2
        if "nccl" in e["name"].lower()
    ]
    other = {}
    for e in lst:
        if not ("sdpa" in e["name"] or "flash" in e["name"]):
            other[e["name"][:60]] = other.get(e["name"][:60], 0) + e["dur"]
    return {
        "window_ms_per_call": round((t1 - t0) / 1e3 / calls, 3),
        "busy_ms_per_call": round(busy(lst) / 1e3 / calls, 3),
        "gap_ms_per_call": round(sum(g for g, *_ in gaps) / 1e3 / calls, 3),
        "gaps_us": gaps[:40],
        "attn_ms": attn,
        "nccl_ms_at": sorted(nccl),
        "other_us": {k: round(v, 1) for k, v in sorted(other.items(), key=lambda x: -x[1])[:12]},
    }


def rank_fn(ctx, tokens, masks, schedule, dispatch, inner):
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import hamilton_attn as ha
    from hamilton_attn.cli.bench import _gpu_rendezvous, bench_masks, time_fn

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    s = 2 * tokens
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 32, 128, generator=gen).to(dev, torch.bfloat16) for _ in range(3))
    res = {}
    for name in masks:
        m = bench_masks(s, [name])[name]
        p = ha.plan(m, ctx.group, schedule=schedule, dispatch=dispatch, backward="reverse")
        ql, kl, vl = (ha.dispatch(t, p) for t in (q, k, v))

        def fwd(p=p, ql=ql, kl=kl, vl=vl):
            ha.calc_attn(ql, kl, vl, p)

        med = time_fn(fwd, dev, warmup=3, repeats=10, group=ctx.group, inner=inner)
        dist.barrier(ctx.group)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            _gpu_rendezvous(dev, ctx.group)  # as time_fn starts each sample
            for _ in range(inner):
                fwd()
            torch.cuda.synchronize()
        path = os.path.join(tempfile.gettempdir(), f"tl_{name}_{ctx.rank}.json")
        prof.export_chrome_trace(path)
        res[name] = {"events_median_ms": round(med, 3), **_summary(_kernels(path), inner)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem of the .md / .json under --out")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--masks", nargs="*", default=["causal", "full"])
    ap.add_argument("--schedule", default="ring")
    ap.add_argument("--dispatch", default="zigzag")
    ap.add_argument("--inner", type=int, default=6)
    args = ap.parse_args()
    from hamilton_attn.cli.bench import run_two_gpus, save_probe

    res = run_two_gpus(rank_fn, args.tokens, args.masks, args.schedule, args.dispatch, args.inner)
    lines = []
    for r, item in enumerate(res):
        for name, d in item.items():
            lines.append(f"--- rank {r} {name}")
            for key, val in d.items():
                lines.append(f"{key}: {val}")
    text = "\n".join(lines)
    print(text)
    save_probe(
        args.out,
        args.name or f"gpu_timeline_{args.schedule}",
        "Forward kernel timeline",
        text,
        {"ranks": res},
    )


if __name__ == "__main__":
    main()
