"""``ring``: every rank's KV travels one way round the ring, one hop per step."""

from .ir import PieceId, Routing, Transfer, split_even
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    return 1, 1, [(r, (r + 1) % w, L) for r in range(w)]


@schedule(budget=2.0, closed_form=_closed_form, demo=("zigzag", "contiguous", "balanced_zigzag"))
def ring(world_size: int, local_len: int) -> Routing:
    w = world_size
    steps = tuple(
        tuple(Transfer(PieceId((r - s) % w), r, (r + 1) % w) for r in range(w))
        for s in range(w - 1)
    )
    return Routing("ring", w, split_even(local_len, 1), steps, grad_route="follow")
