"""Helpers to run and check context-parallel code on CPU processes (gloo)."""

from .launcher import GlooPool, RankContext

__all__ = ["GlooPool", "RankContext"]
