"""How much a launch's order costs at its end: a list-scheduling model of the ``triton``
backend's real tile lists (CPU only, no GPU).

Each pass launches a grid of (row tiles, batch x heads) programs, row tiles heaviest first
(``TileLists.order``); the GPU starts programs in linear order as slots free up. Model:
``slots`` = 132 SMs x programs per SM (one for 8 warps, two for 4 warps on 64 x 64 tiles
and larger, three below), a program's cost one tile (its setup and epilogue) plus its full
tiles plus 1.3 per partial tile, each free slot taking the next program. Printed: the
makespan over the lower bound (total cost / slots) for ``HEAD_GROUP`` = 1 (one head's
tiles after another's, the default before s16), 2, 4, 8, 16, 32 heads interleaved per
tile. A model, not a timing: ``gpu_triton.py --ab`` times the same switch.

Run: ``python benchmarks/launch_order_model.py [--out-dir DIR]`` (writes
``launch_order_model_<date>.md``).
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_triton import docs_mask, fused_blocks, lognormal_docs, uniform_docs  # noqa: E402

from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402

HEADS, SMS, GROUPS = 32, 132, (1, 2, 4, 8, 16, 32)


def makespan(costs, slots: int) -> float:
    """Greedy list scheduling in launch order: each program starts on the first free slot."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def launch_costs(tile_cost: np.ndarray, group: int, heads: int = HEADS) -> np.ndarray:
    """Programs' costs in launch order (tiles already heaviest first) for ``group``."""
    out = []
    for g0 in range(0, heads, group):
        out.append(np.repeat(tile_cost, min(group, heads - g0)))
    return np.concatenate(out)


def cases():
    """The masks ``gpu_triton.py`` times (its own builders: the same documents, the same
    fused steps)."""
    yield "docs 64-512, 32K", docs_mask(uniform_docs(32768, 64, 512))
    yield "lognormal docs, 32K", docs_mask(lognormal_docs(32768))
    yield "dense causal, 32K", Mask.causal(32768)
    for sched in ("hamilton", "direct"):
        for mname in ("docs", "causal"):
            yield f"{sched} {mname} 8K/rank step", fused_blocks(sched, mname, 8192)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    head = "| case | pass | tiles (BM, BN, warps, stages) | slots | " + " | ".join(
        f"{g} heads" for g in GROUPS
    )
    rows = [head + " |", "|---" * (4 + len(GROUPS)) + "|"]
    for name, mask in cases():
        for pass_ in ("fwd", "dq", "dkdv"):
            cfg, lists = tk._pick(mask, pass_, 128, False, cpu)
            ptr, mid = lists.ptr.numpy(), lists.mid.numpy()
            full = mid - ptr[:-1]
            partial = ptr[1:] - ptr[:-1] - full
            cost = (1.0 + full + 1.3 * partial)[lists.order.numpy()]
            bm, bn, warps, _ = cfg
            slots = SMS * (1 if warps == 8 else 2 if bm * bn >= 64 * 64 else 3)
            bound = cost.sum() * HEADS / slots
            ratios = [makespan(launch_costs(cost, g), slots) / bound for g in GROUPS]
            rows.append(f"| {name} | {pass_} | {cfg} | {slots} | "
                        + " | ".join(f"{r:.3f}" for r in ratios) + " |")  # fmt: skip
            print(rows[-1], flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    text = [
        f"# Launch order at the end of a pass: a list-scheduling model ({date})",
        "",
        f"`python benchmarks/launch_order_model.py`, CPU. {HEADS} heads, head dim 128, bf16 "
        "tile picks; each cell the makespan over its lower bound (total cost / slots), "
        "for `HEAD_GROUP` heads interleaved per tile (1: one head after another).",
        "",
        *rows,
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"launch_order_model_{date}.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
