"""MagiAttention's ``magi_attention.functional``: the one-device kernel entry."""

from .flex_flash_attn import flex_flash_attn_func

__all__ = ["flex_flash_attn_func"]
