"""The cost model's per-rank timelines (``cost.drift_total``): each rank starts a step
when it ended the previous one, and a step's transfer is done its flow time after the
later of its two ends started it; the pass ends with the last rank. Hand-worked cases,
and the properties it must keep on real schedules: never above the lock-step sum, never
below the busiest rank's own compute, equal to lock step where every rank's work per step
is the same (ring on causal zigzag)."""

from __future__ import annotations

import pytest

from hamilton_attn.planner.cost import drift_total, simulate


def test_ranks_drift_apart_without_transfers():
    # rank 0 computes 1 then 3, rank 1 3 then 1: 4 each (lock step: 3 + 3 = 6)
    steps = [([1.0, 3.0], [], []), ([3.0, 1.0], [], [])]
    assert drift_total(2, steps) == pytest.approx(4.0)


def test_a_transfer_waits_for_its_later_end():
    # step 0: rank 0 sends to rank 1 (0.5 s); rank 1 computes 3 s, rank 0 1 s
    # step 1: rank 1 sends to rank 0 (0.5 s), which rank 1 starts at 3: rank 0 waits
    steps = [
        ([1.0, 3.0], [(0, 1, 1e6)], [0.5]),
        ([2.0, 0.0], [(1, 0, 1e6)], [0.5]),
    ]
    assert drift_total(2, steps) == pytest.approx(3.5)
    # a slow transfer dominates both of its ends
    assert drift_total(2, [([1.0, 1.0], [(0, 1, 1e6)], [5.0])]) == pytest.approx(5.0)


@pytest.mark.parametrize("seqlen", [65536, 524288])
@pytest.mark.parametrize("name", ["hamilton", "direct", "ring", "allgather"])
def test_timelines_sit_between_the_busiest_rank_and_lock_step(name, seqlen):
    p = simulate(name, "full_mesh:8", seqlen, mask="causal")
    assert p.drift is not None and p.exact
    busiest = p.compute_s
    assert busiest - 1e-12 <= p.fwd_s <= p.lockstep_fwd_s + 1e-12
    assert p.exposed_s >= -1e-12
    if name in ("ring", "allgather"):  # the same work on every rank at every step
        assert p.fwd_s == pytest.approx(p.lockstep_fwd_s)


def test_hamilton_gains_from_its_ranks_drifting():
    """Hamilton's steps give ranks unequal areas (zigzag pieces), which lock step charged
    as each step's slowest rank: at 512K causal on full_mesh:8 its forward was 587 ms
    against ring's 476; with timelines it is the busiest rank's compute (within the
    fused call's rate of ring), and at 64K it beats ring by more than 2x. (With the
    fused rates fitted per band, lock step charges 536 ms, timelines 457, ring 476.)"""
    ham = simulate("hamilton", "full_mesh:8", 524288, mask="causal")
    ring = simulate("ring", "full_mesh:8", 524288, mask="causal")
    assert ham.lockstep_fwd_s > 1.12 * ring.fwd_s
    assert ham.lockstep_fwd_s > 1.15 * ham.fwd_s
    assert ham.fwd_s < 1.08 * ring.fwd_s
    assert ham.fwd_s == pytest.approx(ham.compute_s, rel=1e-6)
    ham64 = simulate("hamilton", "full_mesh:8", 65536, mask="causal")
    ring64 = simulate("ring", "full_mesh:8", 65536, mask="causal")
    assert ham64.fwd_s < 0.5 * ring64.fwd_s


def test_head_parallel_timelines_keep_their_all_to_alls():
    """Ulysses and hybrids add their exposed all-to-alls to the inner schedule's
    timelines (before: the timelines replaced the step sums and dropped them)."""
    from hamilton_attn.planner.heads_cost import simulate_heads
    from hamilton_attn.planner.model import Shapes

    for name, degree in (("ring", 8), ("ring", 2), ("direct", 2)):
        p = simulate_heads(name, "full_mesh:8", 65536, degree, shapes=Shapes(heads=32))
        a2a_f = sum(st.time_s for st in p.steps[:2])
        a2a_b = sum(st.bwd_time_s for st in p.steps[:2])
        assert a2a_f > 0 and a2a_b > 0
        assert p.fwd_s >= a2a_f + p.compute_s - 1e-12
        assert p.bwd_s >= a2a_b
        assert p.fwd_s <= p.lockstep_fwd_s + 1e-12


def test_a_schedules_own_backward_is_timed_from_its_steps():
    """A schedule carrying its own backward (``backward="reverse"``) runs those steps in
    the backward, not the forward's again: with backward steps that compute and move
    nothing, the predicted backward is 0 (before, it was the forward's steps' backward)."""
    import dataclasses

    from hamilton_attn.planner.cluster import parse_topology
    from hamilton_attn.planner.cost import predict_schedule
    from hamilton_attn.planner.model import BlockStat
    from hamilton_attn.schedule.ir import Step

    sched = simulate("ring", "full_mesh:4", 16384, mask="causal").meta["schedule_obj"]
    cluster = parse_topology("full_mesh:4")

    def stat(r, piece):
        return BlockStat(1 << 20, 1024, 1024)

    kw = dict(local_len=4096, seqlen=16384)
    plain = predict_schedule(sched, cluster, stat, **kw)
    idle = tuple(Step(compute=((),) * 4) for _ in sched.steps)
    own = predict_schedule(dataclasses.replace(sched, backward_steps=idle), cluster, stat, **kw)
    assert plain.bwd_s > 0 and own.bwd_s == 0.0
    assert own.fwd_s == plain.fwd_s
