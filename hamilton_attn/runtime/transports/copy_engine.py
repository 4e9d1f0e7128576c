"""Transfers between GPUs of one host by copy engine: no SMs, no NCCL kernels.

NCCL moves a KV block with kernels that take SMs from the attention kernel beside them
(on 2 H200s, a cuDNN causal 16K forward ran 0.3 ms slower beside an NCCL send/recv of
256 MiB than beside the same bytes pushed by ``copy_`` into the peer's memory:
``benchmarks/gpu_ce_probe.py``). Here every rank owns a *mailbox* in symmetric memory
(``torch.distributed._symmetric_memory``), :data:`SLOTS` slots for each peer that sends
to it. A message travels in slot-sized chunks:

- the sender's stream for that peer waits for the slot's FREE token, copies the chunk
  into the peer's slot (a peer-to-peer memcpy: the copy engine) and puts READY;
- the receiver's stream for that peer waits for READY, copies the chunk out of its own
  slot into the destination (a local memcpy) and gives the slot's FREE token back.

Tokens are the symmetric-memory signal pads' binary semaphores (``put_signal`` /
``wait_signal``: one-thread kernels with a timeout, so a lost peer raises instead of
hanging). Each slot starts with one FREE token, and every use takes one and gives one
back, so the protocol is the same in eager calls and CUDA-graph replays. Each peer has
its own send and receive stream (high priority), so pairs never wait on each other and
no cycle of waits can form. Sender and receiver see the same message list per pair
(the executor's contract), so both count chunks, and pick slots, alike.

Used by the executor for CUDA tensors on an NCCL group whose ranks are on one host,
with ``HAMILTON_ATTN_TRANSPORT=ce`` (or ``config.override(transport="ce")``); set up once
per group and device, collectively, at the first call (every rank agrees, or all use
NCCL). It gives the same bits as NCCL, but on 2 H200s it was slower than NCCL with the
transfer head start (``benchmarks/gpu_ce_check.py``, ``bench --transports nccl ce``),
so NCCL stays the default."""

from __future__ import annotations

import socket
import zlib
from collections import defaultdict

import torch
import torch.distributed as dist

from ... import config
from ..comm import PendingOps, default_timeout, exchange_status, group_info

# Which transport (``config.Config.transport``): NCCL is the default because it measured
# faster: ring causal forward at 16K tokens per H200, 7.35 ms against 7.62 ms
# (``cp_transports_dense_H200x2_2026-11-30``). A slot is sized to the largest message a
# plan can send, up to ``config.Config.ce_slot_mb``; longer messages go in several chunks.
SLOTS = 2
_READY, _FREE = 0, SLOTS  # signal-pad channels: READY of slot j is j, FREE is SLOTS + j


class Mailbox:
    """One rank's symmetric-memory mailbox for one group on one device."""

    def __init__(self, group, device: torch.device, slot_bytes: int, timeout_s: float):
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world, _ = group_info(group)
        self.device, self.slot = device, slot_bytes
        self.timeout_ms = int(timeout_s * 1000)
        n = (self.world - 1) * SLOTS * slot_bytes
        self.buf = symm_mem.empty(n, dtype=torch.uint8, device=device)
        self.hdl = symm_mem.rendezvous(self.buf, (group or dist.group.WORLD).group_name)
        self.peer_buf = {
            p: self.hdl.get_buffer(p, (n,), torch.uint8)
            for p in range(self.world)
            if p != self.rank
        }
        self.sent: dict[int, int] = defaultdict(int)  # chunks sent to / received from a peer
        self.got: dict[int, int] = defaultdict(int)
        self._streams: dict[tuple[str, int], torch.cuda.Stream] = {}
        with torch.cuda.device(device):
            self.hdl.barrier(channel=_FREE + SLOTS, timeout_ms=self.timeout_ms)
            for p in self.peer_buf:  # one FREE token per slot for each sender
                for j in range(SLOTS):
                    self.hdl.put_signal(p, channel=_FREE + j, timeout_ms=self.timeout_ms)
            self.hdl.barrier(channel=_FREE + SLOTS, timeout_ms=self.timeout_ms)
        torch.cuda.synchronize(device)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def _stream(self, kind: str, peer: int) -> torch.cuda.Stream:
        s = self._streams.get((kind, peer))
        if s is None:
            s = self._streams[(kind, peer)] = torch.cuda.Stream(self.device, priority=-1)
        return s

    def _region(self, src: int, dst: int, j: int) -> int:
        """Byte offset of slot ``j`` for messages from ``src`` in ``dst``'s mailbox (one
        region per other rank)."""
        return ((src - (src > dst)) * SLOTS + j) * self.slot

    def ops(self, sends, recvs) -> dict[tuple[str, int], list[tuple]]:
        """The work of ``sends`` ``[(tensor, peer)]`` and ``recvs`` ``[(buffer, peer)]``
        per stream ``("send" | "recv", peer)``, in order: ``("wait", peer, channel)``,
        ``("put", peer, channel)`` or ``("copy", dst, src)``. Advances the chunk counts."""
        out: dict[tuple[str, int], list[tuple]] = {}
        for t, p in sends:
            lst = out.setdefault(("send", p), [])
            flat = (t if t.is_contiguous() else t.contiguous()).reshape(-1).view(torch.uint8)
            for a in range(0, flat.numel(), self.slot):
                b = min(flat.numel(), a + self.slot)
                j = self.sent[p] % SLOTS
                self.sent[p] += 1
                off = self._region(self.rank, p, j)
                lst += [
                    ("wait", p, _FREE + j),
                    ("copy", self.peer_buf[p][off : off + b - a], flat[a:b]),
                    ("put", p, _READY + j),
                ]
        for t, p in recvs:
            lst = out.setdefault(("recv", p), [])
            dst = t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            flat = dst.reshape(-1).view(torch.uint8)
            for a in range(0, flat.numel(), self.slot):
                b = min(flat.numel(), a + self.slot)
                j = self.got[p] % SLOTS
                self.got[p] += 1
                off = self._region(p, self.rank, j)
                lst += [
                    ("wait", p, _READY + j),
                    ("copy", flat[a:b], self.buf[off : off + b - a]),
                    ("put", p, _FREE + j),
                ]
            if dst is not t:
                lst.append(("copy", t, dst))
        return out

    def start(self, sends, recvs) -> list[torch.cuda.Stream]:
        """Queue ``sends`` and ``recvs`` (see :meth:`ops`) on the per-peer streams, after
        the current stream's work so far (it made the data and the buffers); returns
        the streams the current stream must wait for before reading the buffers."""
        cur = torch.cuda.current_stream(self.device)
        streams = []
        for (kind, p), lst in self.ops(sends, recvs).items():
            s = self._stream(kind, p)
            s.wait_stream(cur)
            streams.append(s)
            with torch.cuda.stream(s):
                for op in lst:
                    if op[0] == "copy":
                        op[1].record_stream(s)  # the allocator must not reuse them early
                        op[2].record_stream(s)
                        op[1].copy_(op[2])
                    elif op[0] == "wait":
                        self.hdl.wait_signal(op[1], channel=op[2], timeout_ms=self.timeout_ms)
                    else:
                        self.hdl.put_signal(op[1], channel=op[2], timeout_ms=self.timeout_ms)
        return streams


_MAILBOXES: dict = {}  # (group name, device index) -> Mailbox, or None where NCCL it is


def _eligible(group, device: torch.device) -> bool:
    if config.get().transport != "ce" or device.type != "cuda" or not dist.is_initialized():
        return False
    if dist.get_backend(group) != "nccl":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return True


def mailbox(group, device: torch.device, slot_bytes: int, timeout_s: float):
    """This group's mailbox on ``device``, set up (collectively) at the first call, or
    None where the copy engine cannot be used. Every rank of the group must call this
    at the same point of its work (the executor does, at the start of each call)."""
    if not _eligible(group, device):
        return None
    g = group or dist.group.WORLD
    key = (g.group_name, device.index)
    slot = max(1 << 20, min(int(config.get().ce_slot_mb * (1 << 20)), slot_bytes))
    slot = -(-slot // (1 << 20)) << 20  # whole MiB
    mb = _MAILBOXES.get(key, False)
    if mb is None or (mb is not False and mb.slot >= slot):
        return mb
    if torch.cuda.is_current_stream_capturing():
        return mb or None  # set up only in eager calls (the warm-up before a capture)
    # Every rank on this host, or NCCL for all: the host name's digest must match.
    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    ok = 1
    made = None
    try:
        hosts = exchange_status([host], g, device)
        if any(h != [host] for h in hosts):
            ok = 0
        else:
            if mb:  # a bigger slot: retire the old mailbox once every rank is idle
                torch.cuda.synchronize(device)
                mb.hdl.barrier(channel=_FREE + SLOTS, timeout_ms=mb.timeout_ms)
            made = Mailbox(g, device, slot, timeout_s)
    except Exception:  # noqa: BLE001 - any failure means NCCL, agreed below
        ok = 0
    agree = exchange_status([ok], g, device)
    if all(a == [1] for a in agree):
        _MAILBOXES[key] = made
        return made
    _MAILBOXES[key] = None
    return None


def mailbox_bytes(device: torch.device) -> int:
    """Bytes of symmetric memory the mailboxes hold on ``device`` (outside PyTorch's
    caching allocator, so ``max_memory_allocated`` does not count them)."""
    return sum(mb.nbytes for (_, idx), mb in _MAILBOXES.items() if mb and idx == device.index)


class CopyEngineTransport:
    """The :class:`~.base.Transport` of a group's mailbox on one device: every message
    goes through :meth:`Mailbox.start`; the current stream waits for the per-peer streams
    when the step's pending operations are waited for."""

    def __init__(self, mb: Mailbox):
        self.mailbox = mb

    def start(self, sends, recvs) -> PendingOps:
        # Read before anything starts, as for NCCL: a bad HAMILTON_ATTN_TIMEOUT must not
        # leave messages half queued.
        timeout = default_timeout()
        streams = self.mailbox.start(sends, recvs)
        return PendingOps([], timeout, device_ordered=True, streams=streams)
