"""A pool of gloo processes on 127.0.0.1, started once and reused for many calls.

``GlooPool(n)`` starts n processes, each in a gloo process group of size n, with
sub-groups of the first W ranks for every W <= n. ``pool.run(fn, W, *args)`` runs
``fn(ctx, *args)`` on ranks 0..W-1 (``ctx.group`` is their group) and returns the
results in rank order; an exception on any rank is raised here with every failing
rank's traceback. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta

from .. import config


@dataclass
class RankContext:
    rank: int
    world_size: int
    group: object


def _loopback_listener() -> socket.socket:
    """A socket listening on 127.0.0.1 at a port the kernel picks, for the rendezvous
    store. Handed over as it is, so the port is never released between choosing and
    using it (another process could take a port that was probed and closed), and the
    store never binds all interfaces, as TCPStore does when it opens its own socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def _loopback_ifname() -> str | None:
    """Name of the loopback interface (``lo`` on Linux), for gloo's own listeners."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _init(rank: int, n: int, listener, timeout: timedelta, backend: str, **kwargs):
    """Join the pool's process group. Rank 0 serves the store on the pool's loopback
    socket (it takes the descriptor over); the others connect to it."""
    import torch.distributed as dist

    port = listener.getsockname()[1]
    if rank == 0:
        fd = listener.detach()  # the store closes it when it goes
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            n,
            True,
            timeout,
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    else:
        listener.close()  # a fork's copy: rank 0 alone serves it
        store = dist.TCPStore("127.0.0.1", port, n, False, timeout)
    kwargs.update(store=store, rank=rank, world_size=n, timeout=timeout)
    dist.init_process_group(backend, **kwargs)


def _worker(
    rank: int,
    n: int,
    listener,
    tasks,
    results,
    timeout_s: float,
    threads: int,
    backend: str = "gloo",
):
    os.environ["HAMILTON_ATTN_TIMEOUT"] = str(timeout_s)
    if backend == "gloo" and config.get().gloo_socket_ifname is None:
        # gloo listens on the address the host name resolves to, which need not be
        # loopback; every rank of the pool is on this host.
        ifname = _loopback_ifname()
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        _init(rank, n, listener, timedelta(seconds=timeout_s), backend, **kwargs)
        groups = {
            w: (dist.group.WORLD if w == n else dist.new_group(list(range(w))))
            for w in range(1, n + 1)
        }
        results.put((rank, "ready", None))
    except Exception:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, w, args, kwargs = task
        if rank >= w:
            continue
        try:
            value = fn(RankContext(rank, w, groups[w]), *args, **kwargs)
            results.put((rank, "ok", (call_id, value)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((rank, "error", (call_id, traceback.format_exc())))
    dist.destroy_process_group()


class GlooPool:
    """See the module docstring; ``backend="nccl"`` puts rank r on GPU r instead."""

    def __init__(
        self, world_size: int, *, timeout_s: float = 120.0, threads: int = 1, backend: str = "gloo"
    ):
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        # fork: workers inherit the imported torch (seconds saved per process); the parent
        # never initialises torch.distributed before this. CUDA cannot survive a fork, and
        # where CUDA exists autograd runs device threads that refuse a forked child once
        # the parent ran a backward: spawn there.
        import torch

        use_fork = hasattr(os, "fork") and backend == "gloo" and not torch.cuda.is_available()
        ctx = mp.get_context("fork" if use_fork else "spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        listener = _loopback_listener()
        self.port = listener.getsockname()[1]
        self._procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                args=(
                    r,
                    world_size,
                    listener,
                    self._tasks[r],
                    self._results,
                    timeout_s,
                    threads,
                    backend,
                ),
            )
            for r in range(world_size)
        ]
        try:
            for p in self._procs:
                p.start()
        finally:
            # The workers hold their own copies (fork) or duplicates (spawn) by now.
            listener.close()
        self._calls = 0
        ready = self._collect(range(world_size), kind="ready", call_id=None)
        del ready

    def _collect(self, ranks, *, kind: str, call_id):
        want = set(ranks)
        got: dict[int, object] = {}
        errors: dict[int, str] = {}
        while want - set(got) - set(errors):
            try:
                rank, status, payload = self._results.get(timeout=self.timeout_s + 30)
            except queue.Empty:
                missing = sorted(want - set(got) - set(errors))
                self.close()
                raise TimeoutError(
                    f"GlooPool: ranks {missing} did not answer within {self.timeout_s + 30:.0f} s"
                ) from None
            if status == "ready" and kind == "ready":
                got[rank] = None
            elif status == "ok":
                cid, value = payload
                if cid == call_id:
                    got[rank] = value
            elif status == "error":
                if isinstance(payload, tuple):
                    cid, tb = payload
                    if cid != call_id:
                        continue
                else:
                    tb = payload
                errors[rank] = tb
        if errors:
            first = min(errors)
            detail = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
            raise RankError(
                f"ranks {sorted(errors)} failed; first: "
                f"{errors[first].strip().splitlines()[-1]}\n{detail}",
                errors,
            )
        return [got[r] for r in sorted(want)]

    def run(self, fn, world_size: int | None = None, *args, **kwargs) -> list:
        w = self.world_size if world_size is None else world_size
        if not 1 <= w <= self.world_size:
            raise ValueError(f"world_size: expected 1..{self.world_size}, got {w}")
        self._calls += 1
        for q in self._tasks:
            q.put((self._calls, fn, w, args, kwargs))
        return self._collect(range(w), kind="ok", call_id=self._calls)

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> traceback text."""

    def __init__(self, message: str, errors: dict[int, str]):
        super().__init__(message)
        self.errors = errors
