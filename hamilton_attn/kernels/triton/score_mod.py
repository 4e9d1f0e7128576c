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
- Arithmetic runs in float32 (float64 / float16 / bfloat16 values included) and in
  32-bit integers (torch: int64), so integer results past 2^31 differ. A table index
  out of range reads 0 (torch raises); negative indices count from the end as in torch.
- Refused (:func:`compile_mod` returns the reason; ``auto`` then takes flex or the
  reference): data-dependent control flow, an op outside :data:`OPS`, a table that
  requires grad (flex and the reference differentiate it), a non-scalar tensor used
  elementwise, an output that is not one value per score.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: What ``auto`` does with a score_mod it can compile: True puts the triton kernel first
#: (as for the other variants), False keeps flex first for softmax and the reference for
#: sigmoid / relu. True since a GPU run timed them (H100, bf16, 32 heads, D 128, forward /
#: forward+backward TF/s, results/triton_score_mod_H100_2026-12-05_s12.md): a relative
#: bias on causal 32K 450 / 416 against compiled flex's 360 / 261, on 64-512-token
#: documents 170 / 120 against 100 / 34; flex cannot run sigmoid / relu at all.
AUTO = True


def source_key(source: str) -> str:
    """A short name of a compiled score_mod's source (one kernels module per source)."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


class Unsupported(Exception):
    """Why a score_mod cannot be compiled (the message is the reason)."""


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


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


@dataclass
class _Val:
    expr: str  # a Triton expression (a name, a literal, a load)
    dtype: torch.dtype
    dyn: bool  # depends on the inputs
    der: str | None = None  # d/ds, None for 0
    table: tuple | None = None  # (kind 'f' / 'i', offset, shape) for constant tensors


def _ty(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "tl.int1"
    if dtype.is_complex:
        raise Unsupported(f"complex values ({dtype})")
    return "tl.float32" if dtype.is_floating_point else "tl.int32"


def _cast(v: _Val, dtype: torch.dtype) -> str:
    """``v`` in ``dtype``'s compute type."""
    if _ty(v.dtype) == _ty(dtype):
        return v.expr
    if dtype == torch.bool:
        return f"({v.expr} != 0)"
    return f"({v.expr}).to({_ty(dtype)})"


def _sum(*terms) -> str | None:
    terms = [t for t in terms if t is not None]
    return " + ".join(f"({t})" for t in terms) if terms else None


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

    # -- values ---------------------------------------------------------------------------

    def new(self, expr: str, dtype, der: str | None = None) -> _Val:
        name = f"v{self.n}"
        self.lines.append((f"{name} = ({expr}).to({_ty(dtype)})", False))
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
        dest.append(t.detach().clone())  # the value at its first use (a later in-place
        # change of the closure's tensor within the recording must not reach the kernel)
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
            if v is None:  # captured by the closure: a table of values
                self.keep.append(x)
                v = self.env[id(x)] = self.table(x)
            return v
        return self.scalar(x)

    def elementwise(self, v: _Val) -> _Val:
        """``v`` as an operand of an elementwise op: one value per score."""
        if v.table is not None and math.prod(v.table[2]) != 1:
            raise Unsupported(f"a tensor of shape {list(v.table[2])} used elementwise")
        return v


def _lit(x: float) -> str:
    return repr(float(x))


def _unary(b: _Builder, name: str, a: _Val, od) -> _Val:
    x = _cast(a, od) if od.is_floating_point else a.expr
    da = a.der
    if name == "neg":
        return b.new(f"-{x}", od, None if da is None else f"-{da}")
    if name == "abs":
        sign = f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        return b.new(f"tl.abs({x})", od, None if da is None else f"{da} * {sign}")
    if name in ("floor", "ceil", "round", "trunc", "sign", "sgn"):
        expr = {
            "floor": f"tl.floor({x})",
            "ceil": f"tl.ceil({x})",
            "trunc": f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))",
            "sign": f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0))",
            "sgn": f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0))",
        }.get(name)
        if expr is None:
            raise Unsupported("round (half-to-even) is not compiled")
        keeps = name in ("floor", "ceil", "trunc")  # of integers: the integers themselves
        return b.new(x if keeps and not od.is_floating_point else expr, od, None)
    if not od.is_floating_point:
        raise Unsupported(f"{name} of integers")
    out = {
        "exp": f"tl.exp({x})",
        "exp2": f"tl.exp2({x})",
        "log": f"tl.log({x})",
        "log2": f"tl.log2({x})",
        "sqrt": f"tl.sqrt({x})",
        "rsqrt": f"tl.rsqrt({x})",
        "sin": f"tl.sin({x})",
        "cos": f"tl.cos({x})",
        "tanh": f"_tanh({x}, FAST)",
        "sigmoid": f"1.0 / (1.0 + tl.exp(-{x}))",
        "relu": f"tl.maximum({x}, 0.0)",
        "reciprocal": f"1.0 / {x}",
    }[name]
    v = b.new(out, od)
    if da is not None:
        y = v.expr
        d = {
            "exp": f"{da} * {y}",
            "exp2": f"{da} * {y} * 0.6931471805599453",
            "log": f"{da} / {x}",
            "log2": f"{da} / ({x} * 0.6931471805599453)",
            "sqrt": f"{da} * 0.5 / {y}",
            "rsqrt": f"{da} * -0.5 * {y} * {y} * {y}",
            "sin": f"{da} * tl.cos({x})",
            "cos": f"-{da} * tl.sin({x})",
            "tanh": f"{da} * (1.0 - {y} * {y})",
            "sigmoid": f"{da} * {y} * (1.0 - {y})",
            "relu": f"tl.where({x} > 0, {da}, 0.0)",
            "reciprocal": f"-{da} * {y} * {y}",
        }[name]
        v.der = f"d{v.expr[1:]}"
        b.lines.append((f"{v.der} = ({d}).to(tl.float32)", True))
    return v


_UNARY = {
    "neg", "abs", "floor", "ceil", "round", "trunc", "sign", "sgn", "exp", "exp2", "log",
    "log2", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "reciprocal",
}  # fmt: skip
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_LOGICAL = {"logical_and": "&", "logical_or": "|", "logical_xor": "^"}
_BITWISE = {"bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}
_IDENTITY = {"clone", "alias", "detach", "lift_fresh", "lift_fresh_copy", "contiguous"}
_VIEWS = {
    "view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "permute",
    "transpose", "t", "broadcast_to", "expand_as", "view_as",
}  # fmt: skip
_LIKE = {"zeros_like": 0, "ones_like": 1}


def _floordiv(x: str, y: str) -> str:
    """Python's floor division of integers from C's truncating one."""
    return f"tl.where((({x}) % ({y}) != 0) & ((({x}) < 0) != (({y}) < 0)), ({x}) // ({y}) - 1, ({x}) // ({y}))"  # noqa: E501


def _op(b: _Builder, func, args, kwargs, out) -> _Val:
    name = func.overloadpacket.__name__
    over = func._overloadname
    if name.endswith("_") and not name.endswith("__"):
        # An alias made before the change would keep the old value in the recording.
        raise Unsupported(f"an in-place op on the scores or indices ({func})")
    od = out.dtype if isinstance(out, torch.Tensor) else None
    if od is None:
        raise Unsupported(f"data-dependent control flow or a value read out ({func})")
    if name in _IDENTITY or (name in _VIEWS and out.numel() == 1):
        return b.elementwise(b.val(args[0]))
    if name == "_to_copy" or (name == "to" and "dtype" in kwargs):
        a = b.elementwise(b.val(args[0]))
        v = b.new(_cast(a, od), od, a.der if od.is_floating_point else None)
        return v
    if name in _LIKE or name == "full_like":
        value = _LIKE.get(name, args[1] if len(args) > 1 else kwargs.get("fill_value"))
        c = b.scalar(float(value) if od.is_floating_point else int(value))
        return b.new(c.expr, od)
    if name == "scalar_tensor":
        c = b.scalar(float(args[0]) if od.is_floating_point else int(args[0]))
        return b.new(c.expr, od)
    if name == "index" and over == "Tensor":
        return _index(b, args[0], args[1], od)
    vals = [b.elementwise(b.val(a)) for a in args if isinstance(a, (torch.Tensor, int, float))]
    if name in _UNARY:
        return _unary(b, name, vals[0], od)
    if name in ("add", "sub", "rsub", "mul"):
        x, y = vals[0], vals[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        xs, ys = _cast(x, od), _cast(y, od)
        if alpha != 1:
            ys = f"({ys} * {_lit(alpha) if od.is_floating_point else int(alpha)})"
        dy = None if y.der is None else (y.der if alpha == 1 else f"{y.der} * {_lit(alpha)}")
        if od == torch.bool:  # torch's bool sum and product: or, and (1 + 1 is True)
            return b.new(f"({xs}) {'|' if name == 'add' else '&'} ({ys})", od)
        if name == "add":
            return b.new(f"{xs} + {ys}", od, _sum(x.der, dy))
        if name == "sub":
            return b.new(f"{xs} - {ys}", od, _sum(x.der, None if dy is None else f"-{dy}"))
        if name == "rsub":  # y - alpha x
            xs = _cast(x, od) if alpha == 1 else f"({_cast(x, od)} * {_lit(alpha)})"
            dx = None if x.der is None else (x.der if alpha == 1 else f"{x.der} * {_lit(alpha)}")
            return b.new(
                f"{_cast(y, od)} - {xs}", od, _sum(y.der, None if dx is None else f"-{dx}")
            )
        return b.new(
            f"{xs} * {ys}",
            od,
            _sum(
                None if x.der is None else f"{x.der} * {ys}",
                None if y.der is None else f"{xs} * {y.der}",
            ),
        )
    if name == "div":
        mode = kwargs.get("rounding_mode")
        x, y = vals[0], vals[1]
        if mode is None:
            xs, ys = _cast(x, od), _cast(y, od)
            v = b.new(f"{xs} / {ys}", od)
            d = _sum(
                None if x.der is None else f"{x.der} / {ys}",
                None if y.der is None else f"-{xs} * {y.der} / ({ys} * {ys})",
            )
            if d is not None:
                v.der = f"d{v.expr[1:]}"
                b.lines.append((f"{v.der} = ({d}).to(tl.float32)", True))
            return v
        return _rounded_div(b, x, y, od, mode)
    if name == "floor_divide":
        return _rounded_div(b, vals[0], vals[1], od, "floor")
    if name in ("remainder", "fmod"):
        x, y = vals[0], vals[1]
        xs, ys = _cast(x, od), _cast(y, od)
        if od.is_floating_point:  # x - q y: d = dx - q dy (q, the rounded quotient, is flat)
            if name == "fmod":
                q = f"tl.where({xs} / {ys} < 0, tl.ceil({xs} / {ys}), tl.floor({xs} / {ys}))"
            else:
                q = f"tl.floor({xs} / {ys})"
            dy = None if y.der is None else f"-({q}) * {y.der}"
            return b.new(f"{xs} - ({q}) * {ys}", od, _sum(x.der, dy))
        if name == "fmod":
            return b.new(f"{xs} % {ys}", od)
        r = f"({xs} % {ys})"
        return b.new(f"tl.where(({r} != 0) & (({r} < 0) != ({ys} < 0)), {r} + {ys}, {r})", od)
    if name == "pow" and over == "Tensor_Scalar":
        return _pow(b, vals[0], args[1], od)
    if name in ("maximum", "minimum", "fmax", "fmin"):
        x, y = vals[0], vals[1]
        xs, ys = _cast(x, od), _cast(y, od)
        big = name in ("maximum", "fmax")
        op, fn = (">", "tl.maximum") if big else ("<", "tl.minimum")
        v = b.new(f"{fn}({xs}, {ys})", od)
        if x.der is not None or y.der is not None:
            dx, dy = x.der or "0.0", y.der or "0.0"
            d = f"tl.where({xs} {op} {ys}, {dx}, tl.where({xs} == {ys}, 0.5 * ({dx} + {dy}), {dy}))"
            v.der = f"d{v.expr[1:]}"
            b.lines.append((f"{v.der} = ({d}).to(tl.float32)", True))
        return v
    if name in ("clamp", "clamp_min", "clamp_max"):
        x = vals[0]
        if name == "clamp":
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
        else:
            lo, hi = (args[1], None) if name == "clamp_min" else (None, args[1])
        # min(max(x, lo), hi) as torch computes it; the derivative follows the branch
        # taken (x on ties, as torch's clamp), a bound's own where it wins.
        expr, der = _cast(x, od), x.der
        for bound, fn, keeps in ((lo, "tl.maximum", ">="), (hi, "tl.minimum", "<=")):
            if bound is None:
                continue
            c = b.elementwise(b.val(bound))
            cs = _cast(c, od)
            if der is not None or c.der is not None:
                der = f"tl.where({expr} {keeps} {cs}, {der or '0.0'}, {c.der or '0.0'})"
            v = b.new(f"{fn}({expr}, {cs})", od, der)
            expr, der = v.expr, v.der
        return b.new(expr, od, der)
    if name in _COMPARE:
        ct = torch.result_type(args[0], args[1])
        return b.new(f"{_cast(vals[0], ct)} {_COMPARE[name]} {_cast(vals[1], ct)}", od)
    if name in _LOGICAL:
        x, y = (_cast(v, torch.bool) for v in vals[:2])
        return b.new(f"{x} {_LOGICAL[name]} {y}", od)
    if name == "logical_not":
        return b.new(f"{_cast(vals[0], torch.bool)} == 0", od)
    if name in _BITWISE:
        return b.new(f"{_cast(vals[0], od)} {_BITWISE[name]} {_cast(vals[1], od)}", od)
    if name == "bitwise_not":
        x = _cast(vals[0], od)
        return b.new(f"{x} == 0" if od == torch.bool else f"~{x}", od)
    if name == "where" and over == "self":
        c = _cast(vals[0], torch.bool)
        x, y = vals[1], vals[2]
        der = None
        if x.der is not None or y.der is not None:
            der = f"tl.where({c}, {x.der or '0.0'}, {y.der or '0.0'})"
        return b.new(f"tl.where({c}, {_cast(x, od)}, {_cast(y, od)})", od, der)
    raise Unsupported(f"the op {func} has no compiled form")


def _rounded_div(b: _Builder, x: _Val, y: _Val, od, mode: str) -> _Val:
    if od.is_floating_point:
        q = f"{_cast(x, od)} / {_cast(y, od)}"
        expr = (
            f"tl.floor({q})"
            if mode == "floor"
            else f"tl.where({q} < 0, tl.ceil({q}), tl.floor({q}))"
        )
        return b.new(expr, od)
    xs, ys = _cast(x, od), _cast(y, od)
    return b.new(_floordiv(xs, ys) if mode == "floor" else f"{xs} // {ys}", od)


def _pow(b: _Builder, x: _Val, e, od) -> _Val:
    xs = _cast(x, od)
    powers = {1: "{x}", 2: "{x} * {x}", 3: "{x} * {x} * {x}", 4: "({x} * {x}) * ({x} * {x})",
              -1: "1.0 / {x}", -2: "1.0 / ({x} * {x})", 0.5: "tl.sqrt({x})"}  # fmt: skip
    if (
        e not in powers
        or (e < 0 and not od.is_floating_point)
        or (e == 0.5 and not od.is_floating_point)
    ):
        raise Unsupported(f"pow with exponent {e!r} (compiled: 1, 2, 3, 4, -1, -2, 0.5)")
    v = b.new(powers[e].format(x=xs), od)
    if x.der is not None:
        d = (
            f"{x.der} * 0.5 / {v.expr}"
            if e == 0.5
            else f"{x.der} * {_lit(e)} * "
            + ("1.0" if e == 1 else powers.get(e - 1, "1.0 / ({x} * {x} * {x})").format(x=xs))
        )
        v.der = f"d{v.expr[1:]}"
        b.lines.append((f"{v.der} = ({d}).to(tl.float32)", True))
    return v


def _index(b: _Builder, src, indices, od) -> _Val:
    t = b.val(src)
    if t.dyn or t.table is None:
        raise Unsupported("indexing a value computed from the scores or indices")
    kind, off, shape = t.table
    if len(indices) != len(shape) or any(i is None for i in indices):
        raise Unsupported(f"indexing a table of shape {list(shape)} with {len(indices)} indices")
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    terms, valid = [], []
    for d, ix in enumerate(indices):
        iv = b.elementwise(b.val(ix))
        if iv.der is not None or iv.dtype.is_floating_point or iv.dtype == torch.bool:
            raise Unsupported("a table index that is not an integer")
        i = b.new(_cast(iv, torch.int32), torch.int32)
        w = b.new(f"tl.where({i.expr} < 0, {i.expr} + {shape[d]}, {i.expr})", torch.int32)
        valid.append(f"({w.expr} >= 0) & ({w.expr} < {shape[d]})")
        terms.append(f"{w.expr} * {strides[d]}")
    ok = " & ".join(valid) if valid else "True"
    ptr = "MODF" if kind == "f" else "MODI"
    safe = f"tl.where({ok}, {' + '.join(terms) or '0'}, 0)"
    b.gathers += 1
    load = f"tl.load({ptr} + {off} + {safe}, mask={ok}, other=0)"
    if od == torch.bool:
        load = f"({load} != 0)"
    return b.new(load, od)


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
    for func, args, kwargs, res in rec.ops:
        tensors = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
        if not any(id(a) in b.env and b.env[id(a)].dyn for a in tensors):
            continue  # a constant: read as a table where used
        if not isinstance(res, torch.Tensor):
            raise Unsupported(f"data-dependent control flow or a value read out ({func})")
        v = _op(b, func, args, kwargs, res)
        b.keep.append(res)
        b.env[id(res)] = v
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise Unsupported("it must return one value per score")
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
