"""Helpers to run and check context-parallel code on CPU processes (gloo): a pool of
ranks (:mod:`.launcher`) and float64 oracles with error bounds (:mod:`.oracle`)."""

from .launcher import GlooPool, RankContext

__all__ = ["GlooPool", "RankContext"]
