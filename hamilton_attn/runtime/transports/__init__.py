"""How a call's messages move between ranks, behind one interface (:class:`.base.Transport`):
:mod:`.nccl` (torch.distributed's point-to-point batches: NCCL on GPU, gloo on CPU, the
default) and :mod:`.copy_engine` (CUDA peer copies through symmetric memory, opt-in with
``config.Config.transport == "ce"``). :func:`transport_for` picks one per call."""

from __future__ import annotations

import torch

from ..comm import default_timeout
from . import copy_engine
from .base import Transport
from .copy_engine import CopyEngineTransport
from .nccl import NcclTransport


def _whole(group, global_ranks: tuple[int, ...]) -> bool:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD)) == tuple(global_ranks)


def transport_for(
    group, global_ranks: tuple[int, ...], device: torch.device, widest: int
) -> Transport:
    """The transport of ``group`` on ``device`` for one call whose largest message is
    ``widest`` bytes: the copy engine where :func:`.copy_engine.mailbox` gives one, else
    NCCL/gloo. Every rank of the group must ask at the same point of its work (the first
    set-up of a mailbox, and its growth, are collective): the executor asks at the start
    of every call, since the configured transport may change between calls."""
    # The copy engine's mailbox spans its whole group: a plan over part of it (the
    # context-parallel groups of a head-parallel plan) moves its messages with NCCL.
    if device.type == "cuda" and len(global_ranks) > 1 and _whole(group, global_ranks):
        mb = copy_engine.mailbox(group, device, widest, default_timeout().total_seconds())
        if mb is not None:
            return CopyEngineTransport(mb)
    return NcclTransport(group, global_ranks)


__all__ = ["CopyEngineTransport", "NcclTransport", "Transport", "transport_for"]
