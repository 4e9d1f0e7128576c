"""A user's ``score_mod`` compiled into the ``triton`` kernel.

The callable runs once per call on singleton tensors (``[1, 1, 1, 1]``: the score, b,
h, q_idx, kv_idx, shaped like the reference kernel's broadcast arguments, so dtype
promotion is the same) under a dispatch mode that records every aten op. The recording
becomes two Triton functions, ``_mod_fwd(s, b, h, qi, kj, MODF, MODI, FAST)`` (the new
score) and ``_mod_bwd`` (the new score and its derivative in ``s``, by forward-mode
rules per op), executed into a fresh copy of the kernels' module
(:func:`hamilton_attn.kernels.triton.load`, cached by source).

- Ops that do not depend on the five inputs are evaluated by torch during the recording
  (tables the closure captures, constants, anything computed from them); their results
  and every Python float are read at run time from one float32 and one int64 buffer
  (``MODF`` / ``MODI``), packed per call. A new value neither recompiles nor goes
  stale; a new structure compiles once.
- Arithmetic runs in float32 (float64 values included; float16 / bfloat16 results
  rounded as torch stores them) and in 32-bit integers (torch: int64), so integer
  results past 2^31 differ. A table index out of range reads 0 (torch raises); negative
  indices count from the end as in torch. Each op's rule is in :mod:`.mod_ops`.
- A closure tensor is read as the op that used it saw it (a copy per version), so an
  in-place change after that op reaches only later ops, as in torch.
- Refused (:func:`compile_mod` returns the reason; ``auto`` then takes flex or the
  reference): data-dependent control flow, an op without a rule, in-place ops on values
  computed from the inputs, integer types other than int32 / int64 / bool, a table that
  requires grad (flex and the reference differentiate it), a non-scalar tensor used
  elementwise, an output that is not one value per score.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .mod_ops import _ROUND, Unsupported, _cast, _op, _ty, _Val

#: What ``auto`` does with a score_mod it can compile: True puts the triton kernel first
#: (as for the other variants), False keeps flex first for softmax and the reference for
#: sigmoid / relu. True since GPU runs timed them (H100, bf16, 32 heads, D 128, forward /
#: forward+backward TF/s, results/triton_score_mod_H100_2026-12-07_s13.md): a relative
#: bias on causal 32K 446 / 415 against compiled flex's 356 / 259, on 64-512-token
#: documents 171 / 121 against 100 / 35; flex cannot run sigmoid / relu at all.
AUTO = True


def source_key(source: str) -> str:
    """A short name of a compiled score_mod's source (one kernels module per source)."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


@dataclass
class Compiled:
    """A compiled score_mod: its Triton source and the run-time values it reads."""

    source: str
    floats: list = field(default_factory=list)  # tensors or Python floats, in slot order
    ints: list = field(default_factory=list)
    gathers: int = 0  # table lookups by per-score indices (loads of a tile's shape)
    packed: dict = field(default_factory=dict, repr=False)  # device -> (modf, modi)

    @property
    def key(self) -> str:
        return source_key(self.source)

    def buffers(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 / int64 value buffers on ``device`` (made once per call)."""
        device = torch.device(device)
        if device not in self.packed:

            def pack(values, dtype):
                parts = [
                    torch.as_tensor(x).detach().reshape(-1).to(device=device, dtype=dtype)
                    for x in values
                ]
                return torch.cat(parts) if parts else torch.zeros(1, dtype=dtype, device=device)

            self.packed[device] = (pack(self.floats, torch.float32), pack(self.ints, torch.int64))
        return self.packed[device]


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by in-place changes); 0 for an inference-mode
    tensor, which has none (and cannot be changed in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return 0


#: Integer tables whose values were found to fit 32 bits, and at which version: the check
#: reads them to the host (a stream synchronisation on a GPU), so a table the closure
#: keeps unchanged is checked once, not on every call.
_INT32_CHECKED = WeakIdKeyDictionary()


def _check_int32(t: torch.Tensor, version: int, value: torch.Tensor) -> None:
    """Refuse an integer table (``value``: ``t`` as the op read it, at ``version``) with a
    value past 32 bits, where the kernel's int32 arithmetic would wrap. Skipped while a
    CUDA graph is captured (no host read is allowed there)."""
    if not value.numel() or _INT32_CHECKED.get(t) == version:
        return
    if value.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(value.min()), int(value.max())
    if lo < -(2**31) or hi >= 2**31:
        raise Unsupported(f"an integer table value past 32 bits ({lo if lo < 0 else hi})")
    _INT32_CHECKED[t] = version


class _Recorder(TorchDispatchMode):
    """Records each aten op with the versions of its tensor arguments, and a copy of each
    argument per version (``snap``): a tensor the closure changes in place after an op
    read it is read by that op as it was then, as torch does."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.snap: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        versions = {}
        for a in _flat((args, tuple(kwargs.values()))):
            if isinstance(a, torch.Tensor):
                key = (id(a), _version(a))
                versions[id(a)] = key[1]
                if key not in self.snap:  # the tensor itself kept too: its id stays unique
                    self.snap[key] = (a, a.detach().clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out, versions))
        return out


class _Builder:
    """Turns a recording into Triton source (value and derivative lines)."""

    def __init__(self):
        self.lines: list[tuple[str, bool]] = []  # (line, derivative-only)
        self.env: dict[int, _Val] = {}
        self.keep: list = []  # recorded tensors, alive so their ids stay unique
        self.floats: list = []
        self.ints: list = []
        self.gathers = 0
        self.n = 0
        self.snap: dict = {}  # the recorder's copies, by (id, version)
        self.versions: dict[int, int] = {}  # the tensor arguments' versions at this op

    # -- values ---------------------------------------------------------------------------

    def new(self, expr: str, dtype, der: str | None = None) -> _Val:
        name = f"v{self.n}"
        self.lines.append((f"{name} = ({expr}).to({_ty(dtype)})", False))
        if dtype in _ROUND:  # computed in float32, rounded as torch stores it
            self.lines.append((_ROUND[dtype].format(x=name), False))
        dname = None
        if der is not None and dtype.is_floating_point:
            dname = f"d{self.n}"
            self.lines.append((f"{dname} = ({der}).to(tl.float32)", True))
        self.n += 1
        return _Val(name, dtype, True, dname)

    def table(self, t: torch.Tensor) -> _Val:
        if t.requires_grad:
            raise Unsupported(
                "it reads a tensor that requires grad (flex and the reference differentiate it)"
            )
        if t.is_floating_point():
            off, kind, dest = sum(x.numel() for x in self.floats), "f", self.floats
        elif t.dtype.is_complex:
            raise Unsupported(f"complex values ({t.dtype})")
        else:
            off, kind, dest = sum(x.numel() for x in self.ints), "i", self.ints
        # the value as the op read it (the recorder's copy: a later in-place change of the
        # closure's tensor within the recording must not reach the kernel)
        ver = self.versions.get(id(t), _version(t))
        got = self.snap.get((id(t), ver))
        value = got[1] if got is not None else t.detach().clone()
        if kind == "i" and value.dtype != torch.bool:
            _check_int32(t, ver, value)
        dest.append(value)
        ptr = "MODF" if kind == "f" else "MODI"
        expr = f"tl.load({ptr} + {off})"
        if t.dtype == torch.bool:
            expr = f"({expr} != 0)"
        return _Val(expr, t.dtype, False, table=(kind, off, tuple(t.shape)))

    def scalar(self, x) -> _Val:
        if isinstance(x, bool):
            return _Val(f"tl.full([], {int(x)}, tl.int1)", torch.bool, False)
        if isinstance(x, int):
            if abs(x) >= 2**31:
                raise Unsupported(f"an integer constant past 32 bits ({x})")
            return _Val(f"tl.full([], {x}, tl.int32)", torch.int64, False)
        if isinstance(x, float):
            off = sum(t.numel() for t in self.floats)
            self.floats.append(torch.tensor([x], dtype=torch.float32))
            return _Val(f"tl.load(MODF + {off})", torch.float32, False, table=("f", off, ()))
        raise Unsupported(f"an argument of type {type(x).__name__}")

    def val(self, x) -> _Val:
        if isinstance(x, torch.Tensor):
            v = self.env.get(id(x))
            if v is not None:
                return v
            # captured by the closure (or computed from it): a table of values, one per
            # version the recording read
            key = (id(x), self.versions.get(id(x), _version(x)))
            v = self.env.get(key)
            if v is None:
                self.keep.append(x)
                v = self.env[key] = self.table(x)
            return v
        return self.scalar(x)

    def elementwise(self, v: _Val) -> _Val:
        """``v`` as an operand of an elementwise op: one value per score."""
        if v.table is not None and math.prod(v.table[2]) != 1:
            raise Unsupported(f"a tensor of shape {list(v.table[2])} used elementwise")
        return v


def compile_mod(score_mod, device) -> Compiled:
    """The recording of ``score_mod`` on ``device`` as a :class:`Compiled`; raises
    :class:`Unsupported` with the reason it cannot be compiled."""
    device = torch.device(device)
    s = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float32, device=device)
    # Index 0 everywhere: any table the mod indexes has it (a table of one head, one
    # document); the values do not matter, every op is recorded.
    idx = [torch.zeros((1, 1, 1, 1), dtype=torch.int64, device=device) for _ in range(4)]
    inputs = [s, *idx]
    b = _Builder()
    names = ("s", "b", "h", "qi", "kj")
    for name, t in zip(names, inputs, strict=True):
        b.keep.append(t)
        b.env[id(t)] = _Val(name, t.dtype, True, "one" if name == "s" else None)
    rec = _Recorder()
    try:
        with rec:
            out = score_mod(*inputs)
    except Unsupported:
        raise
    except Exception as err:  # noqa: BLE001 - a Python-level trace failure is the reason
        raise Unsupported(f"it cannot be recorded ({type(err).__name__}: {err})") from None
    b.snap = rec.snap
    for func, args, kwargs, res, versions in rec.ops:
        tensors = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
        if not any(id(a) in b.env and b.env[id(a)].dyn for a in tensors):
            continue  # a constant: read as a table where used
        if not isinstance(res, torch.Tensor):
            raise Unsupported(f"data-dependent control flow or a value read out ({func})")
        b.versions = versions
        v = _op(b, func, args, kwargs, res)
        b.keep.append(res)
        b.env[id(res)] = v
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise Unsupported("it must return one value per score")
    b.versions = {}
    res = b.val(out)
    b.elementwise(res)
    return Compiled(_source(b, res), b.floats, b.ints, b.gathers)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _source(b: _Builder, res: _Val) -> str:
    val = _cast(res, torch.float32)
    der = f"({res.der}).to(tl.float32)" if res.der else "tl.full(s.shape, 0.0, tl.float32)"
    value_lines = [f"    {line}" for line, d in b.lines if not d]
    all_lines = [f"    {line}" for line, _ in b.lines]
    head = "(s, b, h, qi, kj, MODF, MODI, FAST: tl.constexpr)"
    fwd = [
        "@triton.jit",
        f"def _mod_fwd{head}:",
        "    qi = qi.to(tl.int32)",
        "    kj = kj.to(tl.int32)",
        *value_lines,
        f"    return tl.broadcast_to({val}, s.shape)",
    ]
    bwd = [
        "@triton.jit",
        f"def _mod_bwd{head}:",
        "    qi = qi.to(tl.int32)",
        "    kj = kj.to(tl.int32)",
        "    one = tl.full(s.shape, 1.0, tl.float32)",
        *all_lines,
        f"    return tl.broadcast_to({val}, s.shape), tl.broadcast_to({der}, s.shape)",
    ]
    return "\n".join(fwd + ["", ""] + bwd) + "\n"


def compiled_for(variant, device) -> Compiled | str:
    """The call's compiled score_mod (recorded once per call: kept in the variant's memo,
    which the blocks of one call share), or the reason it cannot be."""
    key = ("triton_mod", str(torch.device(device)))
    memo = variant.memo
    if key not in memo:
        try:
            memo[key] = compile_mod(variant.score_mod, device)
        except Unsupported as err:
            memo[key] = f"cannot compile this score_mod: {err}"
    return memo[key]
