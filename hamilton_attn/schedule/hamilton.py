"""``hamilton``: each rank's KV is cut into W-1 pieces; piece c travels along the c-th of
W-1 arc-disjoint directed Hamiltonian cycles of the complete graph (Hamilton Attention).
Every step each rank sends W-1 pieces to W-1 different peers, so every link of a fully
connected machine is busy at every step, instead of one link per rank in a ring.
dK/dV follow their pieces round the cycle and come home on its last arc."""

from .ir import PieceId, Routing, new_transfer, split_even
from .registry import schedule


def cycle_routing(
    name: str, world_size: int, local_len: int, cycles: list[list[int]], **kw
) -> Routing:
    """Piece c of every rank travels once round ``cycles[c]`` (each a Hamiltonian cycle)."""
    w = world_size
    succ = [{c[i]: c[(i + 1) % w] for i in range(w)} for c in cycles]
    # At step s, r forwards the piece that left its owner s hops back along the cycle:
    # read off the cycle's order (walking back s hops each time made this O(W^4)).
    pos = [{v: i for i, v in enumerate(c)} for c in cycles]
    pieces = [[PieceId(o, c) for c in range(len(cycles))] for o in range(w)]
    steps = []
    for s in range(w - 1):
        step = []
        for r in range(w):
            for c, cyc in enumerate(cycles):
                owner = cyc[(pos[c][r] - s) % w]
                step.append(new_transfer((pieces[owner][c], r, succ[c][r])))
        steps.append(tuple(step))
    return Routing(
        name,
        w,
        split_even(local_len, len(cycles)),
        tuple(steps),
        grad_route="follow",
        **kw,
    )


def _closed_form(w: int, L: float, m: int):
    return w - 1, w - 1, None  # all-to-all


@schedule(budget=2.0, transfers=lambda w, m: w * (w - 1) ** 2, closed_form=_closed_form)
def hamilton(world_size: int, local_len: int) -> Routing:
    if world_size == 1:
        return Routing("hamilton", 1, split_even(local_len, 1), ())
    from ..topology import hamiltonian_decomposition

    return cycle_routing(
        "hamilton", world_size, local_len, hamiltonian_decomposition(world_size), comm="a2a"
    )
