"""The bench's measurements: the masks it times, and one rank's rounds over every
configuration (one device, PyTorch's context_parallel, each schedule x dispatch x
transport), each round a list of table rows."""

from __future__ import annotations

import statistics
import sys

import torch

from .. import config
from ..masks import Mask
from ..runtime.graphs import cuda_graph
from .bench_timing import rates, time_fn
from .bench_torch_cp import torch_cp_row


def bench_masks(seqlen: int, names) -> dict[str, Mask]:
    out = {}
    for name in names:
        if name == "causal":
            out[name] = Mask.causal(seqlen)
        elif name == "full":
            out[name] = Mask.full(seqlen)
        elif name == "docs":
            out[name] = Mask.varlen(doc_boundaries(seqlen), causal=True)
        elif name == "docs_short":
            out[name] = Mask.varlen(short_doc_boundaries(seqlen), causal=True)
        elif name == "window":
            out[name] = Mask.sliding_window(seqlen, (max(1, seqlen // 8), 0))
        else:
            raise ValueError(
                f"masks: unknown mask {name!r} (causal, full, docs, docs_short, window)"
            )
    return out


def doc_boundaries(seqlen: int, seed: int = 0) -> list[int]:
    """Packed documents with long-tailed (log-normal, sigma 1) lengths, seeded."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < seqlen:
        n = int(torch.empty(1).log_normal_(mean=0.0, std=1.0, generator=g).item() * seqlen / 20)
        cu.append(min(seqlen, cu[-1] + max(16, n)))
    return cu


def short_doc_boundaries(seqlen: int, lo: int = 64, hi: int = 512, seed: int = 0) -> list[int]:
    """Packed short documents, lengths uniform in [lo, hi] (seeded; the last one cut)."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < seqlen:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g).item())
        cu.append(min(seqlen, cu[-1] + n))
    return cu


#: The bench's attention variants (``--variants``): plain softmax, Gemma-2-style logit
#: soft-capping and sigmoid attention (bias -log S, as in the demo).
VARIANT_NAMES = ("softmax", "softcap", "sigmoid")


def bench_variant(name: str, seqlen: int):
    """The variant object of a ``--variants`` name (None: plain softmax)."""
    from ..variants import Sigmoid, Softmax

    if name == "softmax":
        return None
    if name == "softcap":
        return Softmax(softcap=30.0)
    if name == "sigmoid":
        return Sigmoid(bias=-float(torch.tensor(float(seqlen)).log()))
    raise ValueError(f"variants: unknown variant {name!r} ({', '.join(VARIANT_NAMES)})")


# Replay alone: the graph reads the inputs in place and hands out its own outputs, as
# in a model whose layers are all in one graph (no copies in or out).
GRAPH_OPTIONS = dict(static_inputs=True, clone_outputs=False)

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


def _transports(cfg: dict) -> list[str]:
    """The transports to time: those asked, else the one configured."""
    return cfg.get("transports") or [config.get().transport]


def _run_round(ctx, cfg: dict, round_i: int, n_rounds: int) -> list[dict]:
    dev = torch.device("cuda", ctx.rank) if cfg["device"] == "cuda" else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    w = ctx.world_size
    hq, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rows = []
    cases = [(n, mname) for n in cfg["tokens_per_device"] for mname in cfg["masks"]]
    transports = _transports(cfg)
    combos = [
        (sc, bw, disp, tr)
        for sc in cfg["schedules"]
        for bw in cfg["backwards"]
        for disp in cfg["dispatches"]
        for tr in transports
    ]
    backends = cfg.get("backends") or ["auto"]
    variants = cfg.get("variants") or ["softmax"]
    kinds = [(be, va) for be in backends for va in variants]
    per_round = len(cases) * (1 + len(kinds) * (1 + len(combos)))
    total = per_round * n_rounds
    done = per_round * round_i

    def progress(label):
        nonlocal done
        done += 1
        if ctx.rank == 0 and cfg.get("progress", True):
            bar = "#" * (30 * done // total)
            print(f"\r[{bar:<30}] {done}/{total} {label:<40}", end="", file=sys.stderr, flush=True)

    def tag(be, va) -> str:
        """The label suffix of a backend x variant (empty for the default alone)."""
        parts = ([be] if len(backends) > 1 or be != "auto" else []) + (
            [va] if len(variants) > 1 or va != "softmax" else []
        )
        return f" [{', '.join(parts)}]" if parts else ""

    for n, mname in cases:
        s = n * w
        mask = bench_masks(s, [mname])[mname]
        flops_f = 4 * hq * d * mask.area()  # B = 1
        gen = torch.Generator().manual_seed(0)
        qkvg = tuple(
            torch.randn(1, s, h, d, generator=gen).to(dev, dtype) for h in (hq, hk, hk, hq)
        )
        base = {"mask": mname, "tokens_per_device": n, "seqlen": s, "world_size": w}
        tcp = None
        for be, va in kinds:
            variant = bench_variant(va, s)
            kind = dict(backend=be, variant=va)
            sfx = tag(be, va)
            # (a) one device, the whole problem (rank 0; the others wait at the broadcast).
            one = _one_device_times(ctx, dev, cfg, mask, qkvg, backend=be, variant=variant)
            progress(f"{mname} {n}: one device{sfx}")
            rows.append(
                dict(
                    base,
                    impl="one device",
                    schedule="-" + sfx,
                    dispatch="-",
                    **kind,
                    **rates(one, one, flops_f, 1),
                    peak_mem_ratio=None,
                )
            )
            # (b) PyTorch's context parallel (plain softmax, cuDNN), once per mask and
            # length, after the first backend x variant's one device (its efficiency's).
            if (be, va) == kinds[0]:
                if mname in ("causal", "full") and cfg["torch_cp"] and w > 1:
                    row, tcp = torch_cp_row(ctx, dev, cfg, base, mname, qkvg, one, flops_f)
                    rows.append(row)
                progress(f"{mname} {n}: torch context_parallel")
            # (c) our schedules, each transport's under its own setting.
            for sched, bw, disp, tr in combos:
                with config.override(transport=tr):
                    row = _ours_row(
                        ctx, dev, cfg, base, mask, qkvg, sched, bw, disp, one, flops_f,
                        backend=be, variant=variant,
                    )  # fmt: skip
                rows.append(dict(row, **kind))
                row = rows[-1]
                if len(transports) > 1:
                    row["schedule"] += f" [{tr}]"
                row["schedule"] += sfx
                if tcp and "error" not in row and va == "softmax":
                    row["vs_torch_fwd"] = tcp["fwd"] / row["fwd_ms"]
                    if row["fwd_bwd_ms"]:
                        row["vs_torch_fwd_bwd"] = tcp["fwd_bwd"] / row["fwd_bwd_ms"]
                progress(f"{mname} {n}: {sched}/{disp}{sfx}")
        qkvg = None  # free the inputs before the next size
    if ctx.rank == 0 and cfg.get("progress", True):
        print(file=sys.stderr)
    return rows


def _times(attn, qkvg, dev, cfg: dict, group=None):
    """Milliseconds of ``attn(q, k, v)``: forward, forward+backward (None with
    ``fwd_only``) and, if asked, the forward replayed as a CUDA graph (captured outside
    the timed samples, released before returning); with the timed forward itself."""
    q, k, v, g = qkvg

    def fwd():
        attn(q, k, v)

    def fwd_bwd():
        a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
        attn(a, b, c).backward(g)

    kw = dict(warmup=cfg["warmup"], repeats=cfg["repeats"], group=group, inner=cfg.get("inner", 1))
    times = {
        "fwd": time_fn(fwd, dev, **kw),
        "fwd_bwd": None if cfg.get("fwd_only") else time_fn(fwd_bwd, dev, **kw),
    }
    if cfg.get("graphs"):
        graph = cuda_graph(attn, **GRAPH_OPTIONS)
        graph(q, k, v)  # capture outside the timed samples
        times["fwd_graph"] = time_fn(lambda: graph(q, k, v), dev, **kw)
    return times, fwd


def _one_device_times(
    ctx, dev, cfg: dict, mask: Mask, qkvg, backend: str = "auto", variant=None
) -> dict:
    """Milliseconds of ``attention`` over the whole problem on rank 0's device (forward,
    forward+backward, and graph replay if asked), sent to every rank."""
    import torch.distributed as dist

    import hamilton_attn as ha

    one = {}
    if ctx.rank == 0:
        one, _ = _times(
            lambda a, b, c: ha.attention(a, b, c, mask, backend=backend, variant=variant),
            qkvg,
            dev,
            cfg,
        )
    keys = ("fwd", "fwd_bwd", "fwd_graph")
    t1 = torch.tensor([one.get(x) or 0.0 for x in keys], dtype=torch.float64, device=dev)
    dist.broadcast(t1, dist.get_global_rank(ctx.group, 0), group=ctx.group)
    one = {x: t1[i].item() for i, x in enumerate(keys) if x != "fwd_graph" or cfg.get("graphs")}
    if cfg.get("fwd_only"):
        one["fwd_bwd"] = None
    return one


def _ours_row(
    ctx, dev, cfg, base, mask, qkvg, sched, bw, disp, one, flops_f, backend="auto", variant=None
) -> dict:
    """One schedule x backward x dispatch, planned and timed under the transport in
    force: its row (with ``error`` where the planner refuses the combination)."""
    import hamilton_attn as ha

    from ..planner.cost import split_name

    hk, d = cfg["kv_heads"], cfg["head_dim"]
    base_name, degree = split_name(sched)  # "ulysses" and hybrids "ring+ulysses2" too
    opts = {"node_size": cfg["node_size"]} if base_name == "hamilton_2level" else {}
    if degree > 1:
        opts["ulysses_degree"] = degree
    try:
        p = ha.plan(
            mask, ctx.group, schedule=base_name, dispatch=disp, backward=bw, backend=backend,
            **opts,
        )  # fmt: skip
    except ValueError as err:
        return dict(base, impl="hamilton-attn", schedule=sched, dispatch=disp, error=str(err)[:120])
    local = tuple(ha.dispatch(t, p) for t in qkvg)
    ql, kl, vl, _ = local
    ha.calc_attn(ql, kl, vl, p, variant=variant)  # first call: cross-rank checks, warm caches
    ours, fwd = _times(
        lambda a, b, c: ha.calc_attn(a, b, c, p, variant=variant), local, dev, cfg, ctx.group
    )
    mem = _peak_mem_ratio(fwd, dev, ql, kl, vl, p) if dev.type == "cuda" else None
    return dict(
        base,
        impl="hamilton-attn",
        schedule=sched if bw == "replay" else f"{sched} (bwd {bw})",
        dispatch=disp,
        **rates(ours, one, flops_f, ctx.world_size),
        peak_mem_ratio=mem,
        bytes_sent_per_rank=max(p.report.sent_tokens) * 2 * hk * d * qkvg[0].element_size(),
    )


def _peak_mem_ratio(fwd, dev, ql, kl, vl, p) -> float:
    """Peak memory of one forward (inputs included, and the copy engine's mailbox) over
    the ideal: local q, k, v, out, lse and two KV buffers."""
    from ..runtime.transports import copy_engine

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
