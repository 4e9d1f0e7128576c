"""Thin wrappers with the names users of other libraries already call (no own logic)."""
