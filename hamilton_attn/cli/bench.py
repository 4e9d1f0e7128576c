"""``hamilton-attn bench``: our schedules beside one device and PyTorch's context_parallel.

For each mask x tokens-per-device, in one run on W ranks: (a) ``attention`` on one
device over the whole problem, (b) PyTorch's ``context_parallel`` (cuDNN SDPA, load
balancing on for causal, off for full) where it applies, (c) each schedule x dispatch.
Forward and forward+backward, timed with device events after warm-up, median of
repeats (each sample ``inner`` back-to-back calls), slowest rank. Reports TF/s per
device (visible pairs only: 4*B*H*D*area, x2.5 for backward), efficiency = T(one
device) / (W x T(W devices)), the ratio to PyTorch's time, and peak forward memory per
device against the ideal (local q, k, v, out, lse and two KV buffers).

This module is the command (:func:`main`) and the bench's import path: the timing lives
in :mod:`.bench_timing`, the PyTorch baseline in :mod:`.bench_torch_cp`, the rounds in
:mod:`.bench_rounds` and what is written in :mod:`.bench_report`; the benchmarks and
tests import their names from here.
"""

from __future__ import annotations

import os
import time

import torch

from .bench_report import (
    HEADER,
    _hardware,
    bench_meta,
    plot_efficiency,
    run_two_gpus,
    save_probe,
    table,
    write_report,
)
from .bench_rounds import GRAPH_OPTIONS, bench_masks, doc_boundaries, run_rank
from .bench_timing import _gpu_rendezvous, time_fn
from .bench_torch_cp import _torch_cp_schedule, torch_cp_inputs

__all__ = [
    "GRAPH_OPTIONS",
    "HEADER",
    "_gpu_rendezvous",
    "_torch_cp_schedule",
    "bench_masks",
    "doc_boundaries",
    "main",
    "pick_device",
    "plot_efficiency",
    "run_rank",
    "run_two_gpus",
    "save_probe",
    "table",
    "time_fn",
    "torch_cp_inputs",
]


def pick_device(asked: str | None) -> tuple[str | None, str]:
    """The device to bench on and a line saying why: ``asked`` if it exists here; with
    none asked, cuda where a GPU is visible, else cpu (gloo). ``(None, reason)`` when
    cuda is asked and no GPU is visible: a pool of zero NCCL ranks cannot start."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if asked == "cuda" and gpus == 0:
        return None, "bench: --device cuda asked, but no GPU is visible (try --device cpu)"
    if asked is None:
        asked = "cuda" if gpus else "cpu"
        why = f"{gpus} GPU(s) visible" if gpus else "no GPU visible"
        return asked, f"bench on {asked} ({why}; --device picks)"
    return asked, f"bench on {asked}"


def _config(args) -> dict:
    """The ranks' configuration from the parsed ``bench`` arguments."""
    return {
        "device": args.device,
        "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        "heads": args.heads,
        "kv_heads": args.kv_heads or args.heads,
        "head_dim": args.head_dim,
        "tokens_per_device": args.tokens_per_device,
        "masks": args.masks,
        "schedules": args.schedules,
        "dispatches": args.dispatches,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "inner": args.inner,
        "torch_cp": not args.no_torch_cp,
        "backwards": args.backward,
        "node_size": args.node_size,
        "graphs": bool(getattr(args, "graphs", False)),
        "fwd_only": bool(getattr(args, "fwd_only", False)),
        "rounds": getattr(args, "rounds", 1),
        "transports": getattr(args, "transports", None),
        "backends": getattr(args, "backends", None) or ["auto"],
        "variants": getattr(args, "variants", None) or ["softmax"],
    }


def main(args, printer=print) -> int:
    from ..testing import GlooPool

    device, why = pick_device(args.device)
    printer(why)
    if device is None:
        return 2
    args.device = device
    cfg = _config(args)
    w = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    backend = "nccl" if args.device == "cuda" else "gloo"
    t0 = time.time()
    with GlooPool(w, backend=backend, timeout_s=600) as pool:
        rows = pool.run(run_rank, w, cfg)[0]
        hw = pool.run(_hardware, 1, args.device)[0]
    text = table(rows)
    printer(text)
    meta = bench_meta(hw, w, cfg, time.time() - t0)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, args.name or f"bench_{hw['kind']}_W{w}")
        write_report(stem, meta, rows, text)
        printer(f"wrote {stem}.json and {stem}.md")
    if args.plot:
        plot_efficiency(rows, args.plot)
        printer(f"wrote {args.plot}")
    return 0 if all("error" not in r for r in rows if r["impl"] == "hamilton-attn") else 1
