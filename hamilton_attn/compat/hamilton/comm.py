"""The Hamilton Attention seed's communication helpers, by its names: ``RingComm`` (send
to the next rank, receive from the previous) and ``A2AComm`` (all-to-all), on the
core's point-to-point batches and timeouts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...runtime.comm import PendingOps, default_timeout, group_info, start_p2p
from .checks import seed_group


class RingComm:
    """Send to the next rank of the group and receive from the previous one."""

    def __init__(self, process_group=None):
        process_group = seed_group(process_group)
        self.rank, self.world_size, self._ranks = group_info(process_group)
        self._group = process_group
        self.send_rank = (self.rank + 1) % self.world_size
        self.recv_rank = (self.rank - 1) % self.world_size
        self._sends: list = []
        self._recvs: list = []
        self._pending: PendingOps | None = None

    def send_recv(self, to_send: torch.Tensor, recv_tensor: torch.Tensor | None = None):
        """Queue sending ``to_send`` forward and receiving its like from behind; returns the
        receive buffer (valid after ``commit()`` and ``wait()``)."""
        recv = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        self._sends.append((to_send.contiguous(), self.send_rank))
        self._recvs.append((recv, self.recv_rank))
        return recv

    def send_recv_kv(self, k, v, k_buffer=None, v_buffer=None):
        return self.send_recv(k, k_buffer), self.send_recv(v, v_buffer)

    def commit(self) -> None:
        if self._pending is not None:
            raise RuntimeError("RingComm.commit: wait() for the previous batch first")
        self._pending = start_p2p(self._sends, self._recvs, self._group, self._ranks)
        self._sends, self._recvs = [], []

    def wait(self) -> None:
        if self._pending is None:
            raise RuntimeError("RingComm.wait: nothing was committed")
        self._pending.wait()
        self._pending = None


class A2AComm:
    """All-to-all: ``send_tensors[i]`` goes to rank i, ``recv_tensors[i]`` comes from rank i."""

    def __init__(self, process_group=None):
        process_group = seed_group(process_group)
        self.rank, self.world_size, self._ranks = group_info(process_group)
        self._group = process_group

    def all_to_all(
        self,
        send_tensors: list[torch.Tensor],
        recv_tensors: list[torch.Tensor],
        async_op: bool = False,
    ):
        if len(send_tensors) != self.world_size or len(recv_tensors) != self.world_size:
            raise ValueError(
                f"send_tensors, recv_tensors: expected {self.world_size} each, got "
                f"{len(send_tensors)}, {len(recv_tensors)}"
            )
        if dist.get_backend(self._group) == "gloo":
            # gloo has no all_to_all for lists; a P2P batch does the same exchange.
            sends = [(t.contiguous(), i) for i, t in enumerate(send_tensors) if i != self.rank]
            recvs = [(t, i) for i, t in enumerate(recv_tensors) if i != self.rank]
            recv_tensors[self.rank].copy_(send_tensors[self.rank])
            pending = start_p2p(sends, recvs, self._group, self._ranks)
        else:
            timeout = default_timeout()
            work = dist.all_to_all(
                recv_tensors,
                [t.contiguous() for t in send_tensors],
                group=self._group,
                async_op=True,
            )
            pending = PendingOps([work], timeout, device_ordered=True)
        if async_op:
            return pending
        pending.wait()
        return None
