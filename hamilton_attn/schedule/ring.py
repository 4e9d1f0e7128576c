"""``ring``: every rank's KV travels one way round the ring, one hop per step."""

from .ir import PieceId, Routing, Transfer, split_even


def ring(world_size: int, local_len: int) -> Routing:
    w = world_size
    steps = tuple(
        tuple(Transfer(PieceId((r - s) % w), r, (r + 1) % w) for r in range(w))
        for s in range(w - 1)
    )
    return Routing(
        "ring", w, split_even(local_len, 1), steps, grad_route="follow", buffer_budget=2.0
    )
