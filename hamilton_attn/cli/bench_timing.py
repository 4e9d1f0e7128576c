"""Timing for ``hamilton-attn bench`` and the GPU probes: :func:`time_fn` (median of
device-event samples, the ranks' GPUs started together) and :func:`rates` (TF/s and
efficiency from those times)."""

from __future__ import annotations

import statistics
import time

import torch


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


def rates(t: dict, one: dict, flops_f: float, w: int) -> dict:
    """A row's timing fields from times ``t`` (ms: ``fwd``, ``fwd_bwd`` or None, maybe
    ``fwd_graph``) on ``w`` devices, against one device's times ``one``; ``flops_f`` is
    the forward's FLOPs over visible pairs (x3.5 for forward+backward)."""
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
