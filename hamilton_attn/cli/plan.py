"""``hamilton-attn plan``: predict every schedule on a topology and pick one (no GPU)."""

from __future__ import annotations

import argparse
import re

from ..planner.cluster import parse_topology
from ..planner.cost import DeviceModel, Prediction, Shapes, compare

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_length(s: str | int) -> int:
    """``1M`` -> 1048576, ``128K`` -> 131072, ``1.5m``, ``32768`` (binary units)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a length like 32768, 128K or 1M, got {s!r}")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"expected a positive whole length, got {s!r}")
    return int(n)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` sub-command to an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "plan", help="predict each schedule's time, link use and memory on a topology"
    )
    p.add_argument(
        "--topology",
        required=True,
        help="nvswitch:N, full_mesh:N, nodes:UxM, torus2d:AxB or line:N",
    )
    p.add_argument("--seqlen", type=parse_length, required=True, help="total tokens: 1M, 128K")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16")
    p.add_argument("--mask", choices=["causal", "full"], default="causal")
    p.add_argument("--schedules", nargs="+", default=None, help="default: all that apply")
    p.add_argument("--objective", choices=["fwd", "fwd_bwd"], default="fwd_bwd")
    p.add_argument(
        "--exact",
        action="store_true",
        help="build and verify every schedule (slow beyond ~32 devices)",
    )
    p.add_argument("--plot", default=None, help="PNG: cycles on the topology, link use per step")
    return p


def _fmt_bytes(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def format_table(rows: list[tuple[str, Prediction | None, str]], chosen: str | None) -> str:
    nw = max([16] + [len(name) for name, _, _ in rows])  # hybrids have long names
    head = (
        f"{'schedule':<{nw}} | {'fwd ms':>9} | {'fwd+bwd ms':>10} | {'exposed fwd':>11} | "
        f"{'busiest link':>12} | {'mem/device':>10} | path"
    )
    out = [head, "-" * len(head)]
    for name, p, why in rows:
        if p is None:
            out.append(f"{name:<{nw}} | n/a: {why}")
            continue
        mark = " <- chosen" if name == chosen else ""
        out.append(
            f"{name:<{nw}} | {p.fwd_s * 1e3:>9.2f} | {p.fwd_bwd_s * 1e3:>10.2f} | "
            f"{p.exposed_s / max(p.fwd_s, 1e-30) * 100:>10.1f}% | "
            f"{_fmt_bytes(p.busiest_link_bytes):>12} | {_fmt_bytes(p.peak_mem_bytes):>10} | "
            f"{'exact' if p.exact else 'closed form'}{mark}"
        )
    return "\n".join(out)


def main(args) -> int:
    """Run ``plan`` from parsed ``args``; prints the table, returns the exit status."""
    try:
        cluster = parse_topology(args.topology)
    except ValueError as e:
        print(f"hamilton-attn plan: {e}")
        return 2
    shapes = Shapes(args.batch, args.heads, args.kv_heads, args.head_dim, args.dtype_bytes)
    dev = DeviceModel()
    kw = dict(mask=args.mask, shapes=shapes, device=dev)
    if args.exact:
        kw["exact"] = True
    rows = compare(args.schedules, cluster, args.seqlen, **kw)
    ok = [p for _, p, _ in rows if p is not None and p.peak_mem_bytes <= dev.memory_bytes]
    ok = ok or [p for _, p, _ in rows if p is not None]
    key = (lambda p: p.fwd_s) if args.objective == "fwd" else (lambda p: p.fwd_bwd_s)
    best = min(ok, key=key) if ok else None
    w = cluster.num_devices
    print(cluster.describe())
    print(
        f"seqlen {args.seqlen} ({-(-args.seqlen // w)} tokens/device), mask {args.mask}, "
        f"B={shapes.batch} H={shapes.heads}/{shapes.kvh} D={shapes.head_dim}, "
        f"{dev.name} {dev.fwd_tflops_full:.0f}/{dev.bwd_tflops_full:.0f} TF/s fwd/bwd"
    )
    print(format_table(rows, best.schedule if best else None))
    if best is None:
        print("no schedule applies to this topology")
        return 1
    print(f"chosen: {best.schedule} (least predicted {args.objective.replace('_', '+')} time)")
    if args.plot:
        try:
            plot(best, cluster, args.plot, rows)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); table printed only")
    return 0


def _positions(cluster) -> list[tuple[float, float]]:
    import math

    w = cluster.num_devices
    if cluster.kind in ("torus2d",):
        a, b = cluster.shape
        return [(j, -i) for i in range(a) for j in range(b)]
    if cluster.kind == "line":
        return [(i, 0.0) for i in range(w)]
    if cluster.kind == "nodes":
        u, m = cluster.shape
        pos = []
        for d in range(w):
            n, k = divmod(d, m)
            ang = 2 * math.pi * k / m
            pos.append((3.0 * n + math.cos(ang), math.sin(ang)))
        return pos
    return [(math.cos(2 * math.pi * d / w), math.sin(2 * math.pi * d / w)) for d in range(w)]


def plot(best: Prediction, cluster, path: str, rows=None) -> None:
    """Two panels: the chosen schedule's first-step transfers drawn on the devices (one
    colour per piece / cycle), and per step the compute vs transfer time of every
    schedule predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.5))
    pos = _positions(cluster)
    xs, ys = zip(*pos)
    ax0.scatter(xs, ys, s=160, c="black", zorder=3)
    for d, (x, y) in enumerate(pos):
        ax0.annotate(str(d), (x, y), color="white", ha="center", va="center", fontsize=7, zorder=4)
    sched = best.meta.get("schedule_obj")
    if sched is not None and cluster.num_devices <= 64:
        cmap = plt.get_cmap("tab10")
        step0 = sched.steps[0].transfers if sched.steps else ()
        for t in step0:
            (x0, y0), (x1, y1) = pos[t.src], pos[t.dst]
            ax0.annotate(
                "",
                (x1, y1),
                (x0, y0),
                arrowprops=dict(
                    arrowstyle="->",
                    color=cmap(t.piece.part % 10),
                    alpha=0.6,
                    connectionstyle="arc3,rad=0.12",
                ),
            )
        ax0.set_title(f"{best.schedule}: step-0 transfers = its cycles (colour = piece)")
    else:
        ax0.set_title(f"{cluster.name} ({best.schedule}; arcs drawn for exact plans, W <= 64)")
    ax0.set_aspect("equal")
    ax0.axis("off")
    preds = [p for _, p, _ in (rows or [])] or [best]
    for p in preds:
        if p is None:
            continue
        ts = [s.transfer_s * 1e3 for s in p.steps if s.forward for _ in range(s.repeat)]
        ts = [t if t > 0 else float("nan") for t in ts]  # no transfer: a gap on a log axis
        ax1.plot(range(len(ts)), ts, marker=".", label=f"{p.schedule} transfer")
    cs = [s.compute_s * 1e3 for s in best.steps if s.forward for _ in range(s.repeat)]
    ax1.plot(range(len(cs)), cs, "k--", label=f"{best.schedule} compute")
    ax1.set_xlabel("step")
    ax1.set_ylabel("ms per step (forward)")
    ax1.set_yscale("log")
    ax1.set_title(f"{cluster.name}, {best.seqlen} tokens: busiest-resource time per step")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _standalone(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hamilton-attn")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    return main(p.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(_standalone())
