"""hamilton_attn.config: the one typed configuration, the only reader of the environment."""

from __future__ import annotations

import ast
import dataclasses
import threading
from pathlib import Path

import pytest

from hamilton_attn import config

PACKAGE = Path(config.__file__).resolve().parent


def test_defaults_without_environment():
    cfg = config.from_env({})
    assert cfg == config.Config()
    assert cfg.timeout_s == config.DEFAULT_TIMEOUT_S and cfg.timeout_problem is None
    assert cfg.transport == "nccl" and cfg.compile_merge and cfg.topology is None
    assert not cfg.torchrun


def test_every_variable_is_read():
    env = {
        "HAMILTON_ATTN_TIMEOUT": "12.5",
        "HAMILTON_ATTN_TRANSFER_HEAD_START_US": "0",
        "HAMILTON_ATTN_TRANSPORT": "ce",
        "HAMILTON_ATTN_CE_SLOT_MB": "8",
        "HAMILTON_ATTN_COMPILE_MERGE": "0",
        "HAMILTON_ATTN_TOPOLOGY": "nodes:2x4",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "8",
        "RANK": "3",
        "LOCAL_RANK": "3",
        "GLOO_SOCKET_IFNAME": "lo",
        "TRITON_INTERPRET": "1",
    }
    cfg = config.from_env(env)
    assert dataclasses.asdict(cfg) == dict(
        timeout_s=12.5,
        timeout_problem=None,
        transfer_head_start_us=0.0,
        transport="ce",
        ce_slot_mb=8.0,
        compile_merge=False,
        topology="nodes:2x4",
        local_world_size=4,
        launched_world_size=8,
        launched_rank=3,
        local_rank=3,
        gloo_socket_ifname="lo",
        triton_interpret=True,
    )
    assert cfg.torchrun
    assert set(config.ENV.values()) == set(env)  # the table names every variable read


@pytest.mark.parametrize(
    "var,value",
    [
        ("HAMILTON_ATTN_TRANSFER_HEAD_START_US", "soon"),
        ("HAMILTON_ATTN_TRANSFER_HEAD_START_US", "-1"),
        ("HAMILTON_ATTN_TRANSPORT", "carrier-pigeon"),
        ("HAMILTON_ATTN_CE_SLOT_MB", "0"),
    ],
)
def test_bad_values_name_their_variable(var, value):
    with pytest.raises(ValueError, match=var):
        config.from_env({var: value})


@pytest.mark.parametrize("raw", ["0", "abc", "nan", "inf", "1e15", "0.0005"])
def test_bad_timeout_is_reported_not_raised(raw):
    # Every rank must raise, so the value travels in the first status exchange.
    cfg = config.from_env({"HAMILTON_ATTN_TIMEOUT": raw})
    assert cfg.timeout_s == config.DEFAULT_TIMEOUT_S
    assert "HAMILTON_ATTN_TIMEOUT" in cfg.timeout_problem and repr(raw) in cfg.timeout_problem


def test_launcher_variables_that_are_not_numbers_count_as_unset():
    cfg = config.from_env({"WORLD_SIZE": "x", "RANK": "-2", "LOCAL_WORLD_SIZE": "zero"})
    assert cfg.launched_world_size is None and cfg.launched_rank is None
    assert cfg.local_world_size is None


def test_get_follows_the_environment(monkeypatch):
    monkeypatch.delenv("HAMILTON_ATTN_TOPOLOGY", raising=False)
    assert config.get().topology is None
    monkeypatch.setenv("HAMILTON_ATTN_TOPOLOGY", "full_mesh:8")
    assert config.get().topology == "full_mesh:8"  # set after import: still seen


def test_override_restores_and_nests(monkeypatch):
    monkeypatch.delenv("HAMILTON_ATTN_TRANSPORT", raising=False)
    with config.override(transport="ce") as outer:
        assert config.get() is outer and outer.transport == "ce"
        with config.override(timeout_s=3.0):
            assert config.get().transport == "ce" and config.get().timeout_s == 3.0
        assert config.get() is outer
        with pytest.raises(RuntimeError), config.override(compile_merge=False):
            raise RuntimeError("boom")
        assert config.get() is outer
    assert config.get().transport == "nccl"


def test_override_reaches_other_threads():
    # autograd runs a CUDA backward on a thread of its own: it must see the override.
    seen = []
    with config.override(transfer_head_start_us=0.0):
        t = threading.Thread(target=lambda: seen.append(config.get().transfer_head_start_us))
        t.start()
        t.join()
    assert seen == [0.0]


@pytest.mark.parametrize(
    "changes,arg",
    [
        (dict(transport="udp"), "transport"),
        (dict(timeout_s=0.0), "timeout_s"),
        (dict(ce_slot_mb=-1), "ce_slot_mb"),
        (dict(local_world_size=-4), "local_world_size"),
        (dict(compile_merge="yes"), "compile_merge"),
    ],
)
def test_override_validates(changes, arg):
    with pytest.raises(ValueError, match=arg), config.override(**changes):
        pass


def test_override_refuses_unknown_settings():
    with pytest.raises(TypeError, match="no_such_setting"), config.override(no_such_setting=1):
        pass


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read os.environ / os.getenv (writing a variable for a child process
    is not a read)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("getenv", "environ"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                lines.append(node)
    reads = []
    for node in lines:
        parent = getattr(node, "_parent", None)
        is_write = (
            isinstance(parent, ast.Subscript)
            and isinstance(getattr(parent, "_parent", None), ast.Assign)
            and parent in parent._parent.targets
        )
        if not is_write:
            reads.append(node.lineno)
    return reads


def test_no_module_but_config_reads_the_environment():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child._parent = node
        reads = _environment_reads(tree)
        if reads:
            offenders[str(path.relative_to(PACKAGE))] = reads
    assert not offenders, f"environment read outside config.py: {offenders}"
