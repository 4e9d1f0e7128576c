"""Can KV move between two GPUs by copy engine (no SMs), and does attention run faster
beside it than beside NCCL? (two GPUs, one process each)

Checks, each reported as ok or with its error: symmetric memory (``symm_mem.empty`` +
``rendezvous``) on the NCCL group; a push of 256 MiB into the peer's buffer with
``copy_`` (and whether the profiler shows it as a memcpy or a kernel); the data arriving
intact after ``put_signal``/``wait_signal``; stream memory operations
(``cuStreamWriteValue32``/``cuStreamWaitValue32`` through libcuda) on the signal pads;
the same push and signals captured in a CUDA graph. Times, per rank (CUDA events,
median of 10): the push alone, an NCCL send/recv of the same bytes alone, a local copy
of them, the cuDNN causal 16K forward alone, beside the push and beside NCCL.

    python benchmarks/gpu_ce_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import traceback

import torch


def _try(notes, key, fn):
    try:
        out = fn()
        notes[key] = "ok" if out is None else out
        return True
    except Exception as err:  # noqa: BLE001 - reported
        notes[key] = f"{type(err).__name__}: {err}"[:300] + " | " + traceback.format_exc()[-300:]
        return False


def rank_fn(ctx, tokens):
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    import hamilton_attn as ha
    from hamilton_attn.kernels.sdpa import SdpaKernel

    dev = torch.device("cuda", ctx.rank)
    torch.cuda.set_device(dev)
    peer = 1 - ctx.rank
    notes, times = {}, {}
    gen = torch.Generator().manual_seed(ctx.rank)
    n = 2 * tokens * 32 * 128  # K and V of `tokens` tokens
    send = torch.randn(n, generator=gen).to(dev, torch.bfloat16)
    expect = torch.randn(n, generator=torch.Generator().manual_seed(peer)).to(dev, torch.bfloat16)
    gname = dist.group.WORLD.group_name
    st = {}

    def setup():
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            try:
                symm_mem.enable_symm_mem_for_group(gname)
            except Exception:  # noqa: BLE001 - newer torch needs none
                pass
        st["buf"] = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
        st["hdl"] = symm_mem.rendezvous(st["buf"], gname)
        st["peer_buf"] = st["hdl"].get_buffer(peer, (n,), torch.bfloat16)
        return f"backend {symm_mem.get_backend(dev) if hasattr(symm_mem, 'get_backend') else '?'}"

    if not _try(notes, "symm_mem setup", setup):
        return {"notes": notes, "times": times}
    hdl, buf, peer_buf = st["hdl"], st["buf"], st["peer_buf"]
    side = torch.cuda.Stream(priority=-1)

    def push_and_check():
        buf.zero_()
        hdl.barrier(channel=0, timeout_ms=10000)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            peer_buf.copy_(send)
            hdl.put_signal(peer, channel=1, timeout_ms=10000)
            hdl.wait_signal(peer, channel=1, timeout_ms=10000)
        torch.cuda.current_stream().wait_stream(side)
        ok = torch.equal(buf, expect)
        hdl.barrier(channel=0, timeout_ms=10000)
        if not ok:
            raise AssertionError("pushed data differs")

    _try(notes, "push + put/wait_signal data intact", push_and_check)

    def memcpy_kind():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            peer_buf.copy_(send)
            torch.cuda.synchronize()
        names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
        return ", ".join(sorted(names))[:200]

    _try(notes, "push shows in profiler as", memcpy_kind)
    hdl.barrier(channel=0, timeout_ms=10000)

    def stream_memops():
        lib = ctypes.CDLL("libcuda.so.1")
        wr, wt = lib.cuStreamWriteValue32_v2, lib.cuStreamWaitValue32_v2
        for f in (wr, wt):
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            f.restype = ctypes.c_int
        pads = hdl.signal_pad_ptrs
        slot = 4 * 200  # a uint32 far from the channels used above
        buf.zero_()
        hdl.barrier(channel=0, timeout_ms=10000)
        s = side.cuda_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            peer_buf.copy_(send)
        rc1 = wr(s, pads[peer] + slot, 7, 0)
        rc2 = wt(s, pads[ctx.rank] + slot, 7, 0)  # GEQ
        torch.cuda.current_stream().wait_stream(side)
        ok = torch.equal(buf, expect)
        torch.cuda.synchronize()
        hdl.barrier(channel=0, timeout_ms=10000)
        return f"write rc {rc1}, wait rc {rc2}, data intact {ok}"

    _try(notes, "stream memops", stream_memops)

    def graph_capture():
        buf.zero_()
        torch.cuda.synchronize()
        hdl.barrier(channel=0, timeout_ms=10000)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            peer_buf.copy_(send)
            hdl.put_signal(peer, channel=2, timeout_ms=10000)
            hdl.wait_signal(peer, channel=2, timeout_ms=10000)
        hdl.barrier(channel=0, timeout_ms=10000)
        g.replay()
        torch.cuda.synchronize()
        ok = torch.equal(buf, expect)
        hdl.barrier(channel=0, timeout_ms=10000)
        return f"replay data intact {ok}"

    _try(notes, "graph capture", graph_capture)

    # Timings.
    q, k, v = (
        torch.randn(1, 32, tokens, 128, generator=gen).to(dev, torch.bfloat16) for _ in range(3)
    )
    kern, mask, scale = SdpaKernel(), ha.Mask.causal(tokens), 128**-0.5
    recv = torch.empty_like(send)
    local = torch.empty_like(send)

    def nccl():
        ops = [
            dist.P2POp(dist.isend, send, peer, dist.group.WORLD),
            dist.P2POp(dist.irecv, recv, peer, dist.group.WORLD),
        ]
        return dist.batch_isend_irecv(ops)

    def timed(body, reps=10):
        out = []
        for i in range(reps + 3):
            torch.cuda.synchronize()
            hdl.barrier(channel=0, timeout_ms=10000)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ka, kb = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            body(ka, kb)
            b.record()
            torch.cuda.synchronize()
            if i >= 3:
                out.append((a.elapsed_time(b), ka.elapsed_time(kb)))
        return [round(statistics.median(x), 3) for x in zip(*out)]

    def fwd_alone(ka, kb):
        ka.record()
        kern.forward(q, k, v, mask, scale)
        kb.record()

    def push_alone(ka, kb):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ka.record()
            peer_buf.copy_(send)
            kb.record()
        torch.cuda.current_stream().wait_stream(side)

    def local_copy(ka, kb):
        ka.record()
        local.copy_(send)
        kb.record()

    def nccl_alone(ka, kb):
        ka.record()
        for w in nccl():
            w.wait()
        kb.record()

    def fwd_beside_push(ka, kb):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            peer_buf.copy_(send)
        ka.record()
        kern.forward(q, k, v, mask, scale)
        kb.record()
        torch.cuda.current_stream().wait_stream(side)

    def fwd_beside_nccl(ka, kb):
        works = nccl()
        from hamilton_attn.runtime import comm

        comm._head_start(dev)
        ka.record()
        kern.forward(q, k, v, mask, scale)
        kb.record()
        for w in works:
            w.wait()

    for name, body in [
        ("fwd alone", fwd_alone),
        ("push alone", push_alone),
        ("local copy", local_copy),
        ("nccl alone", nccl_alone),
        ("fwd beside push", fwd_beside_push),
        ("fwd beside nccl", fwd_beside_nccl),
        ("fwd alone (again)", fwd_alone),
    ]:
        _try(times, name, lambda body=body: timed(body))
    return {"notes": notes, "times": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--name", default="gpu_ce_probe", help="file stem of the .md / .json under --out"
    )
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    from hamilton_attn.cli.bench import run_two_gpus, save_probe

    res = run_two_gpus(rank_fn, args.tokens)
    lines = ["times: [whole ms, inner events ms]"]
    for r, item in enumerate(res):
        for sec in ("notes", "times"):
            for key, val in item[sec].items():
                lines.append(f"rank {r} {key}: {val}")
    text = "\n".join(lines)
    print(text)
    save_probe(args.out, args.name, "Copy-engine KV transfer probe", text, {"ranks": res})


if __name__ == "__main__":
    main()
