"""Per-step compute and transfer times of context-parallel calls.

    with hamilton_attn.runtime.profile.Profiler() as prof:
        out = calc_attn(q, k, v, plan); out.backward(g)
    print(prof.summary())
    prof.export_chrome_trace("trace.json")   # chrome://tracing or ui.perfetto.dev

On GPU the times come from CUDA events on the compute stream: ``compute`` spans the
step's kernel work, ``transfer`` spans from the transfers' start until the compute
stream may use what arrived (so a transfer hidden under compute ends with it, and
``exposed`` is the part that was not hidden). On CPU both are wall clock. When no
profiler is active the executor pays one ``is None`` test per step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

_ACTIVE: list[Profiler] = []


def current() -> Profiler | None:
    return _ACTIVE[-1] if _ACTIVE else None


class _Clock:
    """A point in time: a CUDA event on GPU, perf_counter on CPU."""

    __slots__ = ("event", "wall")

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
            self.wall = None
        else:
            self.event = None
            self.wall = time.perf_counter()

    def ms_since(self, other: _Clock) -> float:
        if self.event is not None:
            return other.event.elapsed_time(self.event)
        return (self.wall - other.wall) * 1e3


def _span(name: str, cat: str, pid: int, tid: int, ts: float, dur: float, args: dict) -> dict:
    """A Chrome trace "complete" event (times in microseconds)."""
    return {
        "name": name,
        "cat": cat,
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


@dataclass
class StepRecord:
    call: int
    phase: str  # fwd | bwd
    step: int
    rank: int
    blocks: int
    bytes_sent: int
    bytes_recv: int
    t_start: _Clock
    t_compute_end: _Clock | None = None
    t_transfer_end: _Clock | None = None

    def times(self, origin: _Clock) -> dict:
        begin = self.t_start.ms_since(origin)
        comp = self.t_compute_end.ms_since(self.t_start) if self.t_compute_end else 0.0
        comm = self.t_transfer_end.ms_since(self.t_start) if self.t_transfer_end else 0.0
        return {
            "begin_ms": begin,
            "compute_ms": comp,
            "transfer_ms": comm,
            "exposed_ms": max(0.0, comm - comp),
        }


@dataclass
class Profiler:
    """Collects a StepRecord per executor step while active (a context manager)."""

    records: list[StepRecord] = field(default_factory=list)
    _origin: _Clock | None = None
    _calls: int = 0
    _device: torch.device | None = None

    def __enter__(self) -> Profiler:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def new_call(self) -> int:
        self._calls += 1
        return self._calls

    def step(
        self,
        call: int,
        phase: str,
        step: int,
        rank: int,
        device: torch.device,
        blocks: int,
        bytes_sent: int,
        bytes_recv: int,
    ) -> StepRecord:
        if self._origin is None:
            self._origin = _Clock(device)
            self._device = device
        rec = StepRecord(call, phase, step, rank, blocks, bytes_sent, bytes_recv, _Clock(device))
        self.records.append(rec)
        return rec

    def rows(self) -> list[dict]:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        out = []
        for r in self.records:
            row = {
                "call": r.call,
                "phase": r.phase,
                "step": r.step,
                "rank": r.rank,
                "blocks": r.blocks,
                "bytes_sent": r.bytes_sent,
                "bytes_recv": r.bytes_recv,
            }
            row.update(r.times(self._origin))
            out.append(row)
        return out

    def totals(self) -> dict[str, dict]:
        """Per phase: summed compute, transfer, exposed transfer (ms), bytes, overlap."""
        agg: dict[str, dict] = {}
        for row in self.rows():
            a = agg.setdefault(
                row["phase"],
                {
                    "compute_ms": 0.0,
                    "transfer_ms": 0.0,
                    "exposed_ms": 0.0,
                    "bytes_sent": 0,
                    "steps": 0,
                },
            )
            for key in ("compute_ms", "transfer_ms", "exposed_ms", "bytes_sent"):
                a[key] += row[key]
            a["steps"] += 1
        for a in agg.values():
            hidden = a["transfer_ms"] - a["exposed_ms"]
            a["overlap"] = hidden / a["transfer_ms"] if a["transfer_ms"] > 0 else 1.0
        return agg

    def summary(self) -> str:
        from ..tables import format_table

        rows = [
            (
                r["call"],
                r["phase"],
                r["step"],
                r["rank"],
                r["blocks"],
                f"{r['compute_ms']:.3f}",
                f"{r['transfer_ms']:.3f}",
                f"{r['exposed_ms']:.3f}",
                f"{r['bytes_sent'] / 2**20:.2f}",
            )
            for r in self.rows()
        ]
        table = format_table(
            (
                "call",
                "phase",
                "step",
                "rank",
                "blocks",
                "compute ms",
                "transfer ms",
                "exposed ms",
                "sent MiB",
            ),
            rows,
        )
        tot = "\n".join(
            f"{ph}: compute {a['compute_ms']:.3f} ms, transfer {a['transfer_ms']:.3f}"
            f" ms, exposed {a['exposed_ms']:.3f} ms, overlap {a['overlap']:.0%}"
            for ph, a in self.totals().items()
        )
        return table + "\n" + tot

    def export_chrome_trace(self, path: str, *, rank_offset: int = 0) -> None:
        """Write a Chrome / Perfetto trace: one process per rank, threads for compute and
        transfer."""
        events = []
        for row in self.rows():
            pid = row["rank"] + rank_offset
            name = f"{row['phase']} step {row['step']}"
            ts = row["begin_ms"] * 1e3
            args = {"blocks": row["blocks"]}
            events.append(_span(name, "compute", pid, 0, ts, row["compute_ms"] * 1e3, args))
            if row["transfer_ms"] > 0:
                args = {"bytes_sent": row["bytes_sent"], "exposed_ms": row["exposed_ms"]}
                events.append(_span(name, "transfer", pid, 1, ts, row["transfer_ms"] * 1e3, args))
        for pid in {e["pid"] for e in events}:
            for tid, thread in enumerate(("compute", "transfer")):
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": pid,
                        "tid": tid,
                        "args": {"name": thread},
                    }
                )
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
