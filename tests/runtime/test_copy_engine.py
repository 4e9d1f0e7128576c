"""The copy-engine transfer protocol (hamilton_attn.runtime.transports.copy_engine), run on
CPU tensors by a simulator that executes each rank's per-peer streams in a random
interleaving, with the signal pads' binary-semaphore semantics. It must deliver every
message intact, never deadlock, and leave every slot with its one FREE token (so the
next call, or a CUDA graph replay, starts from the same state)."""

from __future__ import annotations

import random
from collections import defaultdict, deque

import pytest
import torch

from hamilton_attn import config
from hamilton_attn.runtime.transports import copy_engine
from hamilton_attn.runtime.transports.copy_engine import _FREE, SLOTS, Mailbox


def _mailboxes(world: int, slot: int) -> list[Mailbox]:
    bufs = [torch.zeros((world - 1) * SLOTS * slot, dtype=torch.uint8) for _ in range(world)]
    out = []
    for r in range(world):
        mb = object.__new__(Mailbox)
        mb.rank, mb.world, mb.slot, mb.buf = r, world, slot, bufs[r]
        mb.peer_buf = {p: bufs[p] for p in range(world) if p != r}
        mb.sent, mb.got = defaultdict(int), defaultdict(int)
        out.append(mb)
    return out


def _initial_pads(world: int) -> list[dict]:
    # Receiver r gave each sender p one FREE token per slot: p's pad [FREE + j][r] = 1.
    pads = [defaultdict(int) for _ in range(world)]
    for r in range(world):
        for p in range(world):
            if p != r:
                for j in range(SLOTS):
                    pads[p][(_FREE + j, r)] = 1
    return pads


def _drain(queues: dict, pads: list[dict], rng: random.Random) -> None:
    """Run every queue ``(rank, kind, peer) -> deque of ops`` to the end, one runnable
    head op at a time, chosen at random; fails on a deadlock."""
    while any(queues.values()):
        ready = []
        for key, q in queues.items():
            if not q:
                continue
            rank, op = key[0], q[0]
            if op[0] == "wait":
                ok = pads[rank][(op[2], op[1])] == 1
            elif op[0] == "put":
                ok = pads[op[1]][(op[2], rank)] == 0
            else:
                ok = True
            if ok:
                ready.append(key)
        assert ready, "deadlock: no stream can make progress"
        key = rng.choice(ready)
        rank, op = key[0], queues[key].popleft()
        if op[0] == "wait":
            pads[rank][(op[2], op[1])] = 0
        elif op[0] == "put":
            pads[op[1]][(op[2], rank)] = 1
        else:
            op[1].copy_(op[2])


def _exchange(world, slot, steps, seed, drain_each_step):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    mbs, pads = _mailboxes(world, slot), _initial_pads(world)
    queues: dict = defaultdict(deque)
    checks = []
    for _ in range(steps):
        # Messages of this step per ordered pair, both sides listing them in one order.
        msgs = {}
        for src in range(world):
            for dst in range(world):
                if src != dst and rng.random() < 0.8:
                    sizes = [rng.choice([0, 1, 7, slot - 3, slot, 2 * slot + 5, 3 * slot])]
                    sizes += [rng.randint(1, 3 * slot) for _ in range(rng.randint(0, 2))]
                    msgs[(src, dst)] = [
                        torch.randint(-100, 100, (n,), generator=gen, dtype=torch.int8)
                        for n in sizes
                    ]
        for r in range(world):
            sends = [(t, dst) for (src, dst), ts in msgs.items() if src == r for t in ts]
            recvs = []
            for (src, dst), ts in msgs.items():
                if dst == r:
                    for t in ts:
                        if t.numel() > 4 and rng.random() < 0.3:  # a strided destination
                            buf = torch.zeros(t.numel(), 2, dtype=t.dtype)[:, 0]
                        else:
                            buf = torch.zeros_like(t)
                        recvs.append((buf, src))
                        checks.append((buf, t))
            for (kind, peer), ops in mbs[r].ops(sends, recvs).items():
                queues[(r, kind, peer)].extend(ops)
        if drain_each_step:
            _drain(queues, pads, rng)
    _drain(queues, pads, rng)
    for got, want in checks:
        assert torch.equal(got, want)
    # Every slot holds its one FREE token again, and no READY is left unconsumed.
    live = lambda pad: {k: v for k, v in pad.items() if v}  # noqa: E731
    assert [live(p) for p in pads] == [live(p) for p in _initial_pads(world)]
    for r in range(world):
        for p in range(world):
            if p != r:
                assert mbs[r].sent[p] == mbs[p].got[r]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drain_each_step", [True, False])
def test_protocol_delivers_without_deadlock(world, drain_each_step):
    for seed in range(6):
        _exchange(world, slot=16, steps=4, seed=seed + 100 * world, drain_each_step=drain_each_step)


def test_ops_chunk_messages_and_alternate_slots():
    a, b = _mailboxes(2, slot=8)
    t = torch.arange(20, dtype=torch.uint8)
    ops = a.ops([(t, 1)], [])[("send", 1)]
    kinds = [o[0] for o in ops]
    assert kinds == ["wait", "copy", "put"] * 3  # 20 bytes in slots of 8: 3 chunks
    assert [o[2] for o in ops if o[0] == "put"] == [0, 1, 0]  # READY of slots 0, 1, 0
    assert [o[1].numel() for o in ops if o[0] == "copy"] == [8, 8, 4]
    # Rank 0's chunks land in rank 1's region for sender 0.
    assert all(o[1].data_ptr() < b.buf.data_ptr() + SLOTS * 8 for o in ops if o[0] == "copy")
    assert a.sent[1] == 3 and b.got[0] == 0


def test_mailbox_is_none_off_nccl(monkeypatch):
    # CPU tensors, no process group: NCCL/gloo paths stay; nothing collective happens.
    assert copy_engine.mailbox(None, torch.device("cpu"), 1 << 20, 5.0) is None
    assert config.get().transport == "nccl"  # the default
    assert copy_engine.mailbox(None, torch.device("cuda", 0), 1 << 20, 5.0) is None
    with config.override(transport="ce"):  # still no process group
        assert copy_engine.mailbox(None, torch.device("cuda", 0), 1 << 20, 5.0) is None
    assert copy_engine.mailbox_bytes(torch.device("cpu")) == 0
