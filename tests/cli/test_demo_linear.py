"""The demo's linear-attention rows (``hamilton_attn/cli/demo_linear.py``): every kind
and exchange strategy passes its bound against the float64 recurrence on gloo ranks,
and a wrong result fails it."""

from __future__ import annotations

import pytest
import torch

from hamilton_attn.cli import demo_linear
from hamilton_attn.cli.demo import HEADER, demo_masks


def _rows(ctx, seqlen, dtype_name, break_ring):
    from hamilton_attn.linear import scan

    hop = scan._hop
    if break_ring:  # a ring that forgets the incoming state: a wrong result to catch
        scan._hop = lambda send, dst, like, src, plan: torch.zeros_like(like)
    dtype = getattr(torch, dtype_name)
    try:
        return demo_linear.linear_rows(ctx, demo_masks(seqlen)["docs"], torch.device("cpu"),
                                       dtype, 1e-5 if dtype == torch.float32 else 1e-9)  # fmt: skip
    finally:
        scan._hop = hop  # the pool's ranks serve later tests


@pytest.mark.parametrize("w, dtype", [(2, "float32"), (3, "float64")])
def test_every_linear_row_passes(pool, w, dtype):
    per_rank = pool.run(_rows, w, 131, dtype, False)
    rows = per_rank[0]
    assert all(r == [] for r in per_rank[1:])
    assert len(rows) == len(demo_linear.KINDS) * len(demo_linear.STRATEGIES)
    assert all(len(r) == len(HEADER) and r[-1] == "PASS" for r in rows), rows


def test_a_wrong_exchange_fails(pool):
    rows = pool.run(_rows, 2, 131, "float32", True)[0]
    assert {r[0] for r in rows if r[-1] == "FAIL"} == {"linear (ring)"}, rows
