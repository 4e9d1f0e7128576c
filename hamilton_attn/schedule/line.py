"""``line``: bidirectional waves on an open line (no wrap-around link), as on a mesh of
processing elements. Rank i's KV reaches rank j at step |i - j|; every rank folds every
other rank's chunk exactly once in W - 1 steps. dK/dV travel back the way KV came."""

from .ir import PieceId, Routing, Transfer, split_even
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    east = [(r, r + 1, L) for r in range(w - 1)]
    return 1, 2, east + [(r + 1, r, L) for r in range(w - 1)]


@schedule(budget=4.0, closed_form=_closed_form, steps="waves", demo=("zigzag",))
def line(world_size: int, local_len: int) -> Routing:
    w = world_size
    steps = []
    for s in range(w - 1):
        step = []
        for r in range(w):
            east, west = r - s, r + s  # owners of the waves passing through r now
            if r + 1 < w and east >= 0:
                step.append(Transfer(PieceId(east), r, r + 1))
            if r - 1 >= 0 and west < w:
                step.append(Transfer(PieceId(west), r, r - 1))
        steps.append(tuple(step))
    return Routing("line", w, split_even(local_len, 1), tuple(steps), grad_route="reverse")
