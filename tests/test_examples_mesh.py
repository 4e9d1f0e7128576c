"""``examples/train_2d_mesh.py`` runs as its docstring says (``torchrun``, gloo on CPU,
dp 2 x cp 2) and passes its own check against the model without context parallelism;
and that check fails, with a non-zero exit, on a deliberate mistake (gradients not
summed over the cp ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_2d_mesh.py"


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HAMILTON_ATTN_TIMEOUT="60")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CI's check is the CPU (gloo) path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), str(EXAMPLE), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_train_2d_mesh_matches_the_model_without_context_parallelism():
    done = _torchrun(4, "--steps", "2")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "OK: dp 2 x cp 2 on cpu, docs mask" in done.stdout, log[-4000:]
    steps = [ln for ln in done.stdout.splitlines() if ln.startswith("step ")]
    assert len(steps) == 2 and all("0 rank(s) out of tolerance" in ln for ln in steps), steps


def test_train_2d_mesh_exits_non_zero_on_a_gradient_mismatch():
    done = _torchrun(2, "--steps", "1", "--skip-cp-grad-sum", "--mask", "causal")
    assert done.returncode != 0, done.stdout[-4000:]
    assert "MISMATCH: dp 1 x cp 2" in done.stdout, (done.stdout + done.stderr)[-4000:]
