"""``direct``: on a complete graph the same link use needs no forwarding. At step t rank r
sends its own piece number (t + d - r) mod (W - 1) straight to each peer d != r; after
W - 1 steps every peer has every piece. dK/dV go straight home."""

from .ir import PieceId, Routing, new_transfer, split_even
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    return w - 1, w - 1, None  # all-to-all


@schedule(budget=2.0, transfers=lambda w, m: w * (w - 1) ** 2, closed_form=_closed_form)
def direct(world_size: int, local_len: int) -> Routing:
    w = world_size
    if w == 1:
        return Routing("direct", 1, split_even(local_len, 1), ())
    n = w - 1
    # One PieceId per piece, shared by its W - 1 transfers (W^3 of them).
    pieces = [[PieceId(r, k) for k in range(n)] for r in range(w)]
    steps = []
    for t in range(n):
        steps.append(
            tuple(
                new_transfer((pieces[r][(t + d - r) % n], r, d))
                for r in range(w)
                for d in range(w)
                if d != r
            )
        )
    return Routing(
        "direct",
        w,
        split_even(local_len, n),
        tuple(steps),
        grad_route="direct",
        comm="a2a",
    )
