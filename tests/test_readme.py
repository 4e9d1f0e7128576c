"""Every example in README.md (and in the user pages of ``DOCS``) runs as written.

Python blocks run in a fresh interpreter each; a block that starts with a
``# NAME.py`` line and says how to run it under ``torchrun`` runs that way (2 CPU
processes). The quick-start shell block is checked for what it promises (the
commands exist and `.ci/run` runs the README's test command); running it here would
install a second environment inside the test suite.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The pages whose python blocks run, README first.
DOCS = ("README.md", "docs/linear_attention.md")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


README = (ROOT / DOCS[0]).read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [(page, i) for page in DOCS for i in range(len(python_blocks(page)))]


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["HAMILTON_ATTN_TIMEOUT"] = "60"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_readme_has_examples():
    assert len(python_blocks(DOCS[0])) >= 2 and any(lang == "bash" for lang, _ in BLOCKS)
    assert all(python_blocks(page) for page in DOCS[1:])


@pytest.mark.parametrize("page, index", PYTHON)
def test_readme_python_block_runs(page, index, tmp_path):
    body = python_blocks(page)[index]
    first = body.splitlines()[0].strip()
    named = re.fullmatch(r"#\s*(\w+\.py)", first)
    script = tmp_path / (named.group(1) if named else "block.py")
    script.write_text(body)
    if named:
        text = (ROOT / page).read_text()
        launch = re.search(rf"`torchrun --nproc_per_node (\d+) {re.escape(script.name)}`", text)
        assert launch, f"{page}: say how to run {script.name}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            launch.group(1),
            str(script),
        ]
    else:
        cmd = [sys.executable, str(script)]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    shell = [body for lang, body in BLOCKS if lang == "bash"][0]
    commands = [ln.split("#")[0].strip() for ln in shell.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["sh dev.sh demo", "sh dev.sh test"], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*(ba)?sh dev\.sh test\s*$", ci, flags=re.M), ci
    dev = (ROOT / "dev.sh").read_text()
    assert "exec hamilton-attn demo" in dev and "exec python -m pytest -q" in dev
    # The script parses as POSIX sh.
    subprocess.run(["sh", "-n", str(ROOT / "dev.sh")], check=True, timeout=30)
    assert shlex.split(commands[0])[:2] == ["sh", "dev.sh"]
