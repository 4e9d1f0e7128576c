"""Fit the planner's fused-step rates (``DeviceModel.fwd_tflops_fused`` / ``bwd_tflops_fused``
and ``fused_rows_half_fwd`` / ``_bwd``) to the fused steps ``gpu_triton.py`` timed.

CPU only: rebuilds each timed step's fused block (rank 3 of a ``SimulatedGroup(8)`` plan,
its step with the most pieces, zigzag dispatch, as ``gpu_triton.fused_blocks`` does),
takes the per-piece cuDNN rate measured for it (what ``auto`` runs there), and fits
``rate(band) = R * rows / (rows + half)`` per pass, the step at the area-weighted harmonic
mean over its bands, by least squares on log rates (R in closed form, half on a grid).
Prints the fit beside one constant rate and writes a markdown table.

Run: ``python benchmarks/fit_fused_rates.py [--results FILE.json] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import doc_lengths  # noqa: E402

import hamilton_attn as ha  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "results" / "triton_H200_2026-12-04_s9.json"
CASE = re.compile(r"(\w+) (causal|docs) (\d+)K/rank step")


def bands_of(sched: str, mname: str, per_rank: int) -> list[tuple[int, int]]:
    """``(area, rows)`` of every band of the step's fused block."""
    total = 8 * per_rank
    if mname == "causal":
        m = Mask.causal(total)
    else:
        cu = [0]
        for n in doc_lengths(total, 1):
            cu.append(cu[-1] + n)
        m = Mask.varlen(cu, causal=True)
    p = ha.plan(m, ha.SimulatedGroup(8, 3), schedule=sched, dispatch="zigzag")
    steps = [s.compute[3] for s in p.schedule.forward_steps() if s.compute[3]]
    out = []
    for piece in max(steps, key=len):
        for b in p.fused_block(3, [piece])[0].bands:
            out.append((b.area(), b.q1 - b.q0))
    return out


def step_rate(bands, rate: float, half: float) -> float:
    total = sum(a for a, _ in bands)
    return total / sum(a * (n + half) / (rate * n) for a, n in bands)


def fit(steps, which: int):
    ys = np.log([s[which] for s in steps])
    best = None
    for half in np.arange(0.0, 4001.0, 10.0):
        ps = np.log([step_rate(s[-1], 1.0, half) for s in steps])
        r = float(np.mean(ys - ps))
        err = float(np.sqrt(np.mean((ys - ps - r) ** 2)))
        if best is None or err < best[0]:
            best = (err, half, math.exp(r))
    const = float(np.sqrt(np.mean((ys - ys.mean()) ** 2)))
    return best, const


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(DEFAULT))
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["rows"]
    steps = []
    for r in rows:
        m = CASE.match(r["case"])
        if not m or not r.get("cudnn"):
            continue
        f, fb = r["cudnn"]
        bwd = 2.5 / (3.5 / fb - 1.0 / f)  # the backward alone, 2.5x the forward's flops
        bands = bands_of(m[1], m[2], int(m[3]) * 1024)
        steps.append((r["case"], f, bwd, bands))
    (ef, hf, rf), cf = fit(steps, 1)
    (eb, hb, rb), cb = fit(steps, 2)
    lines = [
        f"# Fused-step rates fitted to measured steps ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/fit_fused_rates.py --results {Path(args.results).name}`"
        " (CPU; the rates are the per-piece cuDNN column of that H200 run).",
        "",
        f"Fit: forward R = {rf:.0f} TF/s, half = {hf:.0f} rows (rms log error {ef:.3f}, one "
        f"constant {cf:.3f}); backward alone R = {rb:.0f}, half = {hb:.0f} ({eb:.3f}, "
        f"constant {cb:.3f}).",
        "",
        "| step | bands | measured fwd / bwd | fitted fwd / bwd |",
        "|---|---|---|---|",
    ]
    for case, f, b, bands in steps:
        pf, pb = step_rate(bands, rf, hf), step_rate(bands, rb, hb)
        lines.append(f"| {case} | {len(bands)} | {f:.0f} / {b:.0f} | {pf:.0f} / {pb:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out_dir) / f"fused_rates_fit_{datetime.date.today()}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
