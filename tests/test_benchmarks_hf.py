"""``benchmarks/hf_train_step.py`` (issue #20's transformers measurement) runs on CPU
under ``torchrun`` (2 gloo ranks, float32, a tiny Llama): its files hold every row, and
the context-parallel losses equal the one-process losses of the same weights and batch,
at the first step and after the AdamW updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "hf_train_step.py"


def test_hf_train_step_cp_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HAMILTON_ATTN_TIMEOUT="60")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo, float32) path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT), "--seqlens", "384", "--layers", "2", "--hidden", "64",
           "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "256",
           "--steps", "2", "--warmup", "1", "--init-std", "0.3", "--attn", "sdpa", "hamilton",
           "--schedules", "ring", "groupcast", "--dispatches", "zigzag", "--tol", "1e-5",
           "--out", str(tmp_path), "--name", "hf"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    data = json.loads((tmp_path / "hf.json").read_text())
    md = (tmp_path / "hf.md").read_text()
    assert data["meta"]["world_size"] == 2 and "hf_train_step.py" in data["meta"]["command"]
    rows = data["rows"]
    single = [r for r in rows if r["impl"] == "one GPU"]
    cp = [r for r in rows if r["impl"] == "CP x2"]
    # 2 attentions x 2 checkpointing settings; 2 schedules x 2 checkpointing settings.
    assert len(single) == 4 and len(cp) == 4, rows
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    for r in cp:
        assert r["loss_rel_diff"] < 1e-5 and r["loss_last_rel_diff"] < 1e-5, r
        assert r["loss_ref_config"].startswith("hamilton"), r
        assert r["pred_attn_ms"] > 0, r  # the planner's prediction beside it
        assert r["tokens_per_s_per_gpu"] > 0 and r["ms_per_step"] > 0
    # The one-process sdpa and hamilton losses agree as well.
    for ckpt in ("off", "on"):
        a, b = (next(r["loss"] for r in single if r["attn"] == x and r["ckpt"] == ckpt)
                for x in ("sdpa", "hamilton"))  # fmt: skip
        assert abs(a - b) <= 1e-5 * abs(a)
    assert md.count("| CP x2 ") == 4 and md.count("| one GPU ") == 4, md
    assert "ring/zigzag" in md and "groupcast/zigzag" in md
