"""Process-level edges: clean exit after gloo work, where the rendezvous listens, the
bench's device and baseline (issue #14, items 10, 13, 14)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hamilton_attn.testing import GlooPool

# ---------------------------------------------------------------- item 10: clean exit


def _gather_leaves_no_reference(ctx, n):
    """How many of ``n`` all_gather_tensor calls returned while something besides the
    caller still held the tensors (gloo's worker thread, which then frees them itself:
    at interpreter exit that thread must take the GIL to drop a Python tensor)."""
    from hamilton_attn.runtime.comm import all_gather_tensor

    held = 0
    for i in range(n):
        x = torch.full((64,), float(ctx.rank + i))
        out = all_gather_tensor(x, ctx.group)
        assert [t[0].item() for t in out] == [float(r + i) for r in range(ctx.world_size)]
        held += x._use_count() > 1 or any(t._use_count() > 1 for t in out)
    return held


def test_all_gather_returns_with_no_transfer_holding_its_tensors():
    with GlooPool(3) as pool:
        assert pool.run(_gather_leaves_no_reference, 3, 300) == [0, 0, 0]


_EXIT_SCRIPT = os.path.join(os.path.dirname(__file__), "edge_exit_script.py")


def test_scripts_exit_cleanly_after_calc_attn_and_destroy():
    """Issue #14 item 10: plan + dispatch + calc_attn forward/backward + undispatch (ring
    / zigzag and groupcast / minheap, causal, W = 4, gloo), destroy_process_group(),
    then a normal interpreter exit, 20 times: every rank of every run exits 0."""
    cmd = [sys.executable, _EXIT_SCRIPT, "--runs", "20", "--world-size", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "bad runs: 0 of 20" in res.stdout, res.stdout[-3000:]


# ---------------------------------------------------------------- item 13: loopback only

_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc writes them


def _listening_sockets(pids) -> list[tuple[str, str, int]]:
    """(table, local address hex, port) of every TCP socket in LISTEN state that one of
    ``pids`` holds, from /proc/net/tcp{,6} (sockets matched to processes by inode)."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        path = f"/proc/net/{table}"
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    addr, port = fields[1].split(":")
                    found.append((table, addr, int(port, 16)))
    return found


def _one(ctx):
    return ctx.rank


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_pool_listens_on_loopback_only():
    with GlooPool(2) as pool:
        assert pool.run(_one, 2) == [0, 1]
        sockets = _listening_sockets([p.pid for p in pool._procs])
        assert sockets, "the pool's rendezvous store should be listening"
        exposed = [s for s in sockets if s[1] not in _LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed}"
        # The store a rank connects to is one of these sockets, on the port the pool chose.
        assert pool.port in {port for _, _, port in sockets}


# ---------------------------------------------------------------- item 14: bench off GPU


def test_bench_without_device_runs_on_cpu(tmp_path):
    """No --device on a machine without GPUs: CPU and gloo (it died in a pool of zero
    NCCL ranks). PyTorch's context_parallel has no CPU attention ops: its row says so,
    and says its KV heads would be repeated (Hk < Hq)."""
    cmd = [sys.executable, "-m", "hamilton_attn", "bench", "--world-size", "2"]
    cmd += ["--tokens-per-device", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8"]
    cmd += ["--repeats", "1", "--warmup", "0", "--inner", "1", "--masks", "causal"]
    cmd += ["--schedules", "ring", "--out", str(tmp_path), "--name", "cpu"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "bench on cpu (no GPU visible" in res.stdout.splitlines()[0]
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert data["meta"]["config"]["device"] == "cpu"
    ours = [r for r in data["rows"] if r["impl"] == "hamilton-attn"]
    assert len(ours) == 1 and ours[0]["fwd_ms"] > 0 and ours[0]["fwd_bwd_ms"] > 0
    tcp = [r for r in data["rows"] if r["impl"] == "torch context_parallel"]
    assert len(tcp) == 1 and tcp[0]["error"].startswith("n/a on cpu"), tcp
    assert tcp[0]["schedule"] == "ring (torch, KV heads x2)"
    assert "KV heads x2" in (tmp_path / "cpu.md").read_text()


def test_bench_cuda_asked_without_gpu_says_why():
    from hamilton_attn.cli.bench import pick_device

    if torch.cuda.is_available() and torch.cuda.device_count():
        pytest.skip("a GPU is visible")
    assert pick_device(None)[0] == "cpu"
    device, why = pick_device("cuda")
    assert device is None and "no GPU is visible" in why


def test_torch_cp_baseline_gets_kv_heads_repeated():
    """context_parallel's ring calls SDPA without enable_gqa: K and V must come with q's
    head count, and attention on them must equal GQA attention on the originals."""
    from hamilton_attn.cli.bench import _torch_cp_schedule, torch_cp_inputs

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 24, h, 8, generator=g, dtype=torch.float64) for h in (6, 2, 2, 6))
    qq, kk, vv, gg = torch_cp_inputs(q, k, v, do)
    assert qq.shape == kk.shape == vv.shape == gg.shape == (1, 6, 24, 8)  # bhsd
    F = torch.nn.functional
    got = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(got, want)
    assert _torch_cp_schedule(6, 6) == "ring (torch)"
    assert _torch_cp_schedule(6, 2) == "ring (torch, KV heads x3)"
