"""A score_mod read as an expression: the user's function run once on symbols.

Sampling a function never proves what it is between the samples: a clamp at 5 agrees
with a scale on every score below 5, a term ``3 * ((q_idx - kv_idx) == 1)`` is zero at
almost every position. So the recogniser does not sample the score_mod; it calls it
once on :class:`Form` values: the score is the symbol ``x``, a custom input whose
entries are all equal is its number, and the positions ``b, h, q_idx, kv_idx`` and
custom inputs that vary are opaque *positional* symbols. Every operation maps forms to
forms exactly, within a small closed set (``c, d, a, e`` numbers)::

    affine   c x + d                  (c = 0: a constant)
    tanh     a tanh(c x + d) + e
    sigmoid  a sigmoid(c x + d) + e
    relu     a relu(c x) + e          (relu: max(., 0), clamp(min=0), torch.relu)

Whatever leaves that set (a product of two scores, ``exp`` of the score, a clamp at a
bound other than 0, a comparison, ``torch.where``, a tensor the function closes over,
indexing) gives an opaque form: ``positional`` when a positional symbol took part,
``other`` otherwise. A form's numbers are the user's own arithmetic on the same
constants, so a recognised form is the score_mod on the whole domain; an opaque one is
run as written. Tensors the function closes over are never read: they may change
between calls (only custom inputs are read, and at every call).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

_EXACT = ("affine", "tanh", "sigmoid", "relu")
_OUTER = ("tanh", "sigmoid", "relu")  # a * f(inner) + e


class Opaque(TypeError):
    """Raised where Python needs a plain value of a form (``bool``, ``int``, indexing):
    control flow on the score or the positions. ``kind`` is the form's."""

    def __init__(self, kind: str):
        super().__init__(f"a {kind} symbol has no plain value")
        self.kind = kind


def _real(x) -> float | None:
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return float(x)
    return None


def _lift(x) -> Form | None:
    """A form for a form or a finite number; None for anything else (a tensor)."""
    if isinstance(x, Form):
        return x
    k = _real(x)
    return None if k is None else Form("affine", 0.0, k)


def _opaque(*xs) -> Form:
    positional = any(isinstance(x, Form) and x.kind == "positional" for x in xs)
    return Form("positional" if positional else "other")


def _const(value) -> Form:
    k = _real(value)
    return Form("affine", 0.0, k) if k is not None else Form("other")


class Form:
    """One value of the traced expression (module docstring); ``kind`` is one of
    ``affine``, ``tanh``, ``sigmoid``, ``relu``, ``positional``, ``other``."""

    __slots__ = ("kind", "c", "d", "a", "e")

    def __init__(self, kind: str, c: float = 0.0, d: float = 0.0, a: float = 1.0, e: float = 0.0):
        self.kind, self.c, self.d, self.a, self.e = kind, c, d, a, e

    @property
    def const(self) -> float | None:
        """The number, for a constant; else None."""
        return self.d if self.kind == "affine" and self.c == 0.0 else None

    def __repr__(self) -> str:
        if self.kind == "affine":
            return f"Form({self.c!r} x + {self.d!r})"
        if self.kind in _OUTER:
            return f"Form({self.a!r} {self.kind}({self.c!r} x + {self.d!r}) + {self.e!r})"
        return f"Form({self.kind})"

    # -- arithmetic ------------------------------------------------------------------
    def _scaled(self, k: float, divide: bool = False) -> Form:
        op = operator.truediv if divide else operator.mul
        if self.kind == "affine":
            return Form("affine", op(self.c, k), op(self.d, k))
        return Form(self.kind, self.c, self.d, op(self.a, k), op(self.e, k))

    def _add(self, other) -> Form:
        g = _lift(other)
        if g is None or self.kind not in _EXACT or g.kind not in _EXACT:
            return _opaque(self, other)
        if self.kind == g.kind == "affine":
            return Form("affine", self.c + g.c, self.d + g.d)
        for p, q in ((self, g), (g, self)):
            if q.const is not None and p.kind in _OUTER:
                return Form(p.kind, p.c, p.d, p.a, p.e + q.const)
        return _opaque(self, g)

    def _mul(self, other) -> Form:
        g = _lift(other)
        if g is None or self.kind not in _EXACT or g.kind not in _EXACT:
            return _opaque(self, other)
        if g.const is not None:
            return self._scaled(g.const)
        if self.const is not None:
            return g._scaled(self.const)
        return _opaque(self, g)

    def __add__(self, o):
        return self._add(o)

    __radd__ = __add__

    def __sub__(self, o):
        g = _lift(o)
        return self._add(-g) if g is not None else _opaque(self, o)

    def __rsub__(self, o):
        return (-self)._add(o)

    def __mul__(self, o):
        return self._mul(o)

    __rmul__ = __mul__

    def __truediv__(self, o):
        g = _lift(o)
        if g is None or g.const in (None, 0.0) or self.kind not in _EXACT:
            return _opaque(self, o)
        return self._scaled(g.const, divide=True)

    def __rtruediv__(self, o):
        k = _real(o)
        if k is None or self.const in (None, 0.0):
            return _opaque(self, o)
        return _const(k / self.const)

    def __pow__(self, o):
        g = _lift(o)
        if g is None or self.const is None or g.const is None:
            return _opaque(self, o)
        try:
            return _const(self.const**g.const)
        except (OverflowError, ZeroDivisionError):
            return Form("other")

    def __rpow__(self, o):
        g = _lift(o)
        return g.__pow__(self) if g is not None else _opaque(self, o)

    def __neg__(self):
        return self._scaled(-1.0) if self.kind in _EXACT else self

    def _compare(self, o):
        return _opaque(self, o)

    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _compare
    __and__ = __or__ = __xor__ = __rand__ = __ror__ = __mod__ = __floordiv__ = _compare
    __hash__ = None  # type: ignore[assignment]

    def _plain(self, *_):
        raise Opaque(self.kind)

    __bool__ = __index__ = __int__ = __float__ = _plain

    # -- functions (the SymbolScalar methods a score_mod may call) -------------------
    def _squash(self, kind: str, fn) -> Form:
        if self.const is not None:
            return _const(fn(torch.tensor(self.const, dtype=torch.float64)).item())
        if self.kind == "affine":
            return Form(kind, self.c, self.d)
        return _opaque(self)

    def tanh(self):
        return self._squash("tanh", torch.tanh)

    def sigmoid(self):
        return self._squash("sigmoid", torch.sigmoid)

    def _of_const(self, fn) -> Form:
        if self.const is None:
            return _opaque(self)
        return _const(fn(torch.tensor(self.const, dtype=torch.float64)).item())

    def abs(self):
        return self._of_const(torch.abs)

    def exp(self):
        return self._of_const(torch.exp)

    def exp2(self):
        return self._of_const(torch.exp2)

    def log(self):
        return self._of_const(torch.log)

    def sqrt(self):
        return self._of_const(torch.sqrt)

    def relu(self) -> Form:
        if self.const is not None:
            return _const(max(self.const, 0.0))
        if self.kind == "affine" and self.d == 0.0:
            return Form("relu", self.c, 0.0)
        return _opaque(self)

    def max(self, other):
        g = _lift(other)
        if g is None:
            return _opaque(self, other)
        if g.const == 0.0:
            return self.relu()
        if self.const == 0.0:
            return g.relu()
        if self.const is not None and g.const is not None:
            return _const(max(self.const, g.const))
        return _opaque(self, g)

    def min(self, other):
        g = _lift(other)
        if g is not None and self.const is not None and g.const is not None:
            return _const(min(self.const, g.const))
        return _opaque(self, other)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _UNARY and len(args) == 1 and isinstance(args[0], Form):
            if kwargs.pop("inplace", False) or kwargs:
                return _opaque(*args)
            return getattr(args[0], _UNARY[func])()
        if func in _BINARY and len(args) == 2 and not kwargs:
            x, y = args
            if isinstance(x, Form) or isinstance(y, Form):
                x = _lift(x)
                return _opaque(*args) if x is None else _BINARY[func](x, y)
        if func in _CLAMPS and args and isinstance(args[0], Form):
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
            if hi is None and _real(lo) == 0.0 and set(kwargs) <= {"min", "max"}:
                return args[0].relu()
        flat = list(args) + list(kwargs.values())
        flat += [y for x in flat if isinstance(x, (list, tuple)) for y in x]
        return _opaque(*flat)


_UNARY = {
    torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.relu: "relu",
    torch.Tensor.relu: "relu",
    torch.nn.functional.relu: "relu",
    torch.abs: "abs",
    torch.exp: "exp",
    torch.log: "log",
    torch.sqrt: "sqrt",
}
_BINARY = {
    torch.add: operator.add,
    torch.Tensor.add: operator.add,
    torch.sub: operator.sub,
    torch.Tensor.sub: operator.sub,
    torch.mul: operator.mul,
    torch.Tensor.mul: operator.mul,
    torch.div: operator.truediv,
    torch.Tensor.div: operator.truediv,
    torch.maximum: Form.max,
    torch.Tensor.maximum: Form.max,
    torch.minimum: Form.min,
    torch.Tensor.minimum: Form.min,
}
_CLAMPS = (torch.clamp, torch.Tensor.clamp, torch.clip, torch.clamp_min, torch.Tensor.clamp_min)


def read_form(score_mod, custom, constants: dict[str, float | None]) -> Form:
    """The form of ``score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx)`` when
    custom input ``name`` is the number ``constants[name]`` (None: it varies over the
    positions). A function that fails on forms (control flow on a symbol, a method the
    forms lack) is opaque; it is run as written, where its own errors surface."""
    pos = Form("positional")
    values = {n: pos if k is None else Form("affine", 0.0, k) for n, k in constants.items()}
    try:
        got = score_mod(Form("affine", 1.0, 0.0), custom.bound(values), pos, pos, pos, pos)
    except Opaque as err:
        return Form(err.kind)
    except Exception:  # noqa: BLE001 - the user's function, not recognised; run as written
        return Form("other")
    form = _lift(got)
    return form if form is not None else Form("other")
