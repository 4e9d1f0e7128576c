"""MagiAttention's enums (``magi_attention.common.enum``).

``AttnMaskType`` is the core's own (:class:`hamilton_attn.AttnMaskType`): the four
rectangle kinds are the same in both, so a mask ported from MagiAttention needs no
conversion.
"""

from __future__ import annotations

import enum

from ....masks import AttnMaskType

__all__ = ["AttnMaskType", "AttnOverlapMode"]


class AttnOverlapMode(str, enum.Enum):
    """STATIC: the given number of stages; DYNAMIC: the core's cost model chooses."""

    STATIC = "static"
    DYNAMIC = "dynamic"
