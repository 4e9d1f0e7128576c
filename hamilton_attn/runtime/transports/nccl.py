"""torch.distributed's point-to-point batches as a transport: NCCL on CUDA, gloo on CPU
(:func:`..comm.start_p2p`: timeouts, lost peers, the transfer head start)."""

from __future__ import annotations

from ..comm import PendingOps, start_p2p


class NcclTransport:
    """The :class:`~.base.Transport` of a process group: each step is one
    ``batch_isend_irecv``."""

    def __init__(self, group, global_ranks: tuple[int, ...]):
        self.group, self.global_ranks = group, global_ranks

    def start(self, sends, recvs) -> PendingOps:
        return start_p2p(sends, recvs, self.group, self.global_ranks)
