"""Linear attention with a scalar decay per head (or per token and head), exact on one
device and under context parallelism (``docs/linear_attention.md``).

* :func:`linear_attention`: the primitive (``api``), with its local backends behind one
  interface (``chunked``: plain torch; ``fla_backend``: flash-linear-attention on CUDA);
* named forms (``helpers``): :func:`retention` (:func:`retnet_decay`), :func:`simple_gla`,
  :func:`ssd` (Mamba2);
* the cross-rank state exchange (``scan``) and its pricing (``cost``:
  :func:`exchange_cost`, :func:`choose_strategy`); argument checks (``checks``).
"""

from .api import LocalFn, linear_attention, local_backend
from .cost import ExchangeCost, choose_strategy, exchange_cost
from .helpers import retention, retnet_decay, simple_gla, ssd

__all__ = [
    "ExchangeCost",
    "LocalFn",
    "choose_strategy",
    "exchange_cost",
    "linear_attention",
    "local_backend",
    "retention",
    "retnet_decay",
    "simple_gla",
    "ssd",
]
