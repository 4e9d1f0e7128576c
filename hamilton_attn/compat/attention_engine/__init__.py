"""AttentionEngine's API (``AttentionEngine``, ``OnlineFunc``, ``CustomIO``,
``SymbolScalar``, ``Var``, ``create_block_mask``, ``meta_tensor``) on our core.

Porting a script written for AttentionEngine means changing its import lines::

    from hamilton_attn.compat.attention_engine import (
        AttentionEngine, CustomIO, OnlineFunc, SymbolScalar, Var, create_block_mask,
        meta_tensor,
    )

The user's ``score_mod`` and online methods are evaluated on real tensors (the symbolic
types compute instead of recording, :mod:`.symbolic`). An online function the library
recognises by running it on probes (softmax, the plain weighted sum behind sigmoid /
ReLU attention) runs on :func:`hamilton_attn.attention` (the fused Triton kernel on GPU
where it is built, otherwise cuDNN / flash / flex / the reference) or, with
``context_parallel=plan``, on :func:`hamilton_attn.calc_attn` under any schedule: as a
scale, a softcap, a sigmoid or a relu where the score_mod's exact expression
(:mod:`.forms`) is one, else with the user's score_mod as written. Any other online
function runs on the blockwise path, built from the user's own methods (exact, autograd
backward, slower; context-parallel through an all-gather of keys and values).
``LinearAttentionEngine`` (the seed's linear examples: retention, simple GLA, Mamba2)
runs on :func:`hamilton_attn.linear.linear_attention`, also context-parallel.
``docs/attention_engine.md`` has the details.

Layouts: ``meta_tensor`` descriptions are ``[B, H, S, D]`` (AttentionEngine's order);
``AttentionEngine`` calls take ``q, k, v`` as ``[B, S, H, D]``, as in the seed's quick
start; ``LinearAttentionEngine`` calls take ``[B, H, T, D]``, as in its examples.
"""

from .engine import AttentionEngine
from .linear import LinearAttentionEngine
from .masks import BlockMask, create_block_mask
from .online import OnlineFunc
from .symbolic import CustomIO, SymbolicArray, SymbolicTensor, SymbolScalar, Var, meta_tensor

__all__ = [
    "AttentionEngine",
    "BlockMask",
    "CustomIO",
    "LinearAttentionEngine",
    "OnlineFunc",
    "SymbolScalar",
    "SymbolicArray",
    "SymbolicTensor",
    "Var",
    "create_block_mask",
    "meta_tensor",
]
