"""The planner's simulator report: schedules on topologies, hiding lengths, calibration.

    python benchmarks/simulate.py [--out benchmarks/results/simulate_cpu_DATE.md]

Pure Python (no GPU): every number is a prediction of ``hamilton_attn.planner`` except
the measured 2 x H200 times read from ``benchmarks/results/
cp_schedules_H200x2_2026-11-22.json`` (``CALIBRATION``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hamilton_attn.planner import DeviceModel, Shapes, simulate, tokens_to_hide
from hamilton_attn.planner.cluster import full_mesh, nvswitch, parse_topology

ROOT = Path(__file__).resolve().parent
#: the measured bench the simulator's predictions are set beside (section 5)
CALIBRATION = "cp_schedules_H200x2_2026-11-22.json"
SHAPES = Shapes()  # B=1, H=32, D=128, bf16: 16 KiB of K+V per token
TPD = 65536  # tokens per device for the per-step comparisons


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def step_transfer(schedule: str, topo, tpd: int = TPD, **kw):
    w = parse_topology(topo).num_devices if isinstance(topo, str) else topo.num_devices
    p = simulate(schedule, topo, tpd * w, mask="full", shapes=SHAPES, **kw)
    return p


def section_full_mesh(out: list[str]) -> dict:
    out.append("## 1. `full_mesh:8` (MI300X-like, 64 GB/s per direction per link)\n")
    out.append(
        f"Full mask, {TPD} tokens per device (each rank's K+V shard "
        f"{TPD * SHAPES.kv_bytes_per_token / 2**30:.2f} GiB); per-step transfer time of the "
        "busiest link. Equal bytes: every schedule moves each shard to the 7 other "
        "devices once; ring pushes a whole shard down one link per step, "
        "Hamilton/direct push 1/7 of it down each of the 7 links.\n"
    )
    ideal = full_mesh(8)
    ideal.efficiency_curve = ()
    res = {}
    out.append(
        "| schedule | step transfer ms (NCCL-curve links) | vs ring | step transfer ms "
        "(ideal links) | vs ring | fwd ms | fwd+bwd ms |"
    )
    out.append("|---|---|---|---|---|---|---|")
    base = {}
    for s in ("ring", "bidi_ring", "hamilton", "direct", "allgather"):
        p = step_transfer(s, "full_mesh:8")
        q = step_transfer(s, ideal)
        base.setdefault("r", p.max_step_transfer_s)
        base.setdefault("ri", q.max_step_transfer_s)
        r1 = p.max_step_transfer_s / base["r"]
        r2 = q.max_step_transfer_s / base["ri"]
        res[s] = (r1, r2)
        out.append(
            f"| {s} | {_ms(p.max_step_transfer_s)} | {r1:.3f} | {_ms(q.max_step_transfer_s)} | "
            f"{r2:.3f} | {p.fwd_s * 1e3:.1f} | {p.fwd_bwd_s * 1e3:.1f} |"
        )
    out.append(
        f"\nHamilton / ring step transfer: **{res['hamilton'][1]:.3f}** on ideal links "
        f"(1/7 = {1 / 7:.3f}), **{res['hamilton'][0]:.3f}** with the NCCL size-efficiency "
        "curve (a 1/7 message reaches a lower fraction of link bandwidth). allgather "
        "moves W-1 shards in its first step, so its one step is as long as ring's "
        "(all 7 links busy with a whole shard each).\n"
    )
    return res


def section_nvswitch(out: list[str]) -> dict:
    out.append("## 2. `nvswitch:8` (H200 NVSwitch node, one 450 GB/s port per direction)\n")
    res = {}
    ideal = nvswitch(8)
    ideal.efficiency_curve = ()
    out.append(
        "| schedule | step transfer ms (NCCL curve) | vs ring | step transfer ms (ideal) "
        "| vs ring | fwd ms | fwd+bwd ms |"
    )
    out.append("|---|---|---|---|---|---|---|")
    base = basei = None
    for s in ("ring", "bidi_ring", "hamilton", "direct", "allgather"):
        p = step_transfer(s, "nvswitch:8")
        q = step_transfer(s, ideal)
        base = base or p.max_step_transfer_s
        basei = basei or q.max_step_transfer_s
        res[s] = (p.max_step_transfer_s / base, q.max_step_transfer_s / basei)
        out.append(
            f"| {s} | {_ms(p.max_step_transfer_s)} | {res[s][0]:.3f} | "
            f"{_ms(q.max_step_transfer_s)} | {res[s][1]:.3f} | {p.fwd_s * 1e3:.1f} | "
            f"{p.fwd_bwd_s * 1e3:.1f} |"
        )
    out.append(
        "\nWhy about equal: behind a non-blocking switch a device has ONE port per "
        "direction, shared by all its peers. Ring sends one shard per step through it, "
        "Hamilton sends 7 sevenths through it: the same bytes through the same port, "
        "so the same time (Hamilton slightly slower: 7 smaller messages run at a lower "
        "NCCL efficiency). Many links only help when they are separate wires "
        "(full mesh), or when the scarce resource is per-device and only some peers "
        "use it (the NICs below). With the current executor Hamilton also pays one "
        "output merge per piece (W-1 per step instead of 1), visible in fwd ms.\n"
    )
    return res


def section_nodes(out: list[str]) -> dict:
    out.append("## 3. `nodes:2x8` (two NVSwitch nodes, one 50 GB/s NIC per GPU)\n")
    out.append("| schedule | step transfer ms | busiest NIC bytes / step | fwd ms | fwd+bwd ms |")
    out.append("|---|---|---|---|---|")
    res = {}
    for s in ("ring", "bidi_ring", "hamilton", "hamilton_2level", "allgather"):
        p = step_transfer(s, "nodes:2x8")
        nic = max(
            (b for n, b in p.link_bytes.items() if n.startswith("nic")),
            default=0.0,
        )
        steps = max(sum(st.repeat for st in p.steps if st.forward and st.transfer_s > 0), 1)
        res[s] = (p.max_step_transfer_s, nic / steps)
        out.append(
            f"| {s} | {_ms(p.max_step_transfer_s)} | {nic / steps / 1e6:.1f} MB | "
            f"{p.fwd_s * 1e3:.1f} | {p.fwd_bwd_s * 1e3:.1f} |"
        )
    r = res["hamilton_2level"][0] / res["ring"][0]
    out.append(
        f"\nTwo-level / ring step transfer: **{r:.3f}** (ideal 1/8 = 0.125: ring pushes a "
        "whole shard through the NIC of the two devices at the node boundary, the "
        "two-level cycles push 1/8 of a shard through every NIC). Single-level Hamilton "
        "sends 8 of its 15 pieces off-node per step and is NIC-bound.\n"
    )
    return res


def section_hiding(out: list[str]) -> dict:
    out.append("## 4. Tokens per device at which transfers hide behind compute\n")
    out.append(
        "Causal mask, zigzag, bf16, H=32, D=128, cuDNN rates; smallest tokens per device "
        "at which the transfer time not covered by the attention kernels is <= 5% of the "
        "kernels' time (bisected to 1%; merges and launch overheads are not counted as "
        "cover). Links: the NCCL-curve efficiency.\n"
    )
    cases = [
        ("full_mesh:8", ("ring", "bidi_ring", "hamilton", "direct", "allgather")),
        ("nvswitch:8", ("ring", "bidi_ring", "hamilton", "allgather")),
        ("nodes:2x8", ("ring", "bidi_ring", "hamilton", "hamilton_2level", "allgather")),
        ("line:8", ("ring", "line", "bidi_ring")),
        ("torus2d:4x4", ("ring", "bidi_ring", "hamilton")),
    ]
    out.append("| topology | schedule | tokens/device to hide |")
    out.append("|---|---|---|")
    res = {}
    for topo, scheds in cases:
        for s in scheds:
            try:
                n = tokens_to_hide(s, topo, mask="causal", lo=256, hi=1 << 22, shapes=SHAPES)
            except ValueError as e:
                n = f"n/a ({e})"
            res[(topo, s)] = n
            out.append(f"| {topo} | {s} | {n if n is not None else '> 4M'} |")
    out.append("")
    return res


def section_calibration(out: list[str]) -> dict:
    out.append(f"## 5. Prediction vs measured, 2 x H200 ({CALIBRATION})\n")
    path = ROOT / "results" / CALIBRATION
    data = json.loads(path.read_text())
    cfg = data["meta"]["config"]
    shapes = Shapes(1, cfg["heads"], cfg["kv_heads"], cfg["head_dim"], 2)
    out.append(
        "Topology `nvswitch:2` (NV18: 450 GB/s per direction, NCCL efficiency curve), "
        "device model defaults (cuDNN rates of GPU_FACTS; the backward per-block "
        "accumulation rate is fitted to the ring trace, so rows are not all out-of-sample).\n"
    )
    out.append(
        "| mask | schedule | dispatch | fwd meas | fwd pred | err | f+b meas | f+b pred | err |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    errs = []
    for r in data["rows"]:
        if r["impl"] != "hamilton-attn" or r["mask"] not in ("causal", "full"):
            continue
        p = simulate(
            r["schedule"],
            "nvswitch:2",
            r["seqlen"],
            mask=r["mask"],
            dispatch=r["dispatch"],
            shapes=shapes,
        )
        e1 = p.fwd_s * 1e3 / r["fwd_ms"] - 1
        e2 = p.fwd_bwd_s * 1e3 / r["fwd_bwd_ms"] - 1
        errs += [(abs(e1), "fwd", r), (abs(e2), "f+b", r)]
        out.append(
            f"| {r['mask']} | {r['schedule']} | {r['dispatch']} | {r['fwd_ms']:.2f} | "
            f"{p.fwd_s * 1e3:.2f} | {e1 * 100:+.1f}% | {r['fwd_bwd_ms']:.2f} | "
            f"{p.fwd_bwd_s * 1e3:.2f} | {e2 * 100:+.1f}% |"
        )
    worst = max(errs, key=lambda t: t[0])
    mean = sum(e for e, _, _ in errs) / len(errs)
    within = sum(e <= 0.15 for e, _, _ in errs)
    out.append(
        f"\nMean |error| {mean * 100:.1f}%, worst {worst[0] * 100:.1f}% ({worst[1]}, "
        f"{worst[2]['mask']} {worst[2]['schedule']} {worst[2]['dispatch']}); "
        f"{within}/{len(errs)} within 15%. Where the model is low in backward: the "
        "trace shows the zigzag diagonal block's backward on rank 0 at 14.5 ms against "
        "10.9 ms on rank 1 (same area), and the final dK/dV return exposed; the model "
        "uses one masked-block rate.\n"
    )
    return {"mean": mean, "worst": worst[0], "within": within, "n": len(errs)}


def section_scale(out: list[str]) -> dict:
    out.append("## 6. Simulator speed at scale (closed form)\n")
    out.append("| topology | schedule | fwd ms | fwd+bwd ms | simulate s |")
    out.append("|---|---|---|---|---|")
    res = {}
    for topo, scheds in (
        ("nodes:128x8", ("ring", "hamilton_2level", "hamilton")),
        ("nvswitch:1024", ("ring", "hamilton")),
        ("full_mesh:1024", ("ring", "hamilton")),
        ("torus2d:32x32", ("ring", "hamilton")),
    ):
        for s in scheds:
            t0 = time.perf_counter()
            p = simulate(s, topo, 1024 * 1024 * 4, mask="causal", shapes=SHAPES)
            dt = time.perf_counter() - t0
            res[(topo, s)] = dt
            out.append(
                f"| {topo} | {s} | {p.fwd_s * 1e3:.1f} | {p.fwd_bwd_s * 1e3:.1f} | {dt:.3f} |"
            )
    out.append(
        "\n(4M tokens in all, 4K per device.) Single-level Hamilton at W = 1024 cuts each "
        "shard into 1023 pieces of 4 tokens: the model charges a launch and a merge of the "
        "rank's rows per piece, so it is hopeless there - as it would be in the executor. "
        "Closed-form cost: O(W) per pattern (O(1) for all-to-all on switch / mesh).\n"
    )
    return res


def section_merge(out: list[str]) -> None:
    out.append("## 7. What the per-piece merge costs Hamilton (full_mesh:8, causal)\n")
    out.append(
        "| tokens/device | ring fwd ms | hamilton fwd ms (eager merge) | "
        "hamilton fwd ms (compiled merge, 0.161 ms / 16K rows) |"
    )
    out.append("|---|---|---|---|")
    fast = DeviceModel(merge_elems_per_s=16384 * 32 * 128 / 0.161e-3)
    for tpd in (4096, 16384, 65536):
        a = simulate("ring", "full_mesh:8", 8 * tpd, shapes=SHAPES)
        b = simulate("hamilton", "full_mesh:8", 8 * tpd, shapes=SHAPES)
        c = simulate("hamilton", "full_mesh:8", 8 * tpd, shapes=SHAPES, device=fast)
        out.append(f"| {tpd} | {a.fwd_s * 1e3:.2f} | {b.fwd_s * 1e3:.2f} | {c.fwd_s * 1e3:.2f} |")
    out.append(
        "\nThe executor merges every block's partial output into the accumulator; "
        "Hamilton runs W-1 blocks per step (one per piece), so it pays W-1 merges of "
        "the rank's rows per step where ring pays one. Batching a step's pieces into "
        "one kernel call (or one merge) is what lets the link advantage show.\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    ap.add_argument("--out", default=str(ROOT / "results" / f"simulate_cpu_{today}.md"))
    args = ap.parse_args(argv)
    out = [
        "# Planner simulator report",
        "",
        "Generated by `python benchmarks/simulate.py` (pure Python, predictions only, "
        "except section 5's measured column).",
        "",
    ]
    t0 = time.perf_counter()
    section_full_mesh(out)
    section_nvswitch(out)
    section_nodes(out)
    section_hiding(out)
    section_calibration(out)
    section_scale(out)
    section_merge(out)
    out.append(f"_Report computed in {time.perf_counter() - t0:.1f} s._\n")
    text = "\n".join(out)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
