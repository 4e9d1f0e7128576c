"""The bench's baseline: PyTorch's ``context_parallel`` (its ring over cuDNN SDPA, load
balancing on for causal, off for full), timed like our schedules."""

from __future__ import annotations

from .bench_timing import rates, time_fn

IMPL = "torch context_parallel"


def torch_cp_inputs(q, k, v, g):
    """q, k, v, dout (bshd) as PyTorch's context_parallel takes them: bhsd, with K and V
    repeated up to q's heads (head h of q reads KV head h // (Hq/Hk), as in GQA)."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v, g))


def _cp_options():
    """PyTorch's context-parallel options object (its module moved between releases)."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _cp_options,
        )
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options
    return _cp_options


def _torch_cp_times(ctx, dev, q, k, v, g, causal: bool, warmup, repeats, inner=1, fwd_only=False):
    """PyTorch's context_parallel (cuDNN), or None where it does not apply. Its ring
    passes K and V to scaled_dot_product_attention without ``enable_gqa``, so with
    fewer KV heads than query heads they are repeated up to the query heads first (the
    row says so): it then moves Hq/Hk times our KV bytes. Its load-balance option is
    set for the run and put back after."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = _cp_options()
    balance0 = options.enable_load_balance
    options.enable_load_balance = causal
    try:
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
    finally:
        options.enable_load_balance = balance0


def _torch_cp_schedule(hq: int, hk: int) -> str:
    """The baseline's schedule column: its ring, and the KV repeat when Hk < Hq."""
    return "ring (torch)" if hq == hk else f"ring (torch, KV heads x{hq // hk})"


def torch_cp_row(ctx, dev, cfg: dict, base: dict, mname: str, qkvg, one: dict, flops_f):
    """The baseline's row for mask ``mname`` (causal or full; W > 1) and its times (None
    where it did not run: off CUDA, or an error, which the row carries)."""
    hq, hk = cfg["heads"], cfg["kv_heads"]

    def failed(error: str) -> dict:
        return dict(
            base,
            impl=IMPL,
            schedule=_torch_cp_schedule(hq, hk),
            dispatch="-",
            error=error,
        )

    if dev.type != "cuda":
        # Its ring handles the GPU attention ops only (flash, efficient, cuDNN); on CPU
        # it fails inside DTensor dispatch.
        return failed(f"n/a on {dev.type}: context_parallel has GPU attention ops only"), None
    try:
        tcp = _torch_cp_times(
            ctx,
            dev,
            *qkvg,
            mname == "causal",
            cfg["warmup"],
            cfg["repeats"],
            cfg.get("inner", 1),
            cfg.get("fwd_only", False),
        )
        row = dict(
            base,
            impl=IMPL,
            schedule=_torch_cp_schedule(hq, hk),
            dispatch="load-balanced" if mname == "causal" else "contiguous",
            **rates(tcp, one, flops_f, ctx.world_size),
            peak_mem_ratio=None,
            kv_heads_repeated=hq // hk,
        )
    except Exception as err:  # noqa: BLE001 - reported in the table
        return failed(f"{type(err).__name__}: {str(err)[:120]}"), None
    return row, tcp
