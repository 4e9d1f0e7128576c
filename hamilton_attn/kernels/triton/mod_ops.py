"""How each recorded aten op of a score_mod becomes Triton source: values in float32
(float16 / bfloat16 rounded as torch stores them) and 32-bit integers, derivatives in
the score by forward-mode rules that follow torch's backward (a selection that passes no
gradient stays 0, torch's tie and NaN rules). Used by :mod:`.score_mod`'s builder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .score_mod import _Builder


class Unsupported(Exception):
    """Why a score_mod cannot be compiled (the message is the reason)."""


@dataclass
class _Val:
    expr: str  # a Triton expression (a name, a literal, a load)
    dtype: torch.dtype
    dyn: bool  # depends on the inputs
    der: str | None = None  # d/ds, None for 0
    table: tuple | None = None  # (kind 'f' / 'i', offset, shape) for constant tensors


_INTS = (torch.int32, torch.int64)


def _ty(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "tl.int1"
    if dtype.is_complex:
        raise Unsupported(f"complex values ({dtype})")
    if dtype.is_floating_point:
        return "tl.float32"
    if dtype not in _INTS:
        raise Unsupported(f"{dtype} values (integers are computed in 32 bits, which do not "
                          f"wrap as {dtype} does)")  # fmt: skip
    return "tl.int32"


def _guard(d: str, expr: str) -> str:
    """A derivative term ``expr`` (``d`` times a factor) that is 0 where ``d`` is: torch's
    backward never forms 0 x inf where a selection (relu, clamp, where) passed no
    gradient (the derivative of sqrt(relu(s)) at s < 0 is 0, not NaN)."""
    return f"tl.where({d} == 0.0, 0.0, {expr})"


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
    if name == "relu" and not od.is_floating_point:
        return b.new(f"tl.maximum({x}, 0)", od)
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
        "relu": f"tl.where({x} < 0.0, 0.0, {x})",  # NaN stays NaN, as in torch
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
            "reciprocal": f"-{da} * {y} * {y}",
        }.get(name)
        d = f"tl.where({x} > 0, {da}, 0.0)" if name == "relu" else _guard(da, d)
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
#: float16 / bfloat16 values are computed in float32 and rounded (to nearest even) as
#: torch stores them after each op; bfloat16 by its bits (the interpreter has no bf16).
_ROUND = {
    torch.float16: "{x} = {x}.to(tl.float16).to(tl.float32)",
    torch.bfloat16: (
        "{x} = tl.where({x} != {x}, {x}, ((({x}).to(tl.int32, bitcast=True) + 32767 + "
        "((({x}).to(tl.int32, bitcast=True) >> 16) & 1)) & -65536).to(tl.float32, bitcast=True))"
    ),
}


def _bool_op(op: str, x: str, y: str) -> str:
    """``x op y`` of bools as a selection or a comparison: Triton 3.6's interpreter cannot
    ``&`` / ``|`` a scalar bool (a head's table entry) with a tensor of them."""
    if op == "&":
        return f"tl.where({x}, {y}, False)"
    if op == "|":
        return f"tl.where({x}, True, {y})"
    return f"({x}) != ({y})"


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
            return b.new(_bool_op("|" if name == "add" else "&", xs, ys), od)
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
                None if x.der is None else _guard(x.der, f"{x.der} * {ys}"),
                None if y.der is None else _guard(y.der, f"{xs} * {y.der}"),
            ),
        )
    if name == "div":
        mode = kwargs.get("rounding_mode")
        x, y = vals[0], vals[1]
        if mode is None:
            xs, ys = _cast(x, od), _cast(y, od)
            v = b.new(f"{xs} / {ys}", od)
            d = _sum(
                None if x.der is None else _guard(x.der, f"{x.der} / {ys}"),
                None if y.der is None else _guard(y.der, f"-{xs} * {y.der} / ({ys} * {ys})"),
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
        if od.is_floating_point:
            # C's fmod (Triton's float %), remainder from it as torch does; d = dx - q dy,
            # q torch's truncated (fmod) or floor (remainder) quotient, which is flat
            r = b.new(f"{xs} % {ys}", od)
            if name == "fmod":
                q = f"tl.where({xs} / {ys} < 0, tl.ceil({xs} / {ys}), tl.floor({xs} / {ys}))"
                expr = r.expr
            else:
                q = b.new(_float_floordiv(b, xs, ys, r.expr), od).expr
                fix = f"({r.expr} != 0) & (({r.expr} < 0) != ({ys} < 0))"
                expr = f"tl.where({fix}, {r.expr} + {ys}, {r.expr})"
            dy = None if y.der is None else _guard(y.der, f"-({q}) * {y.der}")
            return b.new(expr, od, _sum(x.der, dy))
        if name == "fmod":
            return b.new(f"{xs} % {ys}", od)
        r = f"({xs} % {ys})"
        return b.new(f"tl.where(({r} != 0) & (({r} < 0) != ({ys} < 0)), {r} + {ys}, {r})", od)
    if name == "pow" and over == "Tensor_Scalar":
        return _pow(b, vals[0], args[1], od)
    if name in ("maximum", "minimum", "fmax", "fmin"):
        x, y = vals[0], vals[1]
        xs, ys = _cast(x, od), _cast(y, od)
        v = b.new(_extreme(name, xs, ys, od), od)
        if x.der is not None or y.der is not None:
            dx, dy = x.der or "0.0", y.der or "0.0"
            op, inv = (">", "<") if name in ("maximum", "fmax") else ("<", ">")
            if name in ("fmax", "fmin"):  # torch: x's on ties, y's where x loses or y is NaN
                d = f"tl.where({ys} != {ys}, {dx}, tl.where({xs} {op}= {ys}, {dx}, {dy}))"
            else:  # torch: halves on ties, both where NaN
                d = (f"tl.where({xs} {op} {ys}, {dx}, tl.where({xs} {inv} {ys}, {dy}, "
                     f"tl.where({xs} == {ys}, 0.5 * ({dx} + {dy}), {dx} + {dy})))")  # fmt: skip
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
        # min(max(x, lo), hi) as torch computes it (NaN stays NaN); the derivative as
        # torch's: x's where lo <= x <= hi, a bound's where it wins (lo's only where
        # lo < hi, hi's where x > hi or hi < lo), none where x < lo == hi
        xs = _cast(x, od)
        cl = None if lo is None else b.elementwise(b.val(lo))
        ch = None if hi is None else b.elementwise(b.val(hi))
        ls = None if cl is None else _cast(cl, od)
        hs = None if ch is None else _cast(ch, od)
        expr = xs if ls is None else _extreme("maximum", xs, ls, od)
        expr = expr if hs is None else _extreme("minimum", expr, hs, od)
        ders = [x.der] + [c.der for c in (cl, ch) if c is not None]
        der = None
        if any(d is not None for d in ders):
            dx = x.der or "0.0"
            dl = (cl.der if cl is not None else None) or "0.0"
            dh = (ch.der if ch is not None else None) or "0.0"
            if ls is not None and hs is not None:  # nested selections, as in _extreme
                der = (f"tl.where({xs} >= {ls}, tl.where({xs} <= {hs}, {dx}, {dh}), "
                       f"tl.where({ls} < {hs}, {dl}, tl.where({xs} > {hs}, {dh}, "
                       f"tl.where({hs} < {ls}, {dh}, 0.0))))")  # fmt: skip
            elif ls is not None:
                der = f"tl.where({xs} >= {ls}, {dx}, {dl})"
            else:
                der = f"tl.where({xs} <= {hs}, {dx}, {dh})"
        return b.new(expr, od, der)
    if name in _COMPARE:
        ct = torch.result_type(args[0], args[1])
        return b.new(f"{_cast(vals[0], ct)} {_COMPARE[name]} {_cast(vals[1], ct)}", od)
    if name in _LOGICAL:
        x, y = (_cast(v, torch.bool) for v in vals[:2])
        return b.new(_bool_op(_LOGICAL[name], x, y), od)
    if name == "logical_not":
        return b.new(f"{_cast(vals[0], torch.bool)} == 0", od)
    if name in _BITWISE:
        x, y = _cast(vals[0], od), _cast(vals[1], od)
        if od == torch.bool:
            return b.new(_bool_op(_BITWISE[name], x, y), od)
        return b.new(f"{x} {_BITWISE[name]} {y}", od)
    if name == "bitwise_not":
        x = _cast(vals[0], od)
        return b.new(f"{x} == 0" if od == torch.bool else f"~{x}", od)
    if name == "masked_fill":  # where(mask, value, x)
        x, c, y = vals[0], _cast(vals[1], torch.bool), vals[2]
        der = None
        if x.der is not None or y.der is not None:
            der = f"tl.where({c}, {y.der or '0.0'}, {x.der or '0.0'})"
        return b.new(f"tl.where({c}, {_cast(y, od)}, {_cast(x, od)})", od, der)
    if name == "where" and over == "self":
        c = _cast(vals[0], torch.bool)
        x, y = vals[1], vals[2]
        der = None
        if x.der is not None or y.der is not None:
            der = f"tl.where({c}, {x.der or '0.0'}, {y.der or '0.0'})"
        return b.new(f"tl.where({c}, {_cast(x, od)}, {_cast(y, od)})", od, der)
    raise Unsupported(f"the op {func} has no compiled form")


def _float_floordiv(b: _Builder, xs: str, ys: str, r: str) -> str:
    """torch's floor division of floats from ``r = fmod(x, y)`` (``(x - r) / y``, one less
    where r and y differ in sign, rounded to the nearest integer; x / y where y is 0), so
    ``1.0 // 0.1`` is 9 as in torch and Python, not floor(1 / 0.1) = 10."""
    one = f"tl.where(({r} != 0) & (({r} < 0) != ({ys} < 0)), 1.0, 0.0)"
    div = b.new(f"({xs} - {r}) / {ys} - {one}", torch.float32).expr
    fl = b.new(f"tl.floor({div})", torch.float32).expr
    near = f"tl.where({div} - {fl} > 0.5, {fl} + 1.0, {fl})"
    zero = f"tl.where({xs} / {ys} < 0, -0.0, 0.0)"
    return f"tl.where({ys} == 0, {xs} / {ys}, tl.where({div} != 0, {near}, {zero}))"


def _extreme(name: str, xs: str, ys: str, od) -> str:
    """torch's maximum / minimum (NaN if either is) and fmax / fmin (NaN only if both are)
    of floats; Triton's own for integers and bools."""
    if not od.is_floating_point:
        return f"tl.{'maximum' if name in ('maximum', 'fmax') else 'minimum'}({xs}, {ys})"
    # nested selections, no bool | : Triton 3.6's interpreter cannot or a scalar bool
    # with a tensor of them
    op = ">" if name in ("maximum", "fmax") else "<"
    pick = f"tl.where({xs} {op} {ys}, {xs}, {ys})"  # y where y is NaN
    if name in ("maximum", "minimum"):
        return f"tl.where({xs} != {xs}, {xs}, {pick})"
    return f"tl.where({ys} != {ys}, {xs}, {pick})"


def _rounded_div(b: _Builder, x: _Val, y: _Val, od, mode: str) -> _Val:
    if od.is_floating_point:
        xs, ys = _cast(x, od), _cast(y, od)
        if mode == "floor":
            r = b.new(f"{xs} % {ys}", od)
            return b.new(_float_floordiv(b, xs, ys, r.expr), od)
        q = f"{xs} / {ys}"
        return b.new(f"tl.where({q} < 0, tl.ceil({q}), tl.floor({q}))", od)
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
        d = _guard(
            x.der,
            f"{x.der} * 0.5 / {v.expr}"
            if e == 0.5
            else f"{x.der} * {_lit(e)} * "
            + ("1.0" if e == 1 else powers.get(e - 1, "1.0 / ({x} * {x} * {x})").format(x=xs)),
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
