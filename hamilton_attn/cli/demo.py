"""``hamilton-attn demo``: every schedule on W ranks (gloo on CPU, NCCL on GPUs),
checked against the single-device reference, forward and backward; then linear
attention's state exchanges (:mod:`.demo_linear`; ``--schedules linear`` alone)."""

from __future__ import annotations

import time

import torch

from .. import config
from ..masks import Mask
from ..planner.cost import split_name
from ..planner.heads import kv_repeat
from ..schedule import SCHEDULES, spec_of
from ..tables import format_table
from ..testing.oracle import dense_attention, error_bound, max_err, variant_attention_oracle
from ..variants import ReLU, Sigmoid, Softmax
from .demo_linear import H as LINEAR_HEADS
from .demo_linear import K as LINEAR_DIM
from .demo_linear import linear_rows


def demo_masks(seqlen: int) -> dict[str, Mask]:
    # Long-tailed document lengths, seeded: a few long documents and many short ones.
    g = torch.Generator().manual_seed(7)
    lens = []
    left = seqlen
    while left > 0:
        n = min(left, max(1, int(torch.empty(1).exponential_(generator=g).item() * seqlen / 6)))
        lens.append(n)
        left -= n
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return {"causal": Mask.causal(seqlen), "docs": Mask.varlen(cu, causal=True)}


#: Head parallelism beside the schedules: Ulysses (heads over all ranks) and hybrids of
#: heads x context, named as the planner names them (8 ranks: 4 head groups of 2, and 2
#: of 4).
HEAD_CASES = (("ulysses", "zigzag"), ("ring+ulysses2", "zigzag"), ("groupcast+ulysses4", "minheap"))


#: Attention variants beside plain softmax, each under ring/zigzag and groupcast on the
#: packed documents (global indices and the merge of unnormalised sums matter there).
VARIANT_CASES = ("softcap", "alibi", "sink", "sigmoid", "relu", "score_mod")
VARIANT_SCHEDULES = (("ring", "zigzag"), ("groupcast", "minheap"))


def demo_variant(name: str | None, hq: int, seqlen: int, dev, dtype):
    """``(variant, score_mod, params)`` of a demo case, the same on every rank; params:
    the tensors whose gradients are checked (sink, slopes)."""
    if name is None:
        return None, None, []
    if name == "softcap":
        return Softmax(softcap=5.0), None, []
    if name == "alibi":
        slopes = (2.0 ** -torch.arange(1, hq + 1, dtype=dtype, device=dev)).requires_grad_()
        return Softmax(alibi_slopes=slopes), None, [slopes]
    if name == "sink":
        sink = torch.linspace(-1.0, 2.0, hq, dtype=dtype, device=dev).requires_grad_()
        return Softmax(sink=sink), None, [sink]
    if name == "sigmoid":
        return Sigmoid(bias=-float(torch.tensor(seqlen).log())), None, []
    if name == "relu":
        return ReLU(), None, []

    def near(score, b, h, q_idx, kv_idx):  # a head-dependent distance penalty
        return score - 0.002 * (h + 1) * (q_idx - kv_idx).abs()

    return None, near, []


def demo_cases(schedules=None):
    names = [
        (s, d) for s in schedules or sorted(SCHEDULES) if s in SCHEDULES for d in spec_of(s).demo
    ]
    names += [c for c in HEAD_CASES if schedules is None or c[0] in schedules]
    for sched, disp in names:  # each schedule with the dispatches it registered
        for mask_name in ("causal", "docs"):
            yield sched, disp, mask_name, None
    for sched, disp in VARIANT_SCHEDULES:
        if schedules is None or sched in schedules:
            for variant in VARIANT_CASES:
                yield sched, disp, "docs", variant


def run_rank(
    ctx, seqlen: int, device: str, dtype_name: str, heads=(8, 2), head_dim=64, schedules=None
):
    """One rank's share of the demo; returns table rows (on every rank)."""
    import hamilton_attn as ha

    dev = torch.device(device, ctx.rank) if device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    hq, hk = heads
    rows = []
    masks = demo_masks(seqlen)
    for sched, disp, mask_name, vname in demo_cases(schedules):
        mask = masks[mask_name]
        label = mask_name if vname is None else f"{mask_name}+{vname}"
        gen = torch.Generator().manual_seed(1234)
        full = [torch.randn(1, seqlen, h, head_dim, generator=gen) for h in (hq, hk, hk)]
        g = torch.randn(1, seqlen, hq, head_dim, generator=gen).to(dev)
        # The oracle runs on rank 0 only: float64 math on CPU (float32 on GPU), and the
        # same textbook math in the run's dtype to size an honest error bound.
        if ctx.rank == 0:
            odt = torch.float64 if dev.type == "cpu" else torch.float32
            dense = mask.to_dense(dev)
            ref, ref_g = _oracle(full, g, dense, dev, odt, vname, seqlen)
            low, low_g = _oracle(full, g, dense, dev, dtype, vname, seqlen)
            base_f = max_err(low, ref)
            base_b = max(max_err(a, b) for a, b in zip(low_g, ref_g))
        x = [t.to(dev, dtype).requires_grad_() for t in full]
        t0 = time.perf_counter()
        try:
            # The two-level scheme needs a node size: W/2 simulates two nodes.
            opts = {"node_size": ctx.world_size // 2} if sched == "hamilton_2level" else {}
            base, degree = split_name(sched)
            if degree > 1:
                opts["ulysses_degree"] = degree
            p = ha.plan(mask, ctx.group, schedule=base, dispatch=disp, **opts)
        except (ValueError, ImportError) as err:  # no such schedule at this world size
            rows.append(
                (
                    sched,
                    disp,
                    label,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"n/a: {str(err).splitlines()[0][:60]}",
                )
            )
            continue
        plan_ms = (time.perf_counter() - t0) * 1e3
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        var, smod, params = demo_variant(vname, hq, seqlen, dev, torch.float32)
        local = [ha.dispatch(t, p) for t in x]
        out = ha.undispatch(ha.calc_attn(*local, p, variant=var, score_mod=smod), p)
        grads = list(torch.autograd.grad((out.float() * g).sum(), x + params))
        for i in range(len(x), len(grads)):  # each rank holds its rows' share of a param
            grads[i] = grads[i].contiguous()
            torch.distributed.all_reduce(grads[i], group=ctx.group)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        run_ms = (time.perf_counter() - t0) * 1e3
        if ctx.rank != 0:
            continue
        ef = max_err(out, ref)
        eb = max(max_err(a, b) for a, b in zip(grads, ref_g))
        atol = _atol(dtype)
        ok = ef <= error_bound(base_f, atol=atol) and eb <= error_bound(base_b, atol=atol)
        bytes_per_token = 2 * hk * head_dim * x[1].element_size()
        if p.heads is not None:  # the inner schedule moves the head shard: KV heads / u
            u = p.heads.degree
            bytes_per_token = bytes_per_token * kv_repeat(hk, u) // u
        rows.append(
            (
                sched,
                disp,
                label,
                f"{ef:.1e}",
                f"{eb:.1e}",
                p.schedule.num_steps,
                _fmt_bytes(max(p.report.sent_tokens) * bytes_per_token),
                f"{plan_ms:.0f}",
                f"{run_ms:.0f}",
                "PASS" if ok else "FAIL",
            )
        )
    if schedules is None or "linear" in schedules:
        rows += linear_rows(ctx, masks["docs"], dev, dtype, _atol(dtype))
    return rows


def _atol(dtype: torch.dtype) -> float:
    """The absolute slack of the demo's error bounds, by the run's dtype."""
    return 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-3)


def _oracle(full, g, dense, dev, dtype, vname=None, seqlen=0):
    x = [t.to(dev, dtype).requires_grad_() for t in full]
    if vname is None:
        out = dense_attention(*(t.transpose(1, 2) for t in x), dense).transpose(1, 2)
        params = []
    else:
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        var, smod, params = demo_variant(vname, full[0].shape[2], seqlen, dev, pdt)
        q4, k4, v4 = (t.transpose(1, 2) for t in x)
        o4, _ = variant_attention_oracle(
            q4, k4, v4, dense, scale=None, variant=var or Softmax(), score_mod=smod, dtype=pdt
        )
        out = o4.transpose(1, 2).to(dtype)
    grads = torch.autograd.grad(
        (out.float() * g.float()).sum() if dtype != torch.float64 else (out * g.double()).sum(),
        x + params,
    )
    return out, grads


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


HEADER = (
    "schedule",
    "dispatch",
    "mask",
    "err fwd",
    "err bwd",
    "steps",
    "sent/rank (fwd)",
    "plan ms",
    "fwd+bwd ms",
    "result",
)


def main(
    world_size: int | None,
    device: str,
    seqlen: int,
    dtype_name: str | None,
    schedules=None,
    printer=print,
) -> int:
    from ..testing import GlooPool

    if device == "cuda" and not torch.cuda.is_available():
        printer("demo: --device cuda asked, but no GPU is visible")
        return 2
    dtype_name = dtype_name or ("bfloat16" if device == "cuda" else "float32")
    if config.get().torchrun:
        return _main_torchrun(device, seqlen, dtype_name, schedules, printer)
    if world_size is None:
        world_size = torch.cuda.device_count() if device == "cuda" else 8
    printer(
        f"hamilton-attn demo: {world_size} {'NCCL' if device == 'cuda' else 'gloo'} ranks "
        f"on {device}, seqlen {seqlen}, {dtype_name}, heads 8/2 (GQA), head dim 64 "
        f"(linear rows: {LINEAR_HEADS} heads, K = V = {LINEAR_DIM})"
    )
    t0 = time.perf_counter()
    backend = "nccl" if device == "cuda" else "gloo"
    with GlooPool(world_size, backend=backend, timeout_s=300) as pool:
        rows = pool.run(run_rank, world_size, seqlen, device, dtype_name, schedules=schedules)[0]
    return _report(rows, printer, time.perf_counter() - t0)


def _report(rows, printer, seconds: float) -> int:
    printer(format_table(HEADER, rows))
    n_fail = sum(r[-1] == "FAIL" for r in rows)
    n_pass = sum(r[-1] == "PASS" for r in rows)
    skipped = len(rows) - n_fail - n_pass
    printer(
        f"{n_pass} passed, {n_fail} failed"
        + (f", {skipped} skipped" if skipped else "")
        + f" ({seconds:.1f} s)"
    )
    return 0 if n_fail == 0 else 1


def _main_torchrun(device, seqlen, dtype_name, schedules, printer) -> int:
    import torch.distributed as dist

    from ..testing.launcher import RankContext

    cfg = config.get()
    rank, world = cfg.launched_rank, cfg.launched_world_size
    local_rank = rank if cfg.local_rank is None else cfg.local_rank
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    t0 = time.perf_counter()
    ctx = RankContext(rank, world, dist.group.WORLD)
    if device == "cuda":
        ctx.rank = local_rank
    rows = run_rank(ctx, seqlen, device, dtype_name, schedules=schedules)
    code = _report(rows, printer if rank == 0 else (lambda *_: None), time.perf_counter() - t0)
    dist.destroy_process_group()
    return code
