"""How much a KV transfer running beside an attention kernel slows that kernel (two GPUs).

NCCL moves data with kernels that occupy SMs, so a transfer overlapped with attention
can steal compute from it. Per rank, timed with CUDA events (median of repeats):

- the kernel alone (cuDNN causal 16K x 16K forward, and its backward);
- the transfer alone (K and V of 16K tokens, 256 MiB, to the peer and back);
- both at once, on the default NCCL group and on groups limited to a few CTAs
  (``ProcessGroupNCCL.Options().config.max_ctas``), where torch offers it;
- with ``--head-start-us``: both at once after the executor's transfer head start
  (``config.override(transfer_head_start_us=...)``) of each given length.

    python benchmarks/gpu_overlap.py --out DIR [--ctas 1 2 4 8] [--head-start-us 0 5 20]
    (needs 2 GPUs; prints a table, writes JSON)
"""

from __future__ import annotations

import argparse
import statistics

import torch


def _median_ms(fn, repeats=10, warmup=3):
    from hamilton_attn.cli.bench import time_fn

    return time_fn(fn, torch.device("cuda"), warmup=warmup, repeats=repeats)


def rank_fn(ctx, tokens, ctas_list, head_starts=()):
    import torch.distributed as dist

    import hamilton_attn as ha
    from hamilton_attn import config
    from hamilton_attn.kernels.sdpa import SdpaKernel
    from hamilton_attn.runtime import comm

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    gen = torch.Generator().manual_seed(ctx.rank)
    q, k, v, g = (
        torch.randn(1, 32, tokens, 128, generator=gen).to(dev, torch.bfloat16) for _ in range(4)
    )
    kern, mask, scale = SdpaKernel(), ha.Mask.causal(tokens), 128**-0.5
    out, lse = kern.forward(q, k, v, mask, scale)
    peer = 1 - ctx.rank
    send = torch.randn(2, tokens, 32, 128, generator=gen).to(dev, torch.bfloat16)
    recv = torch.empty_like(send)

    def fwd():
        kern.forward(q, k, v, mask, scale)

    def bwd():
        kern.backward(g, q, k, v, out, lse, mask, scale)

    def transfer(group):
        ops = [
            dist.P2POp(dist.isend, send, dist.get_global_rank(group, peer), group),
            dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, peer), group),
        ]
        return dist.batch_isend_irecv(ops)

    def both(kernel, group, head_start=False):
        def run():
            works = transfer(group)
            if head_start:
                comm._head_start(dev)
            kernel()
            for w in works:
                w.wait()

        return run

    def kernel_during(kernel, group, repeats=10):
        """Kernel time (events around it alone) while a transfer runs beside it."""
        times = []
        for i in range(repeats + 3):
            dist.barrier(group)
            torch.cuda.synchronize()
            works = transfer(group)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            kernel()
            b.record()
            for w in works:
                w.wait()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(a.elapsed_time(b))
        return statistics.median(times)

    groups = {"default": dist.group.WORLD}
    notes = {}
    for n in ctas_list:
        try:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.max_ctas = n
            opts.config.min_ctas = 1
            groups[f"max_ctas={n}"] = dist.new_group([0, 1], backend="nccl", pg_options=opts)
        except Exception as err:  # noqa: BLE001 - reported
            notes[f"max_ctas={n}"] = f"{type(err).__name__}: {err}"[:200]
    rows = []
    for name, grp in groups.items():
        transfer(grp)  # warm the communicator
        torch.cuda.synchronize()
        row = {"group": name}
        row["transfer_ms"] = _median_ms(lambda grp=grp: [w.wait() for w in transfer(grp)])
        row["fwd_alone_ms"] = _median_ms(fwd)
        row["fwd_beside_ms"] = kernel_during(fwd, grp)
        row["fwd_both_ms"] = _median_ms(both(fwd, grp))
        row["bwd_alone_ms"] = _median_ms(bwd)
        row["bwd_beside_ms"] = kernel_during(bwd, grp)
        row["bwd_both_ms"] = _median_ms(both(bwd, grp))
        rows.append(row)
    for us in head_starts:
        # The executor's fix: a short spin on the compute stream after starting the
        # transfer, so NCCL's CTAs are resident before the attention kernel fills the GPU.
        grp = dist.group.WORLD
        row = {"group": f"head start {us:g} us", "transfer_ms": float("nan")}
        row["fwd_alone_ms"] = row["bwd_alone_ms"] = float("nan")
        row["fwd_beside_ms"] = row["bwd_beside_ms"] = float("nan")
        with config.override(transfer_head_start_us=us):
            row["fwd_both_ms"] = _median_ms(both(fwd, grp, head_start=True))
            row["bwd_both_ms"] = _median_ms(both(bwd, grp, head_start=True))
        rows.append(row)
    return {"rows": rows, "notes": notes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem of the .md / .json under --out")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctas", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument(
        "--head-start-us", type=float, nargs="*", default=[], help="compute-stream spins to try"
    )
    args = ap.parse_args()
    from hamilton_attn.cli.bench import save_probe
    from hamilton_attn.testing import GlooPool

    with GlooPool(2, backend="nccl", timeout_s=600) as pool:
        res = pool.run(rank_fn, 2, args.tokens, args.ctas, args.head_start_us)
    cols = ["group", "transfer_ms", "fwd_alone_ms", "fwd_beside_ms", "fwd_both_ms"]
    cols += ["bwd_alone_ms", "bwd_beside_ms", "bwd_both_ms"]
    lines = [" | ".join(["rank", *cols])]
    for r, item in enumerate(res):
        for row in item["rows"]:
            lines.append(
                " | ".join([str(r)] + [f"{row[c]:.3f}" if c != "group" else row[c] for c in cols])
            )
        for k, v in item["notes"].items():
            lines.append(f"rank {r} {k}: {v}")
    text = "\n".join(lines)
    print(text)
    stem = args.name or "gpu_overlap" + ("_head_start" if args.head_start_us else "")
    save_probe(args.out, stem, "KV transfer beside attention", text, {"ranks": res})


if __name__ == "__main__":
    main()
