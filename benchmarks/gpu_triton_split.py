"""Would one launch per tile configuration help? (one H100 / H200, repository root)::

    python benchmarks/gpu_triton_split.py [--out-dir DIR] [--name NAME]

The ``triton`` kernel picks one tile configuration per mask and pass (``_pick``). A mask
of long and short documents may want large tiles for its long documents and small ones
for the short: launching each group of row tiles with its own configuration would run
both. Before building that, this measures what it could gain: each mask is cut into
contiguous row ranges of whole documents (long documents, runs of short ones), each range
timed alone (its rows' queries against its keys) with every forward and dK/dV candidate
of :data:`~hamilton_attn.kernels.triton.CONFIGS` forced, and the best per range summed,
against the whole mask under each forced candidate and under the default pick. The sum
over ranges of one fixed candidate, against the whole mask under it, shows what cutting
alone costs (launches, tails). bf16, B = 1, 32 heads, head dim 128, forward and
forward+backward (kernel API) TF/s over visible pairs. Writes ``<out-dir>/<name>.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_triton import (  # noqa: E402  (this folder's Triton benchmark)
    docs_mask,
    fused_blocks,
    lognormal_docs,
    rand_bhsd,
    time_kernel,
    uniform_docs,
)

from hamilton_attn.kernels import get_kernel  # noqa: E402
from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402


def doc_ranges(mask: Mask):
    """The mask's row groups ``(q0, q1, k0, k1)``: bands overlapping in rows joined, each
    group's rows seeing only keys ``k0 .. k1 - 1``, in row order."""
    out = []
    for b in sorted(mask.bands, key=lambda b: b.q0):
        if out and b.q0 < out[-1][1]:
            g = out[-1]
            out[-1] = (g[0], max(g[1], b.q1), min(g[2], b.k0), max(g[3], b.k1))
        else:
            out.append((b.q0, b.q1, b.k0, b.k1))
    return out


def cut(mask: Mask, long_from: int):
    """Row groups: each of ``long_from`` rows or more alone, runs of shorter ones joined."""
    parts = []
    for a, b, ka, kb in doc_ranges(mask):
        long = b - a >= long_from
        if long or not parts or parts[-1][4]:
            parts.append([a, b, ka, kb, long])
        else:
            p = parts[-1]
            p[1], p[2], p[3] = b, min(p[2], ka), max(p[3], kb)
    return [tuple(p[:4]) for p in parts]


def timed(mask, q, k, v, fwd=None, dkdv=None):
    """(fwd ms, fwd+bwd ms) of the triton kernel with the given candidates forced."""
    saved = {p: dict(tk.CONFIGS[p]) for p in ("fwd", "dkdv")}
    try:
        if fwd is not None:
            tk.CONFIGS["fwd"][128] = [fwd]
        if dkdv is not None:
            tk.CONFIGS["dkdv"][128] = [dkdv]
        tk._pick.cache_clear()
        tk._forward_work.cache_clear()
        return time_kernel(get_kernel("triton"), q, k, v, mask)
    finally:
        for p, d in saved.items():
            tk.CONFIGS[p].clear()
            tk.CONFIGS[p].update(d)
        tk._pick.cache_clear()


def probe(case, mask, long_from, h=32, d=128):
    sq, sk = mask.shape
    q, k, v = rand_bhsd(sq, h, d, 1), rand_bhsd(sk, h, d, 2), rand_bhsd(sk, h, d, 3)
    flops = 4.0 * h * d * mask.area()
    fwd_c = tk.CONFIGS["fwd"][128]
    dkdv_c = tk.CONFIGS["dkdv"][128]
    row = {"case": case, "long_from": long_from, "pairs_M": mask.area() / 1e6}
    t_def = timed(mask, q, k, v)
    row["default"] = (flops / t_def[0] / 1e9, 3.5 * flops / t_def[1] / 1e9)
    whole_f = {c: timed(mask, q, k, v, fwd=c)[0] for c in fwd_c}
    whole_b = {c: timed(mask, q, k, v, fwd=fwd_c[0], dkdv=c)[1] for c in dkdv_c}
    parts = cut(mask, long_from)
    row["ranges"] = [b - a for a, b, _, _ in parts]
    sum_f = dict.fromkeys(fwd_c, 0.0)
    sum_b = dict.fromkeys(dkdv_c, 0.0)
    best_f = best_fb = 0.0
    picks = []
    for a, b, ka, kb in parts:
        sub = mask.slice((a, b), (ka, kb))
        qs, ks, vs = q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb]
        tf = {c: timed(sub, qs, ks, vs, fwd=c) for c in fwd_c}
        cf = min(tf, key=lambda c: tf[c][0])
        tb = {c: timed(sub, qs, ks, vs, fwd=cf, dkdv=c)[1] for c in dkdv_c}
        cb = min(tb, key=tb.get)
        for c in fwd_c:
            sum_f[c] += tf[c][0]
        for c in dkdv_c:
            sum_b[c] += tb[c]
        best_f += tf[cf][0]
        best_fb += tb[cb]
        picks.append((b - a, cf, cb))
    row["picks"] = picks
    row["whole_fwd"] = {str(c): flops / t / 1e9 for c, t in whole_f.items()}
    row["whole_fb"] = {str(c): 3.5 * flops / t / 1e9 for c, t in whole_b.items()}
    row["cut_fwd"] = {str(c): flops / t / 1e9 for c, t in sum_f.items()}
    row["cut_fb"] = {str(c): 3.5 * flops / t / 1e9 for c, t in sum_b.items()}
    row["split"] = (flops / best_f / 1e9, 3.5 * flops / best_fb / 1e9)
    print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    rows = []
    s32 = 32768
    lt = docs_mask(lognormal_docs(s32))
    rows.append(probe("lognormal docs (median ~1K), 32K", lt, 2048))
    rows.append(probe("lognormal docs (median ~1K), 32K", lt, 1024))
    fused, n = fused_blocks("hamilton", "docs", 8192)
    rows.append(probe(f"hamilton docs 8K/rank step ({n} pieces)", fused, 2048))
    rows.append(probe("docs 64-512, 32K", docs_mask(uniform_docs(s32, 64, 512)), 1 << 30))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = args.name or f"triton_split_{gpu}_{stamp[:10]}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": stamp,
            "command": "python benchmarks/gpu_triton_split.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    (args.out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# One launch per tile configuration: what it could gain ({meta['gpu']})", "",
             f"{meta['date']}, torch {meta['torch']}, `{meta['command']}`", "",
             "| case | long from | default f / f+b | best per range f / f+b | "
             "whole mask per fwd cfg | cut per fwd cfg | whole per dkdv cfg | cut per dkdv cfg |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f2 = lambda d: ", ".join(f"{k} {v:.0f}" for k, v in d.items())  # noqa: E731
        lines.append(
            f"| {r['case']} | {r['long_from']} | {r['default'][0]:.0f} / {r['default'][1]:.0f} "
            f"| {r['split'][0]:.0f} / {r['split'][1]:.0f} | {f2(r['whole_fwd'])} | "
            f"{f2(r['cut_fwd'])} | {f2(r['whole_fb'])} | {f2(r['cut_fb'])} |"
        )
    lines += ["", "Per range (tokens, best forward config, best dK/dV config):", ""]
    lines += [f"- {r['case']} (long from {r['long_from']}): {r['picks']}" for r in rows]
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
