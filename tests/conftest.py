"""Fixtures shared by the test modules: one pool of gloo ranks for the whole run.

``pool`` is a :class:`~hamilton_attn.testing.GlooPool` of ``POOL_SIZE`` processes,
started once per pytest run on first use; ``pool.run(fn, W, ...)`` runs on ranks
0..W-1 with ``ctx.group`` the pool's sub-group of those ranks, so tests of every world
size up to ``POOL_SIZE`` share it. Each module starts with the ranks' plan cache empty,
as if the pool were its own.

Modules that need a pool of their own say why and define their own ``pool`` fixture: a
world of exactly W ranks (``DeviceMesh`` spans the whole world), or a short timeout.
"""

from __future__ import annotations

import pytest

from hamilton_attn.testing import GlooPool

#: The largest world a test asks for (test_hamilton_compat's W = 16).
POOL_SIZE = 16
#: Per transfer and per rendezvous; a stuck call fails after this (plus 30 s) instead of
#: hanging the run.
POOL_TIMEOUT_S = 120


def _forget_plans(ctx) -> None:
    from hamilton_attn.planner import plans

    plans._cached_plan.cache_clear()


@pytest.fixture(scope="session")
def shared_pool():
    with GlooPool(POOL_SIZE, timeout_s=POOL_TIMEOUT_S) as p:
        yield p


@pytest.fixture(scope="module")
def pool(shared_pool):
    shared_pool.run(_forget_plans, POOL_SIZE)
    return shared_pool
