"""What every launch of the ``triton`` backend shares: the kernels' module per mode (and
per compiled score_mod), and the variant's launch arguments."""

from __future__ import annotations

import functools
import importlib.util
import linecache
from pathlib import Path

import torch

from . import score_mod as _score_mod

_KINDS = {"softmax": 0, "sigmoid": 1, "relu": 2}
LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=64)
def load(interpret: bool, mod_source: str | None = None):
    """The kernels module (:mod:`.jit`, then :mod:`.jit_bwd` in its namespace) decorated
    for one mode: compiled, or Triton's interpreter. Executed afresh per mode, since
    ``@triton.jit`` picks the mode when it decorates (Triton's ``TRITON_INTERPRET`` knob,
    set here from the config). ``mod_source``: a compiled score_mod's ``_mod_fwd`` /
    ``_mod_bwd`` (:mod:`.score_mod`), executed last so the kernels call them: one module
    (and one compilation) per score_mod structure."""
    import triton

    path = Path(__file__).with_name("jit.py")
    tag = "" if mod_source is None else "_" + _score_mod.source_key(mod_source)
    name = f"{__package__}._jit_{'interp' if interpret else 'gpu'}{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    bwd = path.with_name("jit_bwd.py")  # the backward kernels, into the same namespace
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(mod)
        exec(compile(bwd.read_text(), str(bwd), "exec"), mod.__dict__)  # noqa: S102
        if mod_source is not None:
            # @triton.jit reads its function's source through inspect, i.e. linecache
            fname = f"<hamilton_attn score_mod {tag[1:]}>"
            linecache.cache[fname] = (len(mod_source), None, mod_source.splitlines(True), fname)
            exec(compile(mod_source, fname, "exec"), mod.__dict__)  # noqa: S102
    return mod


@functools.cache
def _dummies(device: torch.device):
    """Placeholder float32 / int64 arguments for the variant tensors a launch does not
    read (made once per device: two allocations and fills less per call)."""
    return (
        torch.zeros(1, dtype=torch.float32, device=device),
        torch.zeros(1, dtype=torch.int64, device=device),
    )


def _scalars(scale, va) -> tuple:
    """The scalar launch arguments every pass takes after its sizes."""
    return float(scale), va["softcap"], va["bias"], va["shift"], va["head0"]


def variant_args(q, variant) -> dict:
    """The launch arguments of a :class:`~hamilton_attn.variants.BlockVariant` (None:
    plain softmax) for a block whose queries are ``q``."""
    dev = q.device
    kind = 0 if variant is None else _KINDS[variant.kind]
    dummy_f, dummy_i = _dummies(dev)
    none = dict(MOD=False, modf=dummy_f, modi=dummy_i, head0=0, source=None, gathers=0)
    if variant is None:
        return dict(
            kind=kind,
            softcap=1.0,
            bias=0.0,
            shift=0,
            alibi=dummy_f,
            qpos=dummy_i,
            kpos=dummy_i,
            SOFTCAP=False,
            ALIBI_ON=False,
            QPOS_ON=False,
            KPOS_ON=False,
            CAPMAX=False,
            **none,
        )
    mod = none
    if variant.score_mod is not None:
        got = _score_mod.compiled_for(variant, dev)
        if isinstance(got, str):
            raise ValueError(f"score_mod: the triton backend {got}")
        modf, modi = got.buffers(dev)
        mod = dict(MOD=True, modf=modf, modi=modi, head0=int(variant.head0), source=got.source,
                   gathers=got.gathers)  # fmt: skip
    alibi = variant.alibi
    on = alibi is not None
    if on:
        alibi = alibi.to(device=dev, dtype=torch.float32).expand(q.shape[0], q.shape[1])
        alibi = alibi.contiguous()
    pos = on or mod["MOD"]  # ALiBi and a score_mod read global positions
    qpos = variant.q_pos if pos and variant.q_pos is not None else None
    kpos = variant.k_pos if pos and variant.k_pos is not None else None
    # c as the running max puts p in [2^(-2c log2 e), 1]: it must stay a normal number
    # where the PV product reads it (float16's smallest is 2^-14, bf16's 2^-126)
    reach_p = 7.0 if q.dtype == torch.float16 else 60.0
    capmax = variant.softcap is not None and not on and variant.softcap * LOG2E <= reach_p
    return dict(
        kind=kind,
        softcap=float(variant.softcap) if variant.softcap is not None else 1.0,
        bias=float(variant.bias),
        shift=int(variant.shift),
        alibi=alibi if on else dummy_f,
        qpos=qpos.to(device=dev, dtype=torch.int64).contiguous() if qpos is not None else dummy_i,
        kpos=kpos.to(device=dev, dtype=torch.int64).contiguous() if kpos is not None else dummy_i,
        SOFTCAP=variant.softcap is not None,
        ALIBI_ON=on,
        QPOS_ON=qpos is not None,
        KPOS_ON=kpos is not None,
        # softcap alone bounds the scores (ALiBi would not): c is a valid running max
        # (after a score_mod too: softcap comes after it)
        CAPMAX=capmax,
        **mod,
    )
