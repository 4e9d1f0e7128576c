"""Where the time of one context-parallel forward + backward goes, kernel by kernel.

Runs ``torch.profiler`` around a few warm forward + backward calls on every rank (NCCL)
and prints, per rank, the CUDA kernels sorted by total device time, beside the wall
time of the calls: the gap between the attention kernels and the wall time is the
executor's overhead.

    python benchmarks/gpu_op_profile.py --out DIR [--mask causal] [--backward replay reverse]
"""

from __future__ import annotations

import argparse
import os

import torch


def rank_fn(ctx, tokens, mask_name, schedule, dispatch, backwards, iters, fwd_only=False):
    import hamilton_attn as ha
    from hamilton_attn.cli.bench import bench_masks, time_fn

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    s = tokens * ctx.world_size
    mask = bench_masks(s, [mask_name])[mask_name]
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (
        torch.randn(1, s, 32, 128, generator=gen).to(dev, torch.bfloat16) for _ in range(4)
    )
    report = []
    for bw in backwards:
        p = ha.plan(mask, ctx.group, schedule=schedule, dispatch=dispatch, backward=bw)
        ql, kl, vl, gl = (ha.dispatch(t, p) for t in (q, k, v, g))

        def step(p=p, ql=ql, kl=kl, vl=vl, gl=gl):
            if fwd_only:
                ha.calc_attn(ql, kl, vl, p)
                return
            a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
            ha.calc_attn(a, b, c, p).backward(gl)

        median = time_fn(step, dev, warmup=3, repeats=iters, group=ctx.group)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=22, max_name_column_width=70
        )
        report.append(
            f"=== rank {ctx.rank} {mask_name} {schedule}/{dispatch} backward={bw}: "
            f"{'fwd' if fwd_only else 'f+b'} median {median:.2f} ms over {iters}\n{table}"
        )
    return "\n".join(report)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem of the .txt under --out")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--mask", default="causal")
    ap.add_argument("--schedule", default="ring")
    ap.add_argument("--dispatch", default="zigzag")
    ap.add_argument("--backward", nargs="+", default=["replay", "reverse"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--fwd-only", action="store_true")
    args = ap.parse_args()
    from hamilton_attn.testing import GlooPool

    with GlooPool(2, backend="nccl", timeout_s=600) as pool:
        res = pool.run(
            rank_fn,
            2,
            args.tokens,
            args.mask,
            args.schedule,
            args.dispatch,
            args.backward,
            args.iters,
            args.fwd_only,
        )
    text = "\n".join(res)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.mask}_{args.schedule}_{args.dispatch}" + ("_fwd" if args.fwd_only else "")
    with open(os.path.join(args.out, f"{args.name or 'op_profile_' + tag}.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
