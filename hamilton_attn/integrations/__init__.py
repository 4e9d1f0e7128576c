"""Integrations with model libraries, above the public API (``hamilton_attn.api``).

Each module imports its library on import, so nothing here is imported by
``hamilton_attn`` itself; import the one you use:

* :mod:`hamilton_attn.integrations.transformers`: HuggingFace ``transformers`` models
  trained context-parallel through ``AttentionInterface`` (``docs/transformers.md``).
"""
