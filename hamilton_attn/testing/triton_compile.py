"""The ``triton`` backend's GPU launches, captured and compiled for Hopper without a GPU.

:func:`captured_launches` makes the backend take its compiled-mode path on CPU tensors
(the tile configs, warps, stages and constexpr specialisations a GPU call would use) and
records each launch instead of running it; :func:`compile_sm90` compiles one recorded
launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin
(Triton's wheel carries ptxas); :func:`resources` reads a cubin's registers and stack
(spills) with the wheel's ``cuobjdump``. Used by ``tests/kernels/test_triton_gpu_compile.py``
and ``benchmarks/triton_resources.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
       torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


class _Capture:
    """A kernels module whose launches (``*_kernel[grid](...)``) are recorded into
    ``seen`` as ``(jit function, args, kwargs)``; ``run``: and then run, else not."""

    def __init__(self, mod, seen, run=False):
        self._mod, self._seen, self._run = mod, seen, run

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if not name.endswith("_kernel"):
            return fn
        seen, run = self._seen, self._run

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append((fn, args, kw))
                    return fn[grid](*args, **kw) if run else None

                return launch

        return Grid()


def recording(mod, seen: list):
    """Kernels module ``mod`` with each launch appended to ``seen`` before it runs (tests
    that check which kernels a call launches)."""
    return _Capture(mod, seen, run=True)


@contextlib.contextmanager
def captured_launches(dq_add: int = 0):
    """Yields the list that the ``triton`` backend's launches are appended to, as
    ``(jit function, positional args, keyword args)``, while it runs its GPU path on
    CPU tensors. ``dq_add``: :data:`hamilton_attn.kernels.triton.DQ_ADD` meanwhile (0: a
    dQ pass, 1: atomic adds; 2 needs a TMA descriptor of a GPU tensor)."""
    from .. import config
    from ..kernels import triton as tk
    from ..kernels.triton import launch

    seen: list = []
    saved = (tk.load, tk._interpret, tk.TritonKernel.available, tk.DQ_ADD)
    real = launch.load
    tk.load = lambda interp, src=None: _Capture(real(False, src), seen)
    tk._interpret = lambda device: False
    tk.TritonKernel.available = lambda self, device: True
    tk.DQ_ADD = dq_add
    try:
        with config.override(triton_interpret=False):
            yield seen
    finally:
        tk.load, tk._interpret, tk.TritonKernel.available, tk.DQ_ADD = saved


def compile_sm90(fn, args, kw):
    """One recorded launch compiled for sm_90 (``triton.compile``'s CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params if not p.is_constexpr]
    if len(names) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} arguments for {len(names)} parameters")
    sig, constexprs, opts = {}, {}, {}
    for name, a in zip(names, args, strict=True):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _TY[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32" if abs(a) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    for name, val in kw.items():
        if name in ("num_warps", "num_stages"):
            opts[name] = val
        else:
            sig[name], constexprs[name] = "constexpr", val
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resources(compiled) -> dict:
    """``{"regs": int, "stack": int}`` of a compiled kernel's cubin (cuobjdump)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    got = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", text)}
    return {"regs": got.get("reg", -1), "stack": got.get("stack", -1)}
