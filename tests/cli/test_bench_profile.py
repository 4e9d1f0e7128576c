"""CPU smoke tests of `hamilton-attn bench`, the profiler and the trace script (gloo)."""

import json
import subprocess
import sys

import torch

import hamilton_attn as ha
from hamilton_attn.cli.bench import doc_boundaries, table
from hamilton_attn.runtime.profile import Profiler, current
from hamilton_attn.testing import GlooPool


def _profiled(ctx):
    s = 48
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", dispatch="zigzag")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, 2, 8, generator=gen) for _ in range(3))
    local = [ha.dispatch(t, p).requires_grad_() for t in (q, k, v)]
    with Profiler() as prof:
        ha.calc_attn(*local, p).sum().backward()
    rows = prof.rows()
    return {
        "rows": rows,
        "totals": prof.totals(),
        "summary": prof.summary(),
        "steps": p.schedule.num_steps,
        "fwd_steps": len(p.schedule.forward_steps()),
    }


def test_profiler_records_every_step_and_costs_nothing_when_off(tmp_path):
    assert current() is None
    with GlooPool(3) as pool:
        results = pool.run(_profiled, 3)
    for r, res in enumerate(results):
        phases = [row["phase"] for row in res["rows"]]
        assert phases.count("fwd") == res["fwd_steps"] and phases.count("bwd") == res["steps"]
        assert all(row["rank"] == r for row in res["rows"])
        assert all(row["compute_ms"] >= 0 and row["transfer_ms"] >= 0 for row in res["rows"])
        sent = sum(row["bytes_sent"] for row in res["rows"] if row["phase"] == "fwd")
        assert sent > 0  # ring forwards KV
        assert 0.0 <= res["totals"]["fwd"]["overlap"] <= 1.0
        assert "exposed" in res["summary"]


def test_chrome_trace_is_valid_json(tmp_path):
    out = tmp_path / "t"
    cmd = [
        sys.executable,
        "benchmarks/trace_run.py",
        "--device",
        "cpu",
        "--tokens",
        "32",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    trace = json.loads((out / "trace_ring_rank0.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert {e["cat"] for e in events} == {"compute", "transfer"}
    assert all(e["dur"] >= 0 for e in events)


def test_bench_smoke_writes_tables(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "hamilton_attn",
        "bench",
        "--device",
        "cpu",
        "--world-size",
        "2",
        "--tokens-per-device",
        "64",
        "--heads",
        "2",
        "--head-dim",
        "16",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--masks",
        "causal",
        "docs",
        "--schedules",
        "ring",
        "allgather",
        "--no-torch-cp",
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["command"].startswith("hamilton-attn")
    ours = [r for r in data["rows"] if r["impl"] == "hamilton-attn"]
    assert len(ours) == 4 and all(r["fwd_ms"] > 0 and r["eff_fwd"] > 0 for r in ours)
    assert "eff fwd" in (tmp_path / "smoke.md").read_text()
    assert "hamilton-attn" in table(data["rows"])


def test_bench_smoke_graphs_forward_only(tmp_path):
    """--fwd-only skips forward+backward; --graphs adds replay columns (eager off CUDA)."""
    cmd = [sys.executable, "-m", "hamilton_attn", "bench", "--device", "cpu"]
    cmd += ["--world-size", "2", "--tokens-per-device", "32", "--heads", "2", "--head-dim", "8"]
    cmd += ["--repeats", "1", "--warmup", "0", "--inner", "1", "--masks", "docs"]
    cmd += ["--schedules", "ring", "--dispatches", "balanced_zigzag", "--no-torch-cp"]
    cmd += ["--fwd-only", "--graphs", "--out", str(tmp_path), "--name", "g"]
    cmd += ["--rounds", "2", "--transports", "nccl", "ce"]  # (ce falls back off CUDA)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "hamilton-attn"]
    assert [r["schedule"] for r in ours] == ["ring [nccl]", "ring [ce]"]
    assert all(r["rounds"] == 2 for r in rows)  # every row is a median over 2 rounds
    for r in ours:
        assert r["fwd_bwd_ms"] is None and r["eff_fwd_bwd"] is None
        assert r["fwd_graph_ms"] > 0 and r["eff_fwd_graph"] > 0
    md = (tmp_path / "g.md").read_text()
    assert "eff fwd graph" in md and "CUDA graph" in md


def test_doc_boundaries_cover_the_sequence():
    cu = doc_boundaries(4096)
    assert cu[0] == 0 and cu[-1] == 4096 and all(b > a for a, b in zip(cu, cu[1:]))
    assert len(cu) > 5


def _compiled_layer(ctx):
    s = 32
    p = ha.plan(ha.Mask.causal(s), ctx.group, schedule="ring", dispatch="zigzag")
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)

    def layer(x):
        q = proj(x).view(1, -1, 2, 8)
        return ha.calc_attn(q, q, q, p).square().sum()

    x = ha.dispatch(torch.randn(1, s, 16), p).requires_grad_()
    compiled = torch.compile(layer)(x)
    (gc,) = torch.autograd.grad(compiled, x)
    eager = layer(x)
    (ge,) = torch.autograd.grad(eager, x)
    return (compiled - eager).abs().item(), (gc - ge).abs().max().item()


def test_calc_attn_inside_torch_compile():
    with GlooPool(2) as pool:
        for err_out, err_grad in pool.run(_compiled_layer, 2):
            assert err_out < 1e-4 and err_grad < 1e-4


def _torch_cp_load_balance(ctx):
    from hamilton_attn.cli.bench_torch_cp import _cp_options, _torch_cp_times

    options = _cp_options()
    options.enable_load_balance = True
    q, k, v, g = (torch.randn(1, 16, 2, 8) for _ in range(4))
    times = _torch_cp_times(ctx, torch.device("cpu"), q, k, v, g, False, 0, 1, fwd_only=True)
    return times["fwd"], options.enable_load_balance


def test_torch_cp_baseline_restores_load_balance():
    """The baseline sets PyTorch's load-balance option for its run (off for full masks)
    and puts the previous value back."""
    with GlooPool(2) as pool:
        for fwd_ms, balance in pool.run(_torch_cp_load_balance, 2):
            assert fwd_ms > 0 and balance is True
