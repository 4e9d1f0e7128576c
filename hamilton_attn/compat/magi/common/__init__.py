"""MagiAttention's ``magi_attention.common``: ranges and the mask kinds."""

from .enum import AttnMaskType, AttnOverlapMode
from .range import AttnRange
from .ranges import AttnRanges

__all__ = ["AttnMaskType", "AttnOverlapMode", "AttnRange", "AttnRanges"]
