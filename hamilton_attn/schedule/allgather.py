"""``allgather``: every rank's KV goes to every other rank in the first step (PyTorch's
default context parallel, ring-flash-attention's llama3 variant); compute on the local
KV overlaps the gather. Memory: the whole KV, W - 1 shards received. dK/dV return
directly to their owners (a reduce-scatter)."""

from .ir import PieceId, Routing, Transfer, split_even
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    return 1, w - 1, None  # all-to-all, in step 0


@schedule(
    budget=lambda w: max(w - 1, 1),
    closed_form=_closed_form,
    steps="gather",
    demo=("contiguous",),
)
def allgather(world_size: int, local_len: int) -> Routing:
    w = world_size
    step0 = tuple(Transfer(PieceId(o), o, d) for o in range(w) for d in range(w) if d != o)
    return Routing(
        "allgather",
        w,
        split_even(local_len, 1),
        (step0,) if w > 1 else (),
        grad_route="direct",
    )
