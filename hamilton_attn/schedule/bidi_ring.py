"""``bidi_ring``: half of each rank's KV goes clockwise, half counter-clockwise, so both
directions of every ring link carry half a shard per step."""

from .ir import PieceId, Routing, Transfer, split_even
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    if w == 2:
        return 2, 2, [(0, 1, L), (1, 0, L)]
    flows = [(r, (r + 1) % w, L / 2) for r in range(w)]
    return 2, 2, flows + [(r, (r - 1) % w, L / 2) for r in range(w)]


@schedule(budget=2.0, closed_form=_closed_form)
def bidi_ring(world_size: int, local_len: int) -> Routing:
    w = world_size
    steps = []
    for s in range(w - 1):
        step = []
        for r in range(w):
            step.append(Transfer(PieceId((r - s) % w, 0), r, (r + 1) % w))
            if w > 2:
                step.append(Transfer(PieceId((r + s) % w, 1), r, (r - 1) % w))
            else:  # two ranks have one link: both halves cross it in one step
                step.append(Transfer(PieceId(r, 1), r, 1 - r)) if s == 0 else None
        steps.append(tuple(t for t in step if t is not None))
    return Routing(
        "bidi_ring",
        w,
        split_even(local_len, 2),
        tuple(steps),
        grad_route="follow",
    )
