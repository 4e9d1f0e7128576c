"""Thin wrappers with the names users of other libraries already call (no own logic):

* :mod:`.magi`: MagiAttention (the seed's API and 1.1's forms, ``compat.magi.v1_1``);
* :mod:`.hamilton`: the Hamilton Attention seed's API;
* :mod:`.ring_flash_attn`: ring-flash-attention's functions and its HF adapter;
* :mod:`.attention_engine`: AttentionEngine's user-defined attention (online functions,
  score_mod, block masks), on our kernels and under any schedule.

``docs/peer_apis.md`` lists every peer function and how ours differs.
"""
