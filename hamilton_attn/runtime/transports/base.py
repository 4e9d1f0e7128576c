"""What the executor asks of a transport: start one step's messages as one batch."""

from __future__ import annotations

from typing import Protocol

import torch

from ..comm import PendingOps


class Transport(Protocol):
    """Moves a step's messages between the ranks of one group on one device.

    ``start`` begins sends ``(tensor, peer)`` and receives ``(buffer, peer)``, peers being
    ranks in the group, and returns at once; ``wait()`` on its answer makes what arrived
    usable (on CUDA by ordering the current stream after the transfers, without blocking
    the host). Both sides of a pair must list their messages between them in one order.
    """

    def start(
        self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]
    ) -> PendingOps: ...
