"""Edge cases of the distributed surface (issue #14, items 5-9, 11, 12): cross-rank
checks of scale bits and of the whole plan, torchrun without a process group, the
transfer timeout's validation, undispatch shapes, a lost peer, a non-member rank.

Workers (``_w_*``) run on the ranks of one 2-process :class:`GlooPool` started for this
module with a short timeout (nothing may hang); a rank that must die runs in its own
interpreter instead, so the pool survives. Each worker call builds a plan over a
sequence length not used by another test, so its first call is a plan's first call.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hamilton_attn as ha
from hamilton_attn.runtime import comm
from hamilton_attn.testing import GlooPool

POOL_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def pool():
    """A pool of its own, not the shared one: a short timeout, and a worker that creates a
    group over the whole world (``dist.new_group``), which must be these 2 ranks."""
    with GlooPool(2, timeout_s=POOL_TIMEOUT_S) as p:
        yield p


def _inputs(s: int, seed: int, hq: int = 2, hk: int = 2, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, h, d, generator=gen, dtype=torch.float64) for h in (hq, hk, hk)]


def _outcome(fn):
    try:
        fn()
        return ("ok", "")
    except Exception as e:  # noqa: BLE001 - reported to the test
        return (type(e).__name__, str(e))


# -- 5. the scale is compared bit for bit ---------------------------------------------------


def _w_scales(ctx, s, seed, scale0, scale1):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    q, k, v = (ha.dispatch(t, p) for t in _inputs(s, seed))
    scale = scale1 if ctx.rank == 1 else scale0
    return _outcome(lambda: ha.calc_attn(q, k, v, p, scale=scale))


def test_scales_differing_below_a_millionth_raise_on_every_rank(pool):
    base = random.uniform(0.1, 0.5)
    # 0.25 against 0.2500009 agreed as int(scale * 1e6); one ulp apart must not either.
    for other in (base + 9e-7, math.nextafter(base, 1.0)):
        per_rank = pool.run(_w_scales, 2, 40, random.randrange(1 << 30), base, other)
        for rank, (typ, msg) in enumerate(per_rank):
            assert typ == "ValueError", (rank, other - base, typ, msg)
            assert "scale differ" in msg, (rank, msg)
    same = pool.run(_w_scales, 2, 42, random.randrange(1 << 30), base, base)
    assert same == [("ok", "")] * 2, same


# -- 6. the fingerprint covers the final schedule and placement -----------------------------

# (rank 0's options, rank 1's options): the same mask and group, another schedule.
OPTION_PAIRS = {
    "backward": ({"schedule": "ring"}, {"schedule": "ring", "backward": "reverse"}),
    "degree": ({"schedule": "groupcast", "degree": 1}, {"schedule": "groupcast", "degree": 2}),
    "chunk": ({"schedule": "groupcast", "chunk": 4}, {"schedule": "groupcast", "chunk": 8}),
    "node_size": ({"schedule": "groupcast"}, {"schedule": "groupcast", "node_size": 1}),
    "check": ({"schedule": "ring"}, {"schedule": "ring", "check": "always"}),
    "backend": ({"schedule": "ring"}, {"schedule": "ring", "backend": "sdpa"}),
}


@pytest.mark.parametrize("name", list(OPTION_PAIRS))
def test_fingerprint_differs_when_an_option_changes_the_plan(name):
    a, b = OPTION_PAIRS[name]
    mask = ha.Mask.causal(128)
    a, b = {"backend": "reference", **a}, {"backend": "reference", **b}
    fps = {
        (r, side): ha.plan(
            mask, ha.SimulatedGroup(2, rank=r), dispatch="zigzag", **opts
        ).fingerprint
        for r in (0, 1)
        for side, opts in (("a", a), ("b", b))
    }
    assert fps[(0, "a")] == fps[(1, "a")] and fps[(0, "b")] == fps[(1, "b")], fps
    assert fps[(0, "a")] != fps[(0, "b")], fps
    fp = fps[(0, "a")]
    assert len(fp) == 2 and all(-(2**63) <= x < 2**63 for x in fp), fp


def _w_options(ctx, s, seed, name):
    opts = OPTION_PAIRS[name][ctx.rank]
    opts = {"backend": "reference", **opts}
    p = ha.plan(ha.Mask.causal(s), ctx.group, dispatch="zigzag", **opts)
    q, k, v = (ha.dispatch(t.requires_grad_(), p) for t in _inputs(s, seed))

    def call():  # twice, forward and backward: where the plans part ways
        for _ in range(2):
            ha.calc_attn(q, k, v, p).sum().backward()

    return _outcome(call)


@pytest.mark.parametrize("name", list(OPTION_PAIRS))
def test_plans_differing_in_an_option_raise_on_every_rank(pool, name):
    s = 64 * (1 + list(OPTION_PAIRS).index(name))
    per_rank = pool.run(_w_options, 2, s, random.randrange(1 << 30), name)
    for rank, (typ, msg) in enumerate(per_rank):
        assert typ == "ValueError" and "different plans" in msg, (rank, typ, msg)


def test_fingerprint_is_computed_once():
    p = ha.plan(ha.Mask.causal(96), ha.SimulatedGroup(3), schedule="hamilton")
    first = p.fingerprint
    assert p.fingerprint is first


# -- 7. torchrun's environment without a process group -------------------------------------


def test_torchrun_environment_without_a_process_group_refuses_to_plan(monkeypatch):
    assert not dist.is_initialized()
    s = random.randrange(20, 60)
    mask = ha.Mask.causal(s)
    ha.plan(mask)  # cached before the environment changes: the cache must not answer
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"group: .*WORLD_SIZE=2.*init_process_group"):
        ha.plan(mask)
    with pytest.raises(ValueError, match=r"group: .*WORLD_SIZE=2"):
        ha.plan(ha.Mask.full(s + 1), schedule="ring")


def test_explicit_single_rank_group_and_one_device_attention_still_work(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = random.randrange(20, 60)
    mask = ha.Mask.causal(s)
    q, k, v = _inputs(s, random.randrange(1 << 30))
    ref = ha.attention(q, k, v, mask, backend="reference")
    p = ha.plan(mask, ha.SimulatedGroup(1), backend="reference")
    assert p.world_size == 1
    out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in (q, k, v)), p), p)
    assert (out - ref).abs().max().item() < 1e-12
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ha.plan(mask).world_size == 1


# -- 8. HAMILTON_ATTN_TIMEOUT is validated --------------------------------------------------


@pytest.mark.parametrize("raw", ["0", "0.0005", "-1", "abc", "", "nan", "inf", "1e15"])
def test_bad_timeout_values_are_refused(monkeypatch, raw):
    monkeypatch.setenv("HAMILTON_ATTN_TIMEOUT", raw)
    with pytest.raises(ValueError, match=r"HAMILTON_ATTN_TIMEOUT: expected .*seconds.*got"):
        comm.default_timeout()


@pytest.mark.parametrize(("raw", "seconds"), [("0.001", 0.001), ("2.5", 2.5), (" 7 ", 7.0)])
def test_good_timeout_values_are_taken(monkeypatch, raw, seconds):
    monkeypatch.setenv("HAMILTON_ATTN_TIMEOUT", raw)
    assert comm.default_timeout().total_seconds() == pytest.approx(seconds)


def _w_bad_timeout(ctx, s, seed, raw):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    q, k, v = (ha.dispatch(t, p) for t in _inputs(s, seed))
    old = os.environ["HAMILTON_ATTN_TIMEOUT"]
    if ctx.rank == 1:
        os.environ["HAMILTON_ATTN_TIMEOUT"] = raw
    try:
        return _outcome(lambda: ha.calc_attn(q, k, v, p))
    finally:
        os.environ["HAMILTON_ATTN_TIMEOUT"] = old


def test_bad_timeout_on_one_rank_raises_before_any_transfer_on_every_rank(pool):
    for i, raw in enumerate(("0", "0.0002", "soon")):
        per_rank = pool.run(_w_bad_timeout, 2, 44 + 2 * i, random.randrange(1 << 30), raw)
        (t0, m0), (t1, m1) = per_rank
        assert t1 == "ValueError" and "HAMILTON_ATTN_TIMEOUT" in m1, (raw, per_rank)
        assert t0 == "ValueError" and re.search(r"rank\(s\) \[1\]", m0), (raw, per_rank)


# -- 9. undispatch checks shapes across ranks before the gather -----------------------------


def _w_undispatch(ctx, s, seed, kind):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    x = _inputs(s, seed)[0]
    x_l = ha.dispatch(x, p)
    if ctx.rank == 1:
        if kind == "heads":
            x_l = torch.cat([x_l, x_l], dim=2)
        elif kind == "dtype":
            x_l = x_l.float()
        elif kind == "ndim":
            x_l = x_l[..., None]
        elif kind == "tokens":
            x_l = x_l[:, :-1]
    first = _outcome(lambda: ha.undispatch(x_l, p))
    good = ha.undispatch(ha.dispatch(x, p), p)  # nothing was half-sent: the group works
    return (*first, bool(torch.equal(good, x)))


@pytest.mark.parametrize("kind", ["heads", "dtype", "ndim", "tokens"])
def test_undispatch_with_other_shapes_on_one_rank_raises_on_every_rank(pool, kind):
    s = 50 + 2 * ["heads", "dtype", "ndim", "tokens"].index(kind)
    per_rank = pool.run(_w_undispatch, 2, s, random.randrange(1 << 30), kind)
    for rank, (typ, msg, recovered) in enumerate(per_rank):
        assert typ == "ValueError", (rank, typ, msg)
        assert msg.startswith("x_local: "), (rank, msg)
        assert recovered, rank
    if kind == "heads":
        msg = per_rank[0][1]
        assert re.search(r"\(1, \d+, 2, 8\)", msg) and re.search(r"\(1, \d+, 4, 8\)", msg), msg


def _w_undispatch_ok(ctx, s, seed):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    x = _inputs(s, seed)[1].requires_grad_()
    y = ha.undispatch(ha.dispatch(x, p) * 2, p)
    y.sum().backward()
    return bool(torch.equal(y, 2 * x)) and bool(torch.equal(x.grad, torch.full_like(x, 2)))


def test_undispatch_and_dispatch_backward_still_match(pool):
    assert pool.run(_w_undispatch_ok, 2, 58, random.randrange(1 << 30)) == [True, True]


# -- 12. a rank outside the plan's group ----------------------------------------------------


def _w_non_member(ctx, s):
    sub = dist.new_group([0])  # every rank of the world takes part in creating it
    return _outcome(lambda: ha.plan(ha.Mask.causal(s), sub, backend="reference"))


def test_non_member_is_told_it_is_not_in_the_plans_group(pool):
    (t0, m0), (t1, m1) = pool.run(_w_non_member, 2, 36)
    assert t0 == "ok", m0
    assert t1 == "ValueError", (t1, m1)
    assert re.search(r"group: .*global rank 1.* not in the plan's group", m1), m1


# -- 11. a peer that dies mid-call ----------------------------------------------------------

_DYING_SCRIPT = r"""
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
import hamilton_attn as ha
import hamilton_attn.runtime.shard as shard
import hamilton_attn.runtime.transports.nccl as nccl
rank, port, where, seed = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2, timeout=timedelta(seconds=60))
gen = torch.Generator().manual_seed(seed)
q, k, v = (torch.randn(1, 48, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
p = ha.plan(ha.Mask.causal(48), schedule="ring", backend="reference")
local = [ha.dispatch(t, p) for t in (q, k, v)]
ha.undispatch(ha.calc_attn(*local, p), p)  # a good call: checks done, connections up
if rank == 1:
    def die(*args, **kwargs):  # mid-call: after this call's checks, before its transfers
        os._exit(3)
    if where == "transfer":
        nccl.start_p2p = die
    else:
        shard.all_gather_tensor = die
        shard.exchange_rows = die
t0 = time.monotonic()
try:
    ha.undispatch(ha.calc_attn(*local, p, scale=None if where == "transfer" else 0.5), p)
    res = {"type": "ok", "msg": ""}
except Exception as e:
    res = {"type": type(e).__name__, "msg": str(e), "mro": [c.__name__ for c in type(e).__mro__]}
res["seconds"] = time.monotonic() - t0
print(json.dumps(res), flush=True)
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("where", ["transfer", "gather"])
def test_a_peer_lost_mid_call_is_reported_as_lost(where):
    timeout_s = 20
    env = {**os.environ, "HAMILTON_ATTN_TIMEOUT": str(timeout_s), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    port, seed = str(_free_port()), str(random.randrange(1 << 30))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DYING_SCRIPT, str(r), port, where, seed],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 3, outs[1][1][-2000:]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    res = json.loads(outs[0][0].strip().splitlines()[-1])
    assert res["type"] == "PeerLostError", res
    assert "ConnectionError" in res["mro"], res
    assert re.search(r"peer .*lost", res["msg"]) and "did not finish within" not in res["msg"]
    assert res["seconds"] < timeout_s / 2, res  # found at once, not at the timeout


# -- review follow-ups: every rank hears of a bad scale, later signatures, plan mismatch ----


def _w_bad_scale_on_one_rank(ctx, s, seed, bad):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    q, k, v = (ha.dispatch(t, p) for t in _inputs(s, seed))
    scale = bad if ctx.rank == 1 else 0.3
    return _outcome(lambda: ha.calc_attn(q, k, v, p, scale=scale))


@pytest.mark.parametrize(("s", "bad"), [(60, math.inf), (62, math.nan), (64, "0.5")])
def test_bad_scale_on_one_rank_raises_on_every_rank(pool, s, bad):
    per_rank = pool.run(_w_bad_scale_on_one_rank, 2, s, random.randrange(1 << 30), bad)
    assert per_rank[1][0] == "ValueError" and per_rank[1][1].startswith("scale: "), per_rank
    assert per_rank[0][0] == "ValueError" and "rank(s) [1]" in per_rank[0][1], per_rank


def test_one_element_tensor_scale_is_taken():
    q, k, v = _inputs(17, random.randrange(1 << 30))
    mask = ha.Mask.causal(17)
    ref = ha.attention(q, k, v, mask, scale=0.7, backend="reference")
    scale = torch.tensor(0.7, dtype=torch.float64)  # float(scale) took it before
    got = ha.attention(q, k, v, mask, scale=scale, backend="reference")
    assert torch.equal(got, ref)


def _w_later_undispatch_heads(ctx, s, seed):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    x = _inputs(s, seed)[0]
    x_l = ha.dispatch(x, p)
    ha.undispatch(x_l, p)  # a good first call: this signature is checked
    if ctx.rank == 1:
        x_l = torch.cat([x_l, x_l], dim=2)
    later = _outcome(lambda: ha.undispatch(x_l, p))
    good = ha.undispatch(ha.dispatch(x, p), p)
    return (*later, bool(torch.equal(good, x)))


def test_later_undispatch_with_other_heads_on_one_rank_raises_on_every_rank(pool):
    # gloo aborted the process ("op.preamble.length <= op.nbytes") when one rank met a
    # new signature after a checked one and its peer gathered straight away.
    per_rank = pool.run(_w_later_undispatch_heads, 2, 66, random.randrange(1 << 30))
    for rank, (typ, msg, recovered) in enumerate(per_rank):
        assert typ == "ValueError" and msg.startswith("x_local: "), (rank, typ, msg)
        assert recovered, rank


def _w_undispatch_other_plan(ctx, s, seed):
    dispatch = "zigzag" if ctx.rank == 0 else "stripe"
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", dispatch=dispatch)
    x = _inputs(s, seed)[0]
    return _outcome(lambda: ha.undispatch(ha.dispatch(x, p), p))


def test_undispatch_with_plans_that_differ_across_ranks_raises_on_every_rank(pool):
    per_rank = pool.run(_w_undispatch_other_plan, 2, 68, random.randrange(1 << 30))
    for rank, (typ, msg) in enumerate(per_rank):
        assert typ == "ValueError" and msg.startswith("plan: "), (rank, typ, msg)


def _w_later_calc_attn_heads(ctx, s, seed):
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", backend="reference")
    q, k, v = (ha.dispatch(t, p) for t in _inputs(s, seed))
    ha.calc_attn(q, k, v, p)  # checked once: check="first" exchanges no more for it
    if ctx.rank == 1:  # a signature of its own: this rank alone enters the exchange
        q, k, v = (torch.cat([t, t], dim=2) for t in (q, k, v))
    return _outcome(lambda: ha.calc_attn(q, k, v, p))


def test_later_call_with_a_new_signature_on_one_rank_stops_without_an_abort():
    # The lone rank's status exchange and its peer's KV transfers carry other gloo tags:
    # both stop at the timeout instead of one aborting on a message larger than its
    # buffer. (A rank that times out closes its connections, so its peer, still waiting,
    # may read "connection closed" first and report a lost peer.)
    with GlooPool(2, timeout_s=6) as small:
        per_rank = small.run(_w_later_calc_attn_heads, 2, 70, random.randrange(1 << 30))
        kinds = [t for t, _ in per_rank]
        assert "TimeoutError" in kinds and set(kinds) <= {"TimeoutError", "PeerLostError"}


def _w_plan_before_and_after_init(ctx, s):
    # As if this plan had been made before init_process_group: one process, cached for
    # group=None. Once the group exists, plan(mask) must plan for it, not hit that entry.
    real = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        before = ha.plan(ha.Mask.causal(s)).world_size
    finally:
        dist.is_initialized = real
    return (before, ha.plan(ha.Mask.causal(s)).world_size)


def test_plan_without_a_group_follows_the_initialised_world(pool):
    assert pool.run(_w_plan_before_and_after_init, 2, 72) == [(1, 2), (1, 2)]
