"""Forward replay as CUDA graphs: the host cost of a call drops out.

A context-parallel forward on packed documents issues one kernel call per block, a
merge per extra block, and a transfer per step; each costs the host about 0.1 ms, so
with many small documents the host, not the GPU, sets the pace. :func:`cuda_graph`
records a function's whole forward once per input signature (shapes, strides, dtypes,
devices, and the identity of every non-tensor argument such as a plan or mask) and
then replays it: inputs are copied into the graph's own tensors, the graph is launched
as one unit, and outputs are cloned out (or handed over as the graph's own tensors,
overwritten by the next replay, with ``clone_outputs=False``). With
``static_inputs=True`` the graph reads the first call's tensors in place (no copies:
fill them before each call, as a serving loop fills its buffers); a later call must
pass those same tensors.

NCCL transfers are recorded with the kernels (``capture_error_mode="thread_local"``, so
the process group's watchdog thread may keep polling its events while a rank
captures). Every rank of the group must call the graphed function in the same order
with the same signatures, as it must call :func:`calc_attn` itself; a plan's
first-call check across ranks runs during the eager warm-up, so plans with
``check="always"`` (a host exchange per call) cannot be captured.

Forward only: a call with inputs that require grad while grad mode is on raises
ValueError. Off CUDA (a laptop, CI) the function simply runs eagerly, so the same code
runs everywhere. Errors found here (a refused argument) are raised on the calling rank
only, before its replay; its peers then wait in their transfers until NCCL's watchdog
timeout, so call it with the same arguments everywhere, as ``calc_attn`` itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_BY_VALUE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _signature(args) -> tuple:
    """Tensors by shape, strides, dtype and device; numbers, strings and None by value;
    any other object by identity. Tensors nested in containers are refused: the graph
    could not see a new one put in the same container."""
    sig = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            sig.append(("t", tuple(a.shape), a.stride(), a.dtype, a.device))
        elif isinstance(a, _BY_VALUE):
            sig.append(("v", type(a), a))
        elif isinstance(a, (tuple, list, dict)) and _has_tensor(a):
            raise ValueError(
                f"args[{i}]: tensors inside a {type(a).__name__} are not supported; pass "
                "every tensor as an argument of its own"
            )
        else:
            sig.append(("o", id(a)))
    return tuple(sig)


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(v) for v in x)
    return False


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(y, fn) for y in x)
    return x


@dataclass
class _Entry:
    graph: Any
    static_in: list
    static_out: Any
    keep: list = field(default_factory=list)  # non-tensor arguments, kept alive


class CudaGraphed:
    """``fn`` replayed as a CUDA graph per input signature; see :func:`cuda_graph`."""

    def __init__(
        self,
        fn: Callable,
        *,
        warmup: int = 2,
        clone_outputs: bool = True,
        static_inputs: bool = False,
        max_graphs: int = 8,
    ):
        if not callable(fn):
            raise ValueError(f"fn: expected a callable, got {type(fn).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"warmup: expected an int >= 1 (eager calls before capture), got {warmup!r}"
            )
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected an int >= 1, got {max_graphs!r}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self.static_inputs = static_inputs
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()

    @property
    def num_graphs(self) -> int:
        """How many signatures are captured and held."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (and the memory its pool holds)."""
        self._graphs.clear()

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise ValueError("args: expected at least one tensor argument")
        on_cuda = [t.is_cuda for t in tensors]
        if any(on_cuda) and not all(on_cuda):
            raise ValueError("args: tensors must be all on CUDA devices or all off them")
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ValueError(
                "args: cuda_graph replays the forward only; call it under torch.no_grad() "
                "or with tensors that do not require grad"
            )
        key = _signature(args)  # refuses what a graph could not replay, on any device
        if not all(on_cuda):
            with torch.no_grad():
                return self.fn(*args)
        device = tensors[0].device
        entry = self._graphs.get(key)
        if entry is None:
            with torch.cuda.device(device):
                entry = self._capture(args)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:  # least recently used goes
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for i, (dst, a) in enumerate(zip(entry.static_in, args)):
            if isinstance(a, torch.Tensor) and dst.data_ptr() != a.data_ptr():
                if self.static_inputs:
                    raise ValueError(
                        f"args[{i}]: with static_inputs=True, pass the tensors of the "
                        "first call (fill them in place); got another tensor"
                    )
                dst.copy_(a)
        with torch.cuda.device(device):
            entry.graph.replay()
        if self.clone_outputs:
            return _map_tensors(entry.static_out, torch.clone)
        return entry.static_out

    def _capture(self, args) -> _Entry:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        static_in = [
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
            if isinstance(a, torch.Tensor) and not self.static_inputs
            else a
            for a in args
        ]
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy inits, cuDNN plans, first-call checks
                self.fn(*static_in)
        cur.wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        keep = [a for a in args if not isinstance(a, torch.Tensor)]
        return _Entry(graph, static_in, static_out, keep)


def cuda_graph(
    fn: Callable,
    *,
    warmup: int = 2,
    clone_outputs: bool = True,
    static_inputs: bool = False,
    max_graphs: int = 8,
) -> CudaGraphed:
    """``fn`` (say ``lambda q, k, v: calc_attn(q, k, v, plan)``) replayed as CUDA graphs.

    Each new signature of the arguments runs ``fn`` eagerly ``warmup`` times on a side
    stream, then records it; later calls with that signature copy their tensors into
    the recorded inputs and replay. Returns what ``fn`` returns (tensors cloned unless
    ``clone_outputs=False``; they are then overwritten by the next replay). With
    ``static_inputs=True`` no input is copied: the graph reads the first call's tensors,
    and later calls must pass those same tensors. Numbers, strings and None match by
    value, other non-tensor arguments (a plan, a mask) by identity: pass the same object
    each call. At most ``max_graphs`` signatures are held, the least recently used
    dropped first (``reset()`` drops all). Forward only; eager off CUDA.
    """
    return CudaGraphed(
        fn,
        warmup=warmup,
        clone_outputs=clone_outputs,
        static_inputs=static_inputs,
        max_graphs=max_graphs,
    )


__all__ = ["CudaGraphed", "cuda_graph"]
