"""Helper of tests/runtime/test_edge_process.py (not a test): run a small context-parallel
script ``--runs`` times on ``--world-size`` gloo ranks and count runs in which some
rank did not exit 0. Ranks are forked from this process (torch imported once) and leave
through a normal interpreter exit, atexit handlers and C++ destructors included, which
is where an abort at exit happens. Prints one line per bad run and ``bad runs: N of R``;
exits 0 whatever N is (the test reads the count)."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import hamilton_attn as ha


def rank_main(rank: int, world: int, listener: socket.socket, timeout_s: float) -> None:
    torch.set_num_threads(1)
    port = listener.getsockname()[1]
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = dist.TCPStore(
            "127.0.0.1", port, world, True, timeout, master_listen_fd=listener.detach()
        )
    else:
        listener.close()
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    s = 96
    for schedule, dispatch in (("ring", "zigzag"), ("groupcast", "minheap")):
        # The world group passed explicitly, as scripts do: the plan keeps a reference.
        p = ha.plan(ha.Mask.causal(s), dist.group.WORLD, schedule=schedule, dispatch=dispatch)
        gen = torch.Generator().manual_seed(0)
        x = [torch.randn(1, s, h, 16, generator=gen).requires_grad_() for h in (4, 2, 2)]
        out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in x), p), p)
        out.sum().backward()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    a = ap.parse_args()
    # One single-process call first: the ranks inherit every module the call imports
    # lazily instead of importing it each (seconds per run on a loaded 2-core machine).
    # No backward here: where CUDA exists, autograd's device threads would then refuse
    # to run in the forked ranks.
    with torch.no_grad():
        ha.calc_attn(*(torch.randn(1, 8, h, 16) for h in (4, 2, 2)), ha.plan(ha.Mask.causal(8)))
    # What the ranks inherit stays out of their collections (exit included) and their
    # pages unwritten: half the CPU time per run. Their own objects are collected as usual.
    gc.freeze()
    bad = 0
    for run in range(a.runs):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        pids = []
        for r in range(a.world_size):
            pid = os.fork()
            if pid == 0:
                try:
                    rank_main(r, a.world_size, listener, a.timeout)
                except BaseException:  # noqa: BLE001 - any failure is a bad exit
                    import traceback

                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(3)
                # Leave through the interpreter's normal exit, as a script does.
                raise SystemExit(0)
            pids.append(pid)
        listener.close()
        deadline = time.monotonic() + a.timeout
        codes = []
        for pid in pids:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    codes.append("timeout")
                    break
                time.sleep(0.02)
        if any(c != 0 for c in codes):
            bad += 1
            print(f"run {run}: exit codes {codes}", flush=True)
    print(f"bad runs: {bad} of {a.runs}", flush=True)


if __name__ == "__main__":
    main()
