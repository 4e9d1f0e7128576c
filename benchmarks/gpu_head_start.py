"""Which transfer head start (``config.Config.transfer_head_start_us``) makes ring attention fastest.

NCCL moves a KV block with kernels; started beside a large attention kernel it can be
starved of SMs until that kernel ends. The executor can spin the compute stream a few
microseconds after starting a transfer so NCCL's CTAs get placed first. This probe
times ring attention (2 GPUs, NCCL) forward and forward+backward with several head
starts, interleaved round by round so that drift between rounds falls on every value
alike, and prints the median over rounds of each value's efficiency against one GPU.

    python benchmarks/gpu_head_start.py --out DIR [--us 0 5 10 20 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def rank_fn(ctx, tokens, masks, us_list, rounds, dispatch, device="cuda"):
    import torch.distributed as dist

    import hamilton_attn as ha
    from hamilton_attn import config
    from hamilton_attn.cli.bench import bench_masks, time_fn

    dev = torch.device("cuda", ctx.rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    s = 2 * tokens
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, s, 32, 128, generator=gen).to(dev, dt) for _ in range(4))
    out = {}
    for name in masks:
        m = bench_masks(s, [name])[name]
        kw = dict(warmup=3, repeats=5, inner=3)
        one = {}
        if ctx.rank == 0:
            one["fwd"] = time_fn(lambda m=m: ha.attention(q, k, v, m), dev, **kw)

            def one_fb(m=m):
                a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
                ha.attention(a, b, c, m).backward(g)

            one["fwd_bwd"] = time_fn(one_fb, dev, **kw)
        t1 = torch.tensor([one.get("fwd", 0.0), one.get("fwd_bwd", 0.0)], device=dev).double()
        dist.broadcast(t1, dist.get_global_rank(ctx.group, 0), group=ctx.group)
        one = {"fwd": t1[0].item(), "fwd_bwd": t1[1].item()}
        p = ha.plan(m, ctx.group, schedule="ring", dispatch=dispatch, backward="reverse")
        ql, kl, vl, gl = (ha.dispatch(t, p) for t in (q, k, v, g))
        ha.calc_attn(ql, kl, vl, p)

        def fwd(p=p, ql=ql, kl=kl, vl=vl):
            ha.calc_attn(ql, kl, vl, p)

        def fwd_bwd(p=p, ql=ql, kl=kl, vl=vl, gl=gl):
            a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
            ha.calc_attn(a, b, c, p).backward(gl)

        samples = {us: {"fwd": [], "fwd_bwd": []} for us in us_list}
        for _ in range(rounds):
            for us in us_list:
                with config.override(transfer_head_start_us=us):
                    for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                        t = time_fn(fn, dev, warmup=1, repeats=3, inner=3, group=ctx.group)
                        samples[us][key].append(one[key] / (2 * t))
        out[name] = {
            "one_ms": one,
            "eff": {
                str(us): {
                    key: {
                        "median": statistics.median(vals),
                        "min": min(vals),
                        "max": max(vals),
                    }
                    for key, vals in d.items()
                }
                for us, d in samples.items()
            },
        }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--name", default="gpu_head_start", help="file stem of the .md / .json under --out"
    )
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    ap.add_argument("--masks", nargs="+", default=["causal", "full"])
    ap.add_argument("--us", type=float, nargs="+", default=[0, 5, 10, 20, 40])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dispatch", default="zigzag")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    args = ap.parse_args()
    from hamilton_attn.cli.bench import save_probe
    from hamilton_attn.testing import GlooPool

    backend = "nccl" if args.device == "cuda" else "gloo"
    with GlooPool(2, backend=backend, timeout_s=600) as pool:
        res = pool.run(
            rank_fn, 2, args.tokens, args.masks, args.us, args.rounds, args.dispatch, args.device
        )[0]
    lines = ["mask | head start us | eff fwd median [min, max] | eff f+b median [min, max]"]
    for name, item in res.items():
        for us, d in item["eff"].items():
            cell = lambda x: f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"  # noqa: E731
            lines.append(f"{name} | {us} | {cell(d['fwd'])} | {cell(d['fwd_bwd'])}")
    text = "\n".join(lines)
    print(text)
    save_probe(
        args.out,
        args.name,
        "Transfer head start, ring on 2 GPUs",
        text,
        {"masks": res},
        note="ring, backward reverse, bf16, 32 heads, D 128, B 1; efficiency = "
        "T(one GPU) / (2 x T); each sample = median of 3 x 3 back-to-back calls",
    )


if __name__ == "__main__":
    main()
