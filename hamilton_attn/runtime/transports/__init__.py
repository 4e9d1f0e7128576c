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


def transport_for(
    group, global_ranks: tuple[int, ...], device: torch.device, widest: int
) -> Transport:
    """The transport of ``group`` on ``device`` for one call whose largest message is
    ``widest`` bytes: the copy engine where :func:`.copy_engine.mailbox` gives one, else
    NCCL/gloo. Every rank of the group must ask at the same point of its work (the first
    set-up of a mailbox, and its growth, are collective): the executor asks at the start
    of every call, since the configured transport may change between calls."""
    if device.type == "cuda" and len(global_ranks) > 1:
        mb = copy_engine.mailbox(group, device, widest, default_timeout().total_seconds())
        if mb is not None:
            return CopyEngineTransport(mb)
    return NcclTransport(group, global_ranks)


__all__ = ["CopyEngineTransport", "NcclTransport", "Transport", "transport_for"]
