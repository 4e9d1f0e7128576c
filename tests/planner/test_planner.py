"""The planner: cluster presets, routing, cost model, stats, plan CLI (pure Python)."""

from __future__ import annotations

import argparse
import math
import time

import pytest

from hamilton_attn.cli.plan import add_parser, main, parse_length
from hamilton_attn.planner import auto_schedule, choose_schedule, parse_topology, simulate
from hamilton_attn.planner.cluster import full_mesh
from hamilton_attn.planner.cost import _causal_pairs, block_stat_closed
from hamilton_attn.planner.stats import (
    PRESETS,
    FlashAttentionConfig,
    FlashAttentionStats,
    cp_memory,
    preset_config,
)


@pytest.mark.parametrize(
    "spec, w, kind",
    [
        ("nvswitch:8", 8, "nvswitch"),
        ("full_mesh:8", 8, "full_mesh"),
        ("nodes:2x8", 16, "nodes"),
        ("torus2d:4x4", 16, "torus2d"),
        ("line:8", 8, "line"),
    ],
)
def test_presets_parse(spec, w, kind):
    c = parse_topology(spec)
    assert c.num_devices == w and c.kind == kind
    assert parse_topology(c) is c


@pytest.mark.parametrize("bad", ["ring:8", "nodes:2", "nvswitch:x", "", "torus2d:4"])
def test_bad_topology(bad):
    with pytest.raises(ValueError, match="topology"):
        parse_topology(bad)


def test_routing():
    names = lambda c, s, d: [c.resources[r].name for r in c.route(s, d)]  # noqa: E731
    sw = parse_topology("nvswitch:8")
    assert names(sw, 0, 5) == ["dev0->sw", "sw->dev5"]
    mesh = parse_topology("full_mesh:8")
    assert names(mesh, 3, 6) == ["3->6"]
    nd = parse_topology("nodes:2x8")
    assert names(nd, 1, 2) == ["dev1->sw0", "sw0->dev2"]  # same node: NVSwitch
    assert names(nd, 1, 9) == ["nic1.tx", "nic9.rx"]  # across nodes: NICs
    ln = parse_topology("line:8")
    assert names(ln, 2, 5) == ["2->3", "3->4", "4->5"]
    assert ln.hops(7, 0) == 7
    tor = parse_topology("torus2d:4x4")
    assert tor.hops(0, 3) == 1  # wrap-around
    assert tor.hops(0, 10) == 4  # (0,0) -> (2,2)
    assert max(tor.hops(s, d) for s in range(16) for d in range(16) if s != d) == 4


def test_efficiency_curve_matches_gpu_facts():
    c = parse_topology("nvswitch:2")
    for size, gbs in ((16 << 20, 119), (256 << 20, 282), (1 << 30, 343)):
        assert c.efficiency(size) * 450 == pytest.approx(gbs, rel=1e-6)


def test_ring_on_line_uses_neighbour_links_only():
    c = parse_topology("line:8")
    p = simulate("ring", c, 8 * 4096, mask="full")
    for name in p.link_bytes:
        a, b = (int(x) for x in name.split("->"))
        assert abs(a - b) == 1
    # the schedule built for lines moves every piece one hop per step
    q = simulate("line", c, 8 * 4096, mask="full")
    sched = q.meta["schedule_obj"]
    assert all(abs(t.src - t.dst) == 1 for st in sched.steps for t in st.transfers)
    # ring's wrap-around shard crosses every westward link once per step, so each link
    # still carries one shard per step: on bidirectional links the line costs ring
    # latency (7 hops), not bandwidth
    assert q.max_step_transfer_s == pytest.approx(p.max_step_transfer_s, rel=0.01)
    wrap = c.route(7, 0)
    assert len(wrap) == 7


def test_hamilton_full_mesh_one_seventh_of_ring():
    c = full_mesh(8)
    c.efficiency_curve = ()  # ideal links: compare equal bytes, not message sizes
    ring = simulate("ring", c, 8 * 7 * 4096, mask="full")
    ham = simulate("hamilton", c, 8 * 7 * 4096, mask="full")
    ratio = ham.max_step_transfer_s / ring.max_step_transfer_s
    assert ratio == pytest.approx(1 / 7, rel=0.02)
    # same bytes in all: every shard reaches the 7 other devices once
    assert sum(ham.link_bytes.values()) == pytest.approx(sum(ring.link_bytes.values()))
    # the closed form agrees with the exact path
    fast = simulate("hamilton", c, 8 * 7 * 4096, mask="full", exact=False)
    assert fast.max_step_transfer_s == pytest.approx(ham.max_step_transfer_s, rel=1e-6)


def test_nvswitch_ports_make_hamilton_equal_ring():
    from hamilton_attn.planner.cluster import nvswitch

    c = nvswitch(8)
    c.efficiency_curve = ()
    ring = simulate("ring", c, 8 * 7 * 4096, mask="full")
    ham = simulate("hamilton", c, 8 * 7 * 4096, mask="full")
    assert ham.max_step_transfer_s == pytest.approx(ring.max_step_transfer_s, rel=0.02)


def test_two_level_offloads_nics():
    ring = simulate("ring", "nodes:2x8", 16 * 8192, mask="full")
    two = simulate("hamilton_2level", "nodes:2x8", 16 * 8192, mask="full")
    assert two.max_step_transfer_s < 0.3 * ring.max_step_transfer_s


@pytest.mark.parametrize("schedule", ["ring", "hamilton", "allgather"])
@pytest.mark.parametrize("topo", ["nvswitch:8", "full_mesh:8", "nodes:2x4"])
def test_monotone_in_seqlen(schedule, topo):
    prev = (0.0, 0.0, 0.0)
    for n in (8 * 1024, 8 * 4096, 8 * 16384, 8 * 65536):
        p = simulate(schedule, topo, n)
        cur = (p.fwd_s, p.fwd_bwd_s, p.peak_mem_bytes)
        assert all(a > b for a, b in zip(cur, prev)), (n, cur, prev)
        prev = cur


def test_exact_and_closed_form_agree_on_ring():
    for mask in ("causal", "full"):
        a = simulate("ring", "nvswitch:8", 8 * 16384, mask=mask, exact=True)
        b = simulate("ring", "nvswitch:8", 8 * 16384, mask=mask, exact=False)
        assert b.fwd_s == pytest.approx(a.fwd_s, rel=0.02)
        assert b.fwd_bwd_s == pytest.approx(a.fwd_bwd_s, rel=0.02)


def test_simulate_1024_devices_fast():
    t0 = time.perf_counter()
    for topo in ("nvswitch:1024", "nodes:128x8", "full_mesh:1024", "torus2d:32x32", "line:1024"):
        for s in ("ring", "hamilton", "bidi_ring", "allgather"):
            p = simulate(s, topo, 1024 * 8192)
            assert p.fwd_s > 0 and not p.exact
    simulate("hamilton_2level", "nodes:128x8", 1024 * 8192)
    assert time.perf_counter() - t0 < 5.0


def test_closed_form_areas():
    # causal pairs by brute force
    for qa, qb, ka, kb in [(0, 5, 0, 5), (3, 9, 0, 4), (0, 4, 5, 9), (2, 7, 4, 12)]:
        want = sum(1 for i in range(qa, qb) for j in range(ka, kb) if j <= i)
        assert _causal_pairs(qa, qb, ka, kb) == want
    # zigzag, W=2, 32 tokens: rank 0 holds [0,8)+[24,32); its remote block is half full
    st = block_stat_closed("causal", [(0, 8), (24, 32)], [(8, 16), (16, 24)], 32)
    assert st.area == 8 * 16 and (st.rows, st.cols) == (8, 16) and st.dense
    assert block_stat_closed("causal", [(0, 8)], [(8, 16)], 32).area == 0


def test_calibration_against_h200_bench():
    # ring, causal, zigzag, 2 x 16K tokens: measured 8.13 ms fwd, 37.48 fwd+bwd
    p = simulate("ring", "nvswitch:2", 32768, mask="causal", dispatch="zigzag")
    assert p.fwd_s * 1e3 == pytest.approx(8.13, rel=0.15)
    assert p.fwd_bwd_s * 1e3 == pytest.approx(37.48, rel=0.15)


def test_choose_and_auto_schedule():
    best = choose_schedule(["ring", "hamilton_2level"], "nodes:2x8", 16 * 1024)
    assert best.schedule == "hamilton_2level"  # ring's NIC step cannot hide at 1K/device
    name = auto_schedule("causal", 8, "full_mesh:8")
    assert name in ("ring", "bidi_ring", "allgather", "hamilton", "direct")
    from hamilton_attn.masks import Mask

    assert auto_schedule(Mask.causal(4096), 4) in ("ring", "bidi_ring", "allgather", "direct")
    with pytest.raises(ValueError, match="topology"):
        auto_schedule("causal", 8, "nvswitch:4")


def test_custom_mask_exact_path():
    from hamilton_attn.masks import Mask

    m = Mask.varlen([0, 1000, 1500, 4096], causal=True)
    p = simulate("ring", "nvswitch:4", 4096, mask=m)
    q = simulate("ring", "nvswitch:4", 4096, mask="causal")
    assert p.exact and p.fwd_s < q.fwd_s  # fewer visible pairs, pruned transfers


def test_stats_match_seed():
    c = FlashAttentionConfig(512, 8)
    assert c.d_k == 64
    assert c.sram_usage_per_block() == 49152
    assert c.memory_savings(4096) > 0.9
    assert c.num_kv_passes(4096) == 32 and c.num_q_blocks(4096) == 32
    assert c.num_kv_passes(1000) == 8
    s = FlashAttentionStats.from_config(c, 4096)
    assert (s.sram_usage, s.num_kv_passes, s.num_q_blocks) == (49152, 32, 32)
    assert "memory savings: " in s.summary() and "SRAM usage: 49152 elements" in s.summary()
    expect = {
        "Standard": (128, 128),
        "Large Blocks": (256, 256),
        "Small Blocks": (64, 64),
        "A100 Optimized": (128, 64),
        "H100 Optimized": (128, 128),
    }
    assert PRESETS == expect
    a100 = preset_config("a100", 512, 8)
    assert (a100.block_size_q, a100.block_size_kv) == (128, 64)
    with pytest.raises(ValueError):
        FlashAttentionConfig(512, 7)
    with pytest.raises(ValueError):
        FlashAttentionConfig(512, 8, dropout=1.5).validate()
    with pytest.raises(ValueError):
        FlashAttentionConfig(512, 8, block_size_q=0).validate()
    mem = cp_memory(1 << 20, 8, "ring")
    assert mem["local_tokens"] == 131072
    assert mem["kv_buffers"] == 2 * 131072 * 2 * 32 * 128 * 2


def test_parse_length():
    assert parse_length("1M") == 1 << 20
    assert parse_length("128K") == 131072
    assert parse_length("32768") == 32768
    assert parse_length("1.5m") == 3 << 19
    with pytest.raises(argparse.ArgumentTypeError):
        parse_length("12x")


def test_plan_cli(capsys):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(
        ["plan", "--topology", "nodes:2x8", "--seqlen", "1M", "--heads", "32",
         "--head-dim", "128", "--mask", "causal"]
    )  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "hamilton_2level" in out and "ring" in out
    # Ulysses and the hybrids are priced beside the schedules (16 devices, 32 heads).
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    for name in ("ulysses", "ring+ulysses2", "ring+ulysses4", "ring+ulysses8"):
        assert name in rows and "n/a" not in rows[name], name
    args = p.parse_args(["plan", "--topology", "bogus:3", "--seqlen", "1K"])
    assert main(args) == 2


def test_memory_counts_buffers():
    ring = simulate("ring", "nvswitch:8", 8 * 8192)
    ag = simulate("allgather", "nvswitch:8", 8 * 8192)
    assert ag.peak_mem_bytes > ring.peak_mem_bytes
    assert math.isfinite(ring.peak_mem_bytes)


# -- head parallelism: Ulysses and hybrids priced beside the schedules ---------------------


def test_compare_lists_ulysses_and_hybrids_with_predictions():
    from hamilton_attn.planner.cost import compare

    for topo, want in (("nvswitch:8", "ring+ulysses4"), ("nodes:2x8", "ring+ulysses8")):
        rows = {n: p for n, p, _ in compare(None, topo, 1 << 18, mask="causal")}
        assert want in rows and rows[want] is not None, topo
        assert "ulysses" in rows
        p = rows[want]
        assert p.meta["ulysses_degree"] == int(want.rsplit("ulysses", 1)[1])
        # The all-to-alls are the first two steps, exposed (no compute beside them).
        assert p.steps[0].compute_s == 0 and p.steps[0].transfer_s > 0


def test_head_alltoall_stays_inside_a_node():
    from hamilton_attn.planner.heads_cost import simulate_heads

    # 2 nodes of 8: a head group of 8 is one node (NVLink), of 16 crosses the NICs.
    inside = simulate_heads("ring", "nodes:2x8", 1 << 20, 8)
    across = simulate_heads("ulysses", "nodes:2x8", 1 << 20, 16)
    assert inside.steps[0].transfer_s < across.steps[0].transfer_s


def test_heads_not_dividing_the_degree_are_not_candidates():
    from hamilton_attn.planner.heads_cost import head_candidates, simulate_heads
    from hamilton_attn.planner.model import Shapes

    assert ("ulysses", 8) not in head_candidates(8, 12, ["ring"])
    assert ("ring", 4) in head_candidates(8, 12, ["ring"])
    with pytest.raises(ValueError, match="must divide the 12 query heads"):
        simulate_heads("ulysses", "nvswitch:8", 1 << 16, 8, shapes=Shapes(heads=12))


def test_auto_picks_head_parallelism_only_when_heads_are_known():
    import hamilton_attn as ha

    m = ha.Mask.causal(1 << 16)
    known = ha.plan(m, ha.SimulatedGroup(16), heads=(32, 8), topology="nodes:2x8")
    unknown = ha.plan(m, ha.SimulatedGroup(16), topology="nodes:2x8")
    assert known.heads is not None and known.heads.degree > 1
    assert unknown.heads is None
    with pytest.raises(ValueError, match="heads"):
        ha.plan(m, ha.SimulatedGroup(16), heads=(32, 5))


def test_fused_step_rate_follows_its_bands():
    """A fused step runs at the area-weighted harmonic mean of its bands' rates, each
    ``R rows / (rows + half)`` (fitted to measured steps): short documents' bands make
    the step slower than one of long bands with the same area, and a lone block keeps
    the dense / masked rate."""
    from hamilton_attn.planner.cost import step_rates
    from hamilton_attn.planner.model import BlockStat, DeviceModel

    dev = DeviceModel()
    long = [BlockStat(4096 * 4096, 4096, 4096), BlockStat(4096 * 4096, 4096, 4096)]
    docs = [BlockStat(4096 * 4096, 4096, 4096, ((4096 * 4096 - 2 * 128 * 128, 4096 - 256),
                                                (128 * 128, 128), (128 * 128, 128))),
            long[1]]  # fmt: skip
    f_long, b_long = step_rates(dev, long)
    f_docs, b_docs = step_rates(dev, docs)
    assert f_docs < f_long < dev.fwd_tflops_fused and b_docs < b_long < dev.bwd_tflops_fused
    want = dev.fwd_tflops_fused * 4096 / (4096 + dev.fused_rows_half_fwd)
    assert f_long == pytest.approx(want)
    assert step_rates(dev, long[:1]) == (dev.fwd_tflops_full, dev.bwd_tflops_full)


def test_fused_rates_are_the_fit_to_the_measured_steps(tmp_path):
    """``DeviceModel``'s fused-step constants are what ``benchmarks/fit_fused_rates.py``
    fits to the saved H200 steps (so a refit cannot silently drift from the model)."""
    import runpy
    from pathlib import Path

    from hamilton_attn.planner.model import DeviceModel

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fit_fused_rates.py"
    runpy.run_path(str(script), run_name="fit")["main"](["--out-dir", str(tmp_path)])
    text = next(tmp_path.glob("fused_rates_fit_*.md")).read_text()
    dev = DeviceModel()
    assert (
        f"forward R = {dev.fwd_tflops_fused:.0f} TF/s, half = {dev.fused_rows_half_fwd:.0f}" in text
    )
    assert (
        f"backward alone R = {dev.bwd_tflops_fused:.0f}, half = {dev.fused_rows_half_bwd:.0f}"
        in text
    )
