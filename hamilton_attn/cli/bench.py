"""``hamilton-attn bench``: our schedules beside one device and PyTorch's context_parallel.

For each mask x tokens-per-device, in one run on W ranks: (a) ``attention`` on one
device over the whole problem, (b) PyTorch's ``context_parallel`` (cuDNN SDPA, load
balancing on for causal, off for full) where it applies, (c) each schedule x dispatch.
Forward and forward+backward, timed with device events after warm-up, median of
repeats (each sample ``inner`` back-to-back calls), slowest rank. Reports TF/s per
device (visible pairs only: 4*B*H*D*area, x2.5 for backward), efficiency = T(one
device) / (W x T(W devices)), the ratio to PyTorch's time, and peak forward memory per
device against the ideal (local q, k, v, out, lse and two KV buffers).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from ..masks import Mask
from ..runtime.graphs import cuda_graph


def bench_masks(seqlen: int, names) -> dict[str, Mask]:
    out = {}
    for name in names:
        if name == "causal":
            out[name] = Mask.causal(seqlen)
        elif name == "full":
            out[name] = Mask.full(seqlen)
        elif name == "docs":
            out[name] = Mask.varlen(doc_boundaries(seqlen), causal=True)
        elif name == "window":
            out[name] = Mask.sliding_window(seqlen, (max(1, seqlen // 8), 0))
        else:
            raise ValueError(f"masks: unknown mask {name!r} (causal, full, docs, window)")
    return out


def doc_boundaries(seqlen: int, seed: int = 0) -> list[int]:
    """Packed documents with long-tailed (log-normal, sigma 1) lengths, seeded."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < seqlen:
        n = int(torch.empty(1).log_normal_(mean=0.0, std=1.0, generator=g).item() * seqlen / 20)
        cu.append(min(seqlen, cu[-1] + max(16, n)))
    return cu


# Replay alone: the graph reads the inputs in place and hands out its own outputs, as
# in a model whose layers are all in one graph (no copies in or out).
GRAPH_OPTIONS = dict(static_inputs=True, clone_outputs=False)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gpu_rendezvous(dev, group, sleep_ms: float = 3.0) -> None:
    """Queue, on the current stream: a ``sleep_ms`` spin, then an all-reduce of one
    element over ``group`` (the GPUs of all ranks leave it together)."""
    import torch.distributed as dist

    from ..runtime.comm import gpu_sleep

    gpu_sleep(dev, sleep_ms * 1e3)
    dist.all_reduce(torch.ones(1, device=dev), group=group)


def time_fn(fn, dev, *, warmup: int, repeats: int, group=None, inner: int = 1) -> float:
    """Median milliseconds of ``fn`` on this rank (slowest rank if ``group``). Each sample
    times ``inner`` back-to-back calls and divides: steady state, as layers run in a
    model. With a ``group``, the ranks' GPUs start each sample together: hosts leave a
    barrier up to milliseconds apart, and a rank that starts its calls early would time
    its wait for the late one as attention (in a model the previous layer lines them
    up). So after the barrier each rank queues a short GPU sleep (time for the host to
    queue the calls behind it), a one-element all-reduce (the GPUs meet there), the start
    event and the calls, with no host wait in between."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        if group is not None:
            dist.barrier(group)
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if group is not None:
                _gpu_rendezvous(dev, group)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    med = statistics.median(times)
    if group is not None:
        t = torch.tensor([med], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        med = t.item()
    return med


def torch_cp_inputs(q, k, v, g):
    """q, k, v, dout (bshd) as PyTorch's context_parallel takes them: bhsd, with K and V
    repeated up to q's heads (head h of q reads KV head h // (Hq/Hk), as in GQA)."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v, g))


def _torch_cp_times(ctx, dev, q, k, v, g, causal: bool, warmup, repeats, inner=1, fwd_only=False):
    """PyTorch's context_parallel (cuDNN), or None where it does not apply. Its ring
    passes K and V to scaled_dot_product_attention without ``enable_gqa``, so with
    fewer KV heads than query heads they are repeated up to the query heads first (the
    row says so): it then moves Hq/Hk times our KV bytes."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options
    import torch.distributed as dist

    _cp_options.enable_load_balance = causal
    ranks = dist.get_process_group_ranks(ctx.group)
    mesh = DeviceMesh(dev.type, ranks)
    qq, kk, vv, gg = torch_cp_inputs(q, k, v, g)
    backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
    res = {}
    with context_parallel(mesh, buffers=[qq, kk, vv, gg], buffer_seq_dims=[2, 2, 2, 2]):

        def fwd():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)

        def fwd_bwd():
            with sdpa_kernel([backend]):
                a, b, c = (t.detach().requires_grad_() for t in (qq, kk, vv))
                F.scaled_dot_product_attention(a, b, c, is_causal=causal).backward(gg)

        kw = dict(warmup=warmup, repeats=repeats, group=ctx.group, inner=inner)
        res["fwd"] = time_fn(fwd, dev, **kw)
        res["fwd_bwd"] = None if fwd_only else time_fn(fwd_bwd, dev, **kw)
    return res


def _torch_cp_schedule(hq: int, hk: int) -> str:
    """The baseline's schedule column: its ring, and the KV repeat when Hk < Hq."""
    return "ring (torch)" if hq == hk else f"ring (torch, KV heads x{hq // hk})"


_KEY = ("mask", "tokens_per_device", "impl", "schedule", "dispatch")


def run_rank(ctx, cfg: dict) -> list[dict]:
    """Every configuration, ``cfg["rounds"]`` times over (one device, PyTorch's and ours
    in turn each round, so the GPUs' clock drift as they warm falls on all alike);
    each number is the median over rounds of that round's value, efficiencies and
    ratios included (each against its own round's one-device time)."""
    n = cfg.get("rounds", 1)
    rounds = [_run_round(ctx, cfg, i, n) for i in range(n)]
    if n == 1:
        return rounds[0]
    out = []
    for row in rounds[0]:
        key = tuple(row.get(x) for x in _KEY)
        same = [r for rs in rounds for r in rs if tuple(r.get(x) for x in _KEY) == key]
        merged = dict(row, rounds=len(same))
        for f, val in row.items():
            vals = [r.get(f) for r in same]
            if isinstance(val, float) and all(isinstance(x, (int, float)) for x in vals):
                merged[f] = statistics.median(vals)
        out.append(merged)
    return out


def _run_round(ctx, cfg: dict, round_i: int, n_rounds: int) -> list[dict]:
    import torch.distributed as dist

    import hamilton_attn as ha
    from hamilton_attn.runtime import copy_engine

    dev = torch.device("cuda", ctx.rank) if cfg["device"] == "cuda" else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    w = ctx.world_size
    hq, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    warmup, repeats, inner = cfg["warmup"], cfg["repeats"], cfg.get("inner", 1)
    rows = []
    cases = [(n, mname) for n in cfg["tokens_per_device"] for mname in cfg["masks"]]
    transport0 = copy_engine.TRANSPORT
    transports = cfg.get("transports") or [transport0]
    per_round = len(cases) * (
        2 + len(cfg["schedules"]) * len(cfg["backwards"]) * len(cfg["dispatches"]) * len(transports)
    )
    total = per_round * n_rounds
    done = per_round * round_i

    def progress(label):
        nonlocal done
        done += 1
        if ctx.rank == 0 and cfg.get("progress", True):
            bar = "#" * (30 * done // total)
            print(f"\r[{bar:<30}] {done}/{total} {label:<40}", end="", file=sys.stderr, flush=True)

    for n, mname in cases:
        s = n * w
        mask = bench_masks(s, [mname])[mname]
        area = mask.area()
        flops_f = 4 * hq * d * area  # B = 1
        gen = torch.Generator().manual_seed(0)
        q, k, v, g = (
            torch.randn(1, s, h, d, generator=gen).to(dev, dtype) for h in (hq, hk, hk, hq)
        )
        base = {"mask": mname, "tokens_per_device": n, "seqlen": s, "world_size": w}
        # (a) one device, the whole problem (rank 0; the others wait at the barrier).
        one = {}
        if ctx.rank == 0:

            def one_fwd():
                ha.attention(q, k, v, mask)

            def one_fwd_bwd():
                a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
                ha.attention(a, b, c, mask).backward(g)

            kw = dict(warmup=warmup, repeats=repeats, inner=inner)
            one["fwd"] = time_fn(one_fwd, dev, **kw)
            one["fwd_bwd"] = 0.0 if cfg.get("fwd_only") else time_fn(one_fwd_bwd, dev, **kw)
            if cfg.get("graphs"):
                g_one = cuda_graph(lambda a, b, c: ha.attention(a, b, c, mask), **GRAPH_OPTIONS)
                g_one(q, k, v)  # capture outside the timed samples
                one["fwd_graph"] = time_fn(lambda: g_one(q, k, v), dev, **kw)
                g_one = None
        keys = ("fwd", "fwd_bwd", "fwd_graph")
        t1 = torch.tensor([one.get(x, 0.0) for x in keys], dtype=torch.float64, device=dev)
        dist.broadcast(t1, dist.get_global_rank(ctx.group, 0), group=ctx.group)
        one = {x: t1[i].item() for i, x in enumerate(keys) if x != "fwd_graph" or cfg.get("graphs")}
        if cfg.get("fwd_only"):
            one["fwd_bwd"] = None
        progress(f"{mname} {n}: one device")
        rows.append(
            dict(
                base,
                impl="one device",
                schedule="-",
                dispatch="-",
                **_rates(one, one, flops_f, 1),
                peak_mem_ratio=None,
            )
        )
        # (b) PyTorch's context parallel.
        tcp = None
        if mname in ("causal", "full") and cfg["torch_cp"] and w > 1 and dev.type != "cuda":
            rows.append(
                dict(
                    base,
                    impl="torch context_parallel",
                    schedule=_torch_cp_schedule(hq, hk),
                    dispatch="-",
                    # Its ring handles the GPU attention ops only (flash, efficient,
                    # cuDNN); on CPU it fails inside DTensor dispatch.
                    error=f"n/a on {dev.type}: context_parallel has GPU attention ops only",
                )
            )
        elif mname in ("causal", "full") and cfg["torch_cp"] and w > 1:
            try:
                tcp = _torch_cp_times(
                    ctx,
                    dev,
                    q,
                    k,
                    v,
                    g,
                    mname == "causal",
                    warmup,
                    repeats,
                    inner,
                    cfg.get("fwd_only", False),
                )
                rows.append(
                    dict(
                        base,
                        impl="torch context_parallel",
                        schedule=_torch_cp_schedule(hq, hk),
                        dispatch="load-balanced" if mname == "causal" else "contiguous",
                        **_rates(tcp, one, flops_f, w),
                        peak_mem_ratio=None,
                        kv_heads_repeated=hq // hk,
                    )
                )
            except Exception as err:  # noqa: BLE001 - reported in the table
                rows.append(
                    dict(
                        base,
                        impl="torch context_parallel",
                        schedule=_torch_cp_schedule(hq, hk),
                        dispatch="-",
                        error=f"{type(err).__name__}: {str(err)[:120]}",
                    )
                )
        progress(f"{mname} {n}: torch context_parallel")
        # (c) our schedules.
        combos = [
            (sc, bw, disp, tr)
            for sc in cfg["schedules"]
            for bw in cfg["backwards"]
            for disp in cfg["dispatches"]
            for tr in transports
        ]
        for sched, bw, disp, tr in combos:
            copy_engine.TRANSPORT = tr
            label = f"{mname} {n}: {sched}/{disp}"
            try:
                p = ha.plan(
                    mask,
                    ctx.group,
                    schedule=sched,
                    dispatch=disp,
                    backward=bw,
                    **({"node_size": cfg["node_size"]} if sched == "hamilton_2level" else {}),
                )
            except ValueError as err:
                rows.append(
                    dict(
                        base,
                        impl="hamilton-attn",
                        schedule=sched + (f" [{tr}]" if len(transports) > 1 else ""),
                        dispatch=disp,
                        error=str(err)[:120],
                    )
                )
                progress(label)
                continue
            ql, kl, vl, gl = (ha.dispatch(t, p) for t in (q, k, v, g))
            ha.calc_attn(ql, kl, vl, p)  # first call: cross-rank checks, warm caches

            def fwd():
                ha.calc_attn(ql, kl, vl, p)

            def fwd_bwd():
                a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
                ha.calc_attn(a, b, c, p).backward(gl)

            kw = dict(warmup=warmup, repeats=repeats, group=ctx.group, inner=inner)
            ours = {
                "fwd": time_fn(fwd, dev, **kw),
                "fwd_bwd": None if cfg.get("fwd_only") else time_fn(fwd_bwd, dev, **kw),
            }
            if cfg.get("graphs"):
                g_fwd = cuda_graph(lambda a, b, c, p=p: ha.calc_attn(a, b, c, p), **GRAPH_OPTIONS)
                g_fwd(ql, kl, vl)  # capture outside the timed samples
                ours["fwd_graph"] = time_fn(lambda: g_fwd(ql, kl, vl), dev, **kw)
                g_fwd = None
            mem = _peak_mem_ratio(fwd, dev, ql, kl, vl, p) if dev.type == "cuda" else None
            row = dict(
                base,
                impl="hamilton-attn",
                schedule=(sched if bw == "replay" else f"{sched} (bwd {bw})")
                + (f" [{tr}]" if len(transports) > 1 else ""),
                dispatch=disp,
                **_rates(ours, one, flops_f, w),
                peak_mem_ratio=mem,
                bytes_sent_per_rank=max(p.report.sent_tokens) * 2 * hk * d * q.element_size(),
            )
            if tcp:
                row["vs_torch_fwd"] = tcp["fwd"] / ours["fwd"]
                if ours["fwd_bwd"]:
                    row["vs_torch_fwd_bwd"] = tcp["fwd_bwd"] / ours["fwd_bwd"]
            rows.append(row)
            progress(label)
        copy_engine.TRANSPORT = transport0
        q = k = v = g = None  # free the inputs before the next size
    if ctx.rank == 0 and cfg.get("progress", True):
        print(file=sys.stderr)
    return rows


def _rates(t: dict, one: dict, flops_f: float, w: int) -> dict:
    fb = t["fwd_bwd"]
    # Graph replay is measured against the faster of one device's eager and replayed
    # forward: the fastest one-device run is the bar.
    graphed = (
        {
            "fwd_graph_ms": t["fwd_graph"],
            "eff_fwd_graph": min(one["fwd"], one["fwd_graph"]) / (w * t["fwd_graph"]),
        }
        if "fwd_graph" in t
        else {}
    )
    return graphed | {
        "fwd_ms": t["fwd"],
        "fwd_bwd_ms": fb,
        "tflops_fwd": flops_f / (w * t["fwd"] * 1e-3) / 1e12,
        "tflops_fwd_bwd": None if fb is None else 3.5 * flops_f / (w * fb * 1e-3) / 1e12,
        "eff_fwd": one["fwd"] / (w * t["fwd"]),
        "eff_fwd_bwd": None if fb is None else one["fwd_bwd"] / (w * fb),
    }


def _peak_mem_ratio(fwd, dev, ql, kl, vl, p) -> float:
    """Peak memory of one forward (inputs included, and the copy engine's mailbox) over
    the ideal: local q, k, v, out, lse and two KV buffers."""
    from ..runtime import copy_engine

    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fwd()
    torch.cuda.synchronize(dev)
    # The copy engine's mailbox lies outside the caching allocator: counted here.
    extra = torch.cuda.max_memory_allocated(dev) - base + copy_engine.mailbox_bytes(dev)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    inputs = nbytes(ql) + nbytes(kl) + nbytes(vl)
    ideal = (
        inputs
        + nbytes(ql)
        + ql.shape[0] * ql.shape[2] * ql.shape[1] * 4
        + 2 * (nbytes(kl) + nbytes(vl))
    )
    return (inputs + extra) / ideal


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
    from ..tables import format_table

    graphs = any("fwd_graph_ms" in r for r in rows)
    header = HEADER + (("fwd ms graph", "eff fwd graph") if graphs else ())

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    body = []
    for r in rows:
        if "error" in r:
            body.append(
                (
                    r["mask"],
                    r["tokens_per_device"],
                    r["impl"],
                    r["schedule"],
                    r["dispatch"],
                    "error: " + r["error"][:60],
                    *["-"] * (len(header) - 6),
                )
            )
            continue
        body.append(
            (
                r["mask"],
                r["tokens_per_device"],
                r["impl"],
                r["schedule"],
                r["dispatch"],
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


def main(args, printer=print) -> int:
    from ..testing import GlooPool

    device, why = pick_device(args.device)
    printer(why)
    if device is None:
        return 2
    args.device = device
    cfg = {
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
    }
    w = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    backend = "nccl" if args.device == "cuda" else "gloo"
    t0 = time.time()
    with GlooPool(w, backend=backend, timeout_s=600) as pool:
        rows = pool.run(run_rank, w, cfg)[0]
        hw = pool.run(_hardware, 1, args.device)[0]
    text = table(rows)
    printer(text)
    meta = {
        "hardware": hw,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "hamilton-attn " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "world_size": w,
        "config": cfg,
        "seconds": round(time.time() - t0, 1),
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, args.name or f"bench_{hw['kind']}_W{w}")
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(
                f"# hamilton-attn bench\n\n- hardware: {hw['name']} x {w}\n"
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
        printer(f"wrote {stem}.json and {stem}.md")
    if args.plot:
        plot_efficiency(rows, args.plot)
        printer(f"wrote {args.plot}")
    return 0 if all("error" not in r for r in rows if r["impl"] == "hamilton-attn") else 1


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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
