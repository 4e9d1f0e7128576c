"""What the bench and the GPU probes write: the bench's table (:func:`table`), its
``.json``/``.md`` report and efficiency plot, and a probe's files (:func:`save_probe`)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch

from ..tables import format_table

HEADER = (
    "mask",
    "tok/dev",
    "impl",
    "schedule",
    "dispatch",
    "fwd ms",
    "fwd+bwd ms",
    "TF/s/dev fwd",
    "TF/s/dev f+b",
    "eff fwd",
    "eff f+b",
    "vs torch fwd",
    "vs torch f+b",
    "peak mem",
)


def table(rows) -> str:
    graphs = any("fwd_graph_ms" in r for r in rows)
    header = HEADER + (("fwd ms graph", "eff fwd graph") if graphs else ())

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    body = []
    for r in rows:
        names = (r["mask"], r["tokens_per_device"], r["impl"], r["schedule"], r["dispatch"])
        if "error" in r:
            body.append((*names, "error: " + r["error"][:60], *["-"] * (len(header) - 6)))
            continue
        body.append(
            (
                *names,
                f(r["fwd_ms"], ".2f"),
                f(r.get("fwd_bwd_ms"), ".2f"),
                f(r["tflops_fwd"], ".0f"),
                f(r.get("tflops_fwd_bwd"), ".0f"),
                f(r["eff_fwd"], ".3f"),
                f(r.get("eff_fwd_bwd"), ".3f"),
                f(r.get("vs_torch_fwd"), ".2f"),
                f(r.get("vs_torch_fwd_bwd"), ".2f"),
                f(r.get("peak_mem_ratio"), ".2f"),
                *(
                    (f(r.get("fwd_graph_ms"), ".2f"), f(r.get("eff_fwd_graph"), ".3f"))
                    if graphs
                    else ()
                ),
            )
        )
    return format_table(header, body)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def bench_meta(hw: dict, w: int, cfg: dict, seconds: float) -> dict:
    """The bench report's header fields: hardware, date, command line, torch, config."""
    return {
        "hardware": hw,
        "date": _now(),
        "command": "hamilton-attn " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "world_size": w,
        "config": cfg,
        "seconds": round(seconds, 1),
    }


def write_report(stem: str, meta: dict, rows: list[dict], text: str) -> None:
    """``stem.json`` (meta and rows) and ``stem.md`` (a header saying what the columns
    mean, then the table ``text``)."""
    cfg, w = meta["config"], meta["world_size"]
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(
            f"# hamilton-attn bench\n\n- hardware: {meta['hardware']['name']} x {w}\n"
            f"- date: {meta['date']}\n- command: `{meta['command']}`\n"
            f"- torch {meta['torch']}, {cfg['dtype']}, heads {cfg['heads']}/"
            f"{cfg['kv_heads']}, head dim {cfg['head_dim']}, batch 1\n"
            f"- efficiency = T(one device) / (W x T); TF/s count visible pairs only; "
            f"peak mem = forward peak / (local q,k,v,out,lse + 2 KV buffers)\n"
            + (
                "- graph: the forward replayed as a CUDA graph (inputs read in place, no "
                "copies); eff fwd graph = min(one device eager, one device graph) / "
                "(W x T graph)\n"
                if cfg.get("graphs")
                else ""
            )
            + "\n"
        )
        f.write(text + "\n")


def run_two_gpus(rank_fn, *args):
    """``rank_fn(ctx, *args)`` on 2 NCCL ranks (GPU r for rank r); the ranks' results."""
    from ..testing import GlooPool

    with GlooPool(2, backend="nccl", timeout_s=600) as pool:
        return pool.run(rank_fn, 2, *args)


def save_probe(out_dir: str, stem: str, title: str, text: str, data: dict, **meta_extra) -> None:
    """Write a GPU probe's table as ``stem.md`` and its data as ``stem.json`` under
    ``out_dir``, both with hardware, torch version, date and the command line."""
    meta = {
        "hardware": f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
        if torch.cuda.is_available()
        else "cpu",
        "torch": torch.__version__,
        "date": _now(),
        "command": "python " + " ".join(sys.argv),
        **meta_extra,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, **data}, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(f"# {title}\n\n{json.dumps(meta)}\n\n```\n{text}\n```\n")


def _hardware(ctx, device):
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        kind = "H200" if "H200" in name else ("H100" if "H100" in name else name.split()[-1])
    else:
        name, kind = (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "cpu",
        )
    return {"name": name, "kind": kind}


def plot_efficiency(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("eff_fwd", "eff_fwd_bwd")):
        series: dict[str, list] = {}
        for r in rows:
            if "error" in r or r["impl"] == "one device" or r.get(key) is None:
                continue
            label = f"{r['mask']} {r['schedule']}/{r['dispatch']}"
            series.setdefault(label, []).append((r["seqlen"], r[key]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total tokens")
        ax.set_ylabel("efficiency " + ("forward" if key == "eff_fwd" else "forward+backward"))
        ax.set_ylim(0, 1.1)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
