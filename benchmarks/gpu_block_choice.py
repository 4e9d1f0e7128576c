"""Which local kernel is fastest for the blocks a plan computes (one GPU, no network).

For each rank of a two-rank plan (built on paper with ``SimulatedGroup``) and each step,
the step's fused block runs through the ``sdpa`` backend (cuDNN calls, one per dense
piece, with merges where pieces share rows) and through ``flex`` (one call), forward
and forward + backward, timed with CUDA events (median); beside them the host time of
issuing one call (how long the CPU needs per call: a step whose calls issue slower
than the GPU runs them is CPU bound). The numbers calibrate the ``auto`` backend's
choice (:mod:`hamilton_attn.kernels.choice`), which is printed beside them.

    python benchmarks/gpu_block_choice.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn, repeats=15, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dev_ms, host_ms = [], []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        t0 = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        b.record()
        torch.cuda.synchronize()
        dev_ms.append(a.elapsed_time(b))
    return statistics.median(dev_ms), statistics.median(host_ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--name", default="gpu_block_choice", help="file stem of the .md / .json under --out"
    )
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    import hamilton_attn as ha
    from hamilton_attn.cli.bench import bench_masks, save_probe
    from hamilton_attn.kernels import get_kernel, select_kernel
    from hamilton_attn.kernels.sdpa import SdpaKernel

    dev = torch.device("cuda")
    h, d, w = 32, 128, 2
    s = args.tokens * w
    gen = torch.Generator().manual_seed(0)
    rows = []
    configs = [
        ("docs", "groupcast", "minheap"),
        ("docs", "ring", "minheap"),
        ("docs", "ring", "zigzag"),
    ]
    configs += [("causal", "ring", "zigzag"), ("docs", "one device", "-")]
    for mname, sched, disp in configs:
        mask = bench_masks(s, [mname])[mname]
        blocks = []
        if sched == "one device":
            blocks.append((0, 0, mask))
        else:
            for r in range(w):
                p = ha.plan(mask, ha.SimulatedGroup(w, r), schedule=sched, dispatch=disp)
                for i, step in enumerate(p.schedule.forward_steps()):
                    if step.compute[r]:
                        blocks.append((r, i, p.fused_block(r, step.compute[r])[0]))
        for r, i, m in blocks:
            sq, sk = m.shape
            q = torch.randn(1, h, sq, d, generator=gen).to(dev, torch.bfloat16)
            k, v, g = (
                torch.randn(1, h, n, d, generator=gen).to(dev, torch.bfloat16) for n in (sk, sk, sq)
            )
            row = {"mask": mname, "schedule": sched, "dispatch": disp, "rank": r, "step": i}
            row.update(
                shape=f"{sq}x{sk}", pairs_M=m.area() / 1e6, pieces=len(m.dense_pieces() or [])
            )
            row["auto"] = select_kernel("auto", q, k, v, m).name
            for name in ("sdpa", "flex"):
                kern = SdpaKernel(max_pieces=64) if name == "sdpa" else get_kernel(name)
                if kern.unsupported_reason(q, k, v, m) is not None:
                    row[f"{name}_fwd_ms"] = row[f"{name}_host_ms"] = row[f"{name}_fb_ms"] = None
                    continue
                out, lse = kern.forward(q, k, v, m, d**-0.5)
                row[f"{name}_fwd_ms"], row[f"{name}_host_ms"] = _time(
                    lambda kern=kern, m=m, q=q, k=k, v=v: kern.forward(q, k, v, m, d**-0.5)
                )
                row[f"{name}_fb_ms"] = _time(
                    lambda kern=kern, m=m, q=q, k=k, v=v, g=g, out=out, lse=lse: (
                        kern.forward(q, k, v, m, d**-0.5),
                        kern.backward(g, q, k, v, out, lse, m, d**-0.5),
                    )
                )[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["mask", "schedule", "dispatch", "rank", "step", "shape", "pairs_M", "pieces", "auto"]
    cols += [
        "sdpa_fwd_ms",
        "sdpa_host_ms",
        "flex_fwd_ms",
        "flex_host_ms",
        "sdpa_fb_ms",
        "flex_fb_ms",
    ]
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r[c]) for c in cols) for r in rows]
    text = "\n".join(lines)
    print(text)
    save_probe(args.out, args.name, "Local kernel per block: sdpa vs flex", text, {"rows": rows})


if __name__ == "__main__":
    main()
