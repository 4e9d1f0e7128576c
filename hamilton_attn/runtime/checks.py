"""Cross-rank agreement before any transfer: the status exchanges of ``calc_attn``
(``api._check``) and of the gathers (``shard._agree``), which differ only in what the
status vector holds. A status row starts ``[problem flag, *plan.fingerprint, ...]``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .comm import exchange_status, exchange_timeout


def agreed_before(plan, seen: set, sig, problem: str | None, may_skip: bool = True) -> bool:
    """True when no exchange is due for signature ``sig``: one rank, ``check="never"``,
    or ``check="first"`` with ``sig`` in ``seen`` (the signatures agreed before; only
    where ``may_skip``). Raises ValueError for this rank's ``problem`` where its peers
    will not exchange (one rank, ``check="never"``, or ``check="first"`` once anything
    was agreed: peers that agreed on this signature before skip the exchange, so a rank
    with a problem must not wait in it; it raises at once and they time out)."""
    if plan.world_size == 1 or plan.check == "never":
        if problem:
            raise ValueError(problem)
        return True
    if plan.check == "first" and may_skip and seen:
        if problem:
            raise ValueError(problem)
        if sig in seen:
            return True
    return False


def exchange_rows(
    plan,
    mine: list[int],
    problem: str | None,
    device: torch.device,
    who: str,
    options: str,
    describe: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Every rank's status row (``mine`` on this rank), after raising ValueError on every
    rank for a problem anywhere (this rank's ``problem`` as itself, a peer's as ``who:
    rank(s) [...] of the group got invalid inputs``, or, where ``describe`` reads the
    argument a bad rank's row names, ``ARG: invalid on rank(s) [...] of the group (who)``)
    or for plans that differ across the group (``options`` names the options that may
    differ). Every rank must pass a row of one length (gloo aborts otherwise)."""
    everyone = exchange_status(mine, plan.group, device, exchange_timeout())
    if problem:
        raise ValueError(problem)
    bad = [r for r, row in enumerate(everyone) if row[0]]
    if bad:
        arg = describe(everyone[bad[0]]) if describe else ""
        if arg:
            raise ValueError(f"{arg}: invalid on rank(s) {bad} of the group ({who})")
        raise ValueError(f"{who}: rank(s) {bad} of the group got invalid inputs")
    if any(row[1:3] != mine[1:3] for row in everyone):
        raise ValueError(
            "plan: the ranks of the group hold different plans (built for another group "
            f"or mask, or with other options{options})"
        )
    return everyone
