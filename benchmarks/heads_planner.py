"""Where head parallelism wins, by the planner's cost model: for each cluster, sequence
length and head layout, the predicted forward+backward time of the best context-parallel
schedule, of pure Ulysses and of the best hybrid, and the planner's choice.

    python benchmarks/heads_planner.py [--out benchmarks/results/heads_planner_cpu_DATE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from hamilton_attn.planner.cost import compare, split_name
from hamilton_attn.planner.model import Shapes
from hamilton_attn.tables import format_table

TOPOLOGIES = ("nvswitch:8", "full_mesh:8", "nodes:2x8")
SEQLENS = (1 << 16, 1 << 18, 1 << 20)
HEADS = ((32, 8), (32, 32), (8, 1))


def main(argv=None) -> None:
    date = datetime.date.today().isoformat()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=f"benchmarks/results/heads_planner_cpu_{date}")
    args = ap.parse_args(argv)
    rows, data = [], []
    for topo in TOPOLOGIES:
        for seqlen in SEQLENS:
            for hq, hk in HEADS:
                shapes = Shapes(heads=hq, kv_heads=hk)
                got = [(n, p) for n, p, _ in compare(None, topo, seqlen, mask="causal",
                                                     shapes=shapes) if p is not None]  # fmt: skip
                cp = min((x for x in got if split_name(x[0])[1] == 1), key=lambda x: x[1].fwd_bwd_s)
                uly = next((x for x in got if x[0] == "ulysses"), None)
                hyb = [x for x in got if split_name(x[0])[1] > 1]
                best_h = min(hyb, key=lambda x: x[1].fwd_bwd_s) if hyb else None
                best = min(got, key=lambda x: x[1].fwd_bwd_s)

                def ms(x):
                    return f"{x[1].fwd_bwd_s * 1e3:.1f}" if x else "n/a"

                rows.append((topo, seqlen, f"{hq}/{hk}", f"{cp[0]} {ms(cp)}", ms(uly),
                             f"{best_h[0]} {ms(best_h)}" if best_h else "n/a", best[0],
                             f"{cp[1].fwd_bwd_s / best[1].fwd_bwd_s:.2f}"))  # fmt: skip
                data.append(dict(topology=topo, seqlen=seqlen, heads=[hq, hk], choice=best[0],
                                 times={n: p.fwd_bwd_s for n, p in got}))  # fmt: skip
    header = ("cluster", "tokens", "Hq/Hk", "best CP schedule (ms)", "ulysses ms",
              "best hybrid (ms)", "chosen", "CP / chosen")  # fmt: skip
    table = format_table(header, rows)
    print(table)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", *sys.argv]),
        hardware=f"cost model only (no device); {platform.processor() or platform.machine()}",
        model="B=1, D=128, bf16, H200 rates; causal; forward+backward",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=data), indent=1))
    md = [
        "# Where head parallelism wins (planner's cost model)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "Predicted forward+backward time of causal attention per cluster, length and head",
        "layout: the best context-parallel schedule alone, pure Ulysses (heads over all",
        "ranks), the best hybrid (heads over head groups of u consecutive devices, a",
        "schedule across the groups), and what `plan(schedule='auto', heads=...)` picks.",
        "",
        "```",
        table,
        "```",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main()
