"""Plan time against tokens and ranks: ``ha.plan`` on a ``SimulatedGroup``, verifier
included, the plan cache cleared before every timing.

Packed-document training builds a new plan every batch, so planning must be fast at
1M tokens and W = 64. Masks: ``causal`` and ``docs`` (packed causal documents,
lognormal lengths with median 1024 tokens and sigma 1.2, seed 1, at least 16 tokens:
466 documents over 1M tokens, the longest 85K). Each number is the best of
``--repeats`` runs (a shared machine adds noise, never removes it). Run it on one
core: ``taskset -c 0 python benchmarks/plan_time.py``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import hamilton_attn as ha
from hamilton_attn.planner import plans as _plans

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from groupcast_bytes import doc_lengths as _lognormal_lengths  # noqa: E402


def doc_lengths(total: int, seed: int = 1) -> list[int]:
    """Long-tailed (lognormal, median 1024, sigma 1.2) document lengths summing to
    ``total``, seeded: groupcast_bytes.py's generator with a shorter median."""
    return _lognormal_lengths(total, seed, median=1024)


def docs_mask(total: int, seed: int = 1) -> ha.Mask:
    cu = [0]
    for n in doc_lengths(total, seed):
        cu.append(cu[-1] + n)
    return ha.Mask.varlen(cu, causal=True)


def make_mask(kind: str, tokens: int) -> ha.Mask:
    if kind == "causal":
        return ha.Mask.causal(tokens)
    if kind == "docs":
        return docs_mask(tokens)
    if kind == "full":
        return ha.Mask.full(tokens)
    raise ValueError(kind)


#: (mask, schedule, dispatch, extra plan() arguments) timed by default.
COMBOS = [
    ("docs", "groupcast", "minheap", {}),
    ("docs", "ring", "balanced_zigzag", {}),
    ("causal", "ring", "zigzag", {}),
    ("causal", "hamilton", "zigzag", {}),
    ("causal", "groupcast", "minheap", {}),
    ("causal", "bidi_ring", "zigzag", {}),
    ("causal", "line", "zigzag", {}),
    ("causal", "allgather", "zigzag", {}),
    ("causal", "direct", "zigzag", {}),
    ("causal", "hamilton_2level", "zigzag", {"node_size": 4}),
    ("causal", "ring", "stripe", {}),
    ("causal", "groupcast", "balanced_zigzag", {}),
    ("docs", "hamilton", "balanced_zigzag", {}),
    ("docs", "groupcast", "balanced_zigzag", {}),
]


def time_plan(mask: ha.Mask, w: int, schedule: str, dispatch: str, repeats: int, **kw):
    """Best wall and best CPU seconds of ``repeats`` plans, each from an empty cache
    and with the mask's dense pieces forgotten (a new batch's mask); the mask's digest
    (the plan cache's key, paid once per mask) is computed before timing."""
    mask.digest()
    wall = cpu = math.inf
    for _ in range(repeats):
        _plans._cached_plan.cache_clear()
        mask._dense = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        ha.plan(mask, ha.SimulatedGroup(w), schedule=schedule, dispatch=dispatch, **kw)
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20])
    ap.add_argument("--world", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="schedule/dispatch pairs to time, e.g. ring/zigzag")
    ap.add_argument(
        "--stripe1",
        type=int,
        nargs="*",
        default=[944],
        help="token counts for one-token stripes (chunk_size=1) at W = 4",
    )
    today = datetime.datetime.now(datetime.timezone.utc).date()
    ap.add_argument("--out", default=str(ROOT / "results" / f"plan_time_cpu_{today}"))
    args = ap.parse_args(argv)
    rows = []
    combos = [
        c
        for c in COMBOS
        if not args.only or f"{c[1]}/{c[2]}" in args.only or f"{c[0]}:{c[1]}/{c[2]}" in args.only
    ]
    masks: dict = {}
    for kind, sched, disp, kw in combos:
        for n in args.tokens:
            mask = masks.setdefault((kind, n), make_mask(kind, n))
            for w in args.world:
                wall, cpu = time_plan(mask, w, sched, disp, args.repeats, **kw)
                rows.append(
                    dict(
                        mask=kind,
                        schedule=sched,
                        dispatch=disp,
                        options=kw,
                        tokens=n,
                        world=w,
                        seconds=wall,
                        cpu_seconds=cpu,
                    )
                )
                print(
                    f"{kind:7s} {sched:16s} {disp:16s} {n:>8d} W={w:<3d} {wall:8.3f} s"
                    f" (cpu {cpu:.3f})",
                    flush=True,
                )
    for n in args.stripe1:
        for sched in ("ring", "bidi_ring", "groupcast", "allgather"):
            mask = ha.Mask.causal(n)
            wall, cpu = time_plan(mask, 4, sched, "stripe", args.repeats, chunk_size=1)
            rows.append(
                dict(
                    mask="causal",
                    schedule=sched,
                    dispatch="stripe",
                    options={"chunk_size": 1},
                    tokens=n,
                    world=4,
                    seconds=wall,
                    cpu_seconds=cpu,
                )
            )
            print(
                f"causal  {sched:16s} stripe(1 tok)    {n:>8d} W=4   {wall:8.3f} s (cpu {cpu:.3f})",
                flush=True,
            )
    meta = dict(
        hardware=_cpu_model(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        torch=torch.__version__,
        python=platform.python_version(),
        repeats=args.repeats,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        "# Plan time (ha.plan on SimulatedGroup, verifier included, cache cleared)",
        "",
        f"- hardware: {meta['hardware']} (one core), torch {meta['torch']}, "
        f"Python {meta['python']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- best of {args.repeats} runs (wall and CPU time apart: the machine is shared);"
        " the mask's digest is computed before timing; docs = packed causal documents,"
        " lognormal lengths "
        "(median 1024, sigma 1.2, seed 1)",
        "",
        "| mask | schedule | dispatch | tokens | W | wall s | CPU s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        disp = r["dispatch"] + (" (chunk_size=1)" if r["options"].get("chunk_size") == 1 else "")
        lines.append(
            f"| {r['mask']} | {r['schedule']} | {disp} | {r['tokens']} | "
            f"{r['world']} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
