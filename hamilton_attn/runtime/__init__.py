"""The executor and the tensor side of dispatch (the only code, with comm.py, that talks
to torch.distributed)."""

from .executor import ContextParallelFunction
from .shard import dispatch, get_position_ids, undispatch

__all__ = ["ContextParallelFunction", "dispatch", "get_position_ids", "undispatch"]
