"""CUDA-graph replay of the forward on GPU: same numbers as eager, and how much faster.

Per rank of a two-GPU NCCL group (each rank also runs the one-device cases):
- one device, ``attention`` on causal and packed documents of ``2 x tokens``;
- context parallel, ``calc_attn`` with out and lse, for several schedule/dispatch pairs.
Each case checks that a replay equals eager bit for bit (or within eager's own spread
between two calls, printed), that a replay on fresh inputs equals eager on them, and
that the first replay's cloned output is left untouched by the second; then times
eager against replay (median of CUDA-event samples, 3 calls each).

    python benchmarks/gpu_graphs_check.py --out DIR     (2 GPUs; exit 1 on a failed check)
"""

from __future__ import annotations

import argparse

import torch


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _case(label, run, make_inputs, dev, rows, group=None):
    try:
        _case_inner(label, run, make_inputs, dev, rows, group)
    except Exception as err:  # noqa: BLE001 - reported as a failed case
        rows.append(dict(case=label, ok=False, error=f"{type(err).__name__}: {err}"[:300]))


def _case_inner(label, run, make_inputs, dev, rows, group):
    import hamilton_attn as ha
    from hamilton_attn.cli.bench import time_fn

    x1, x2 = make_inputs(), make_inputs()
    e1, e1b = run(*x1), run(*x1)
    as_list = lambda o: list(o) if isinstance(o, tuple) else [o]  # noqa: E731
    spread = max(_diff(a, b) for a, b in zip(as_list(e1), as_list(e1b)))
    g = ha.cuda_graph(run)
    g1 = g(*x1)
    kept = [t.clone() for t in as_list(g1)]
    e2, g2 = run(*x2), g(*x2)
    d1 = max(_diff(a, b) for a, b in zip(as_list(g1), as_list(e1)))
    d2 = max(_diff(a, b) for a, b in zip(as_list(g2), as_list(e2)))
    d_kept = max(_diff(a, b) for a, b in zip(as_list(g1), kept))
    ok = d1 <= spread and d2 <= spread and d_kept == 0 and g.num_graphs == int(dev.type == "cuda")
    kw = dict(warmup=3, repeats=10, inner=3, group=group)
    t_eager = time_fn(lambda: run(*x1), dev, **kw)
    t_graph = time_fn(lambda: g(*x1), dev, **kw)
    rows.append(
        dict(
            case=label,
            ok=ok,
            eager_spread=spread,
            diff_first=d1,
            diff_fresh=d2,
            first_output_changed=d_kept,
            eager_ms=t_eager,
            graph_ms=t_graph,
            speedup=t_eager / t_graph,
        )
    )


def rank_fn(ctx, tokens, device):
    import hamilton_attn as ha
    from hamilton_attn.cli.bench import bench_masks

    dev = torch.device("cuda", ctx.rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1 + ctx.rank)
    s = 2 * tokens
    rows: list[dict] = []

    def rand(n):
        return lambda: tuple(
            torch.randn(1, n, 32, 128, generator=gen).to(dev, dt) for _ in range(3)
        )

    with torch.no_grad():
        masks = bench_masks(s, ["causal", "full", "docs"])
        for name in ("causal", "docs"):
            m = masks[name]
            _case(
                f"one device {name} {s}",
                lambda a, b, c, m=m: ha.attention(a, b, c, m),
                rand(s),
                dev,
                rows,
            )
        gen_cp = torch.Generator().manual_seed(7)  # same global inputs on every rank
        for name, sched, disp in [
            ("causal", "ring", "zigzag"),
            ("full", "ring", "zigzag"),
            ("docs", "ring", "balanced_zigzag"),
            ("docs", "ring", "minheap"),
            ("docs", "groupcast", "zigzag"),
        ]:
            p = ha.plan(masks[name], ctx.group, schedule=sched, dispatch=disp)

            def make(p=p):
                full = [torch.randn(1, s, 32, 128, generator=gen_cp).to(dev, dt) for _ in range(3)]
                return tuple(ha.dispatch(t, p) for t in full)

            run = lambda a, b, c, p=p: ha.calc_attn(a, b, c, p, return_lse=True)  # noqa: E731
            _case(f"CP {name} {sched}/{disp}", run, make, dev, rows, group=ctx.group)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--name", default="gpu_graphs_check", help="file stem of the .md / .json under --out"
    )
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (eager)")
    args = ap.parse_args()
    from hamilton_attn.cli.bench import save_probe
    from hamilton_attn.testing import GlooPool

    backend = "nccl" if args.device == "cuda" else "gloo"
    with GlooPool(2, backend=backend, timeout_s=600) as pool:
        res = pool.run(rank_fn, 2, args.tokens, args.device)
    cols = ["case", "ok", "eager_spread", "diff_first", "diff_fresh", "first_output_changed"]
    cols += ["eager_ms", "graph_ms", "speedup"]
    lines = [" | ".join(["rank", *cols])]
    for r, rows in enumerate(res):
        for row in rows:
            if "error" in row:
                lines.append(f"{r} | {row['case']} | error: {row['error']}")
                continue
            cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
            lines.append(" | ".join([str(r), *cells]))
    text = "\n".join(lines)
    print(text)
    save_probe(
        args.out,
        args.name,
        "CUDA-graph forward replay, checked and timed",
        text,
        {"ranks": res},
    )
    failed = [row["case"] for rows in res for row in rows if not row["ok"]]
    print("FAILED: " + ", ".join(failed) if failed else "all graph checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
