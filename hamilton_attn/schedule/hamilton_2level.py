"""``hamilton_2level``: on u nodes of m devices, m Hamiltonian cycles over all m*u devices
built from each node's Walecki paths joined across nodes, so each device makes m-1
intra-node sends and exactly one inter-node send per step (one NIC per device busy,
all NVLink/NVSwitch ports busy). Each rank's KV is cut into m pieces, piece c rides
cycle c."""

from .hamilton import cycle_routing
from .ir import Routing
from .registry import schedule


def _closed_form(w: int, L: float, m: int):
    flows = [(r, (r // m) * m + d, L / m) for r in range(w) for d in range(m) if d != r % m]
    return m, m, flows + [(r, (r + m) % w, L / m) for r in range(w)]  # one inter-node arc


@schedule(
    budget=2.0,
    transfers=lambda w, m: w * (m or w) * (w - 1),
    closed_form=_closed_form,
    node_size=True,
)
def hamilton_2level(world_size: int, local_len: int, node_size: int | None = None) -> Routing:
    """``node_size``: the devices per node (the planner passes ``LOCAL_WORLD_SIZE``
    where the caller gives none)."""
    m = node_size
    if m is None:
        raise ValueError(
            "node_size: hamilton_2level needs the devices per node (pass "
            "node_size=, or run under torchrun so LOCAL_WORLD_SIZE is set)"
        )
    if world_size % m or world_size // m < 2:
        raise ValueError(
            f"node_size: {m} must divide the world size {world_size} into at least 2 nodes"
        )
    from ..topology import two_level_cycles

    cycles = two_level_cycles(world_size // m, m)
    return cycle_routing("hamilton_2level", world_size, local_len, cycles, comm="p2p")
