"""AttentionEngine's symbolic types, evaluated on real tensors.

In AttentionEngine a user's ``score_mod`` and online methods receive symbolic values
(``SymbolScalar``: a per-row scalar, ``SymbolicArray``: a block of scores) and build an
expression that its code generator lowers. Here the same methods are *evaluated*: every
value wraps a tensor (or a Python number) and each operator computes at once. The
recogniser calls the methods on small float64 probes, the blockwise path on the real
blocks; both see exactly what the user wrote.

Shapes while evaluating (legend: B batch, H query heads, R rows of a block, N keys of a
block, DV value head dim): scores ``[B, H, R, N]``, a row scale ``[B, H, R, 1]``, the
output accumulator ``[B, H, R, DV]``; the index arguments ``b, h, q_idx, kv_idx`` are
int64 tensors broadcastable to the scores (global token indices).

A :class:`SymbolicArray` remembers which of its entries are visible (the block mask):
``get_reduce`` reduces over visible keys only, so a masked pair never enters a row's
sum or max, whatever ``mask_value`` says.
"""

from __future__ import annotations

import math

import torch

_REDUCES = ("sum", "max", "abssum", "min")


class Var:
    """A named value: a number (``Var("-inf")``, ``Var("0.0")``, ``Var("1")``) is the
    initial value of a row scale; any other name is a free symbol, which cannot be
    evaluated."""

    def __init__(self, name):
        self.name = str(name)
        try:
            self.number: float | None = float(self.name)
        except ValueError:
            self.number = None

    def __repr__(self) -> str:
        return f"Var({self.name!r})"


def _data(x):
    """The tensor or number inside ``x`` (a symbolic value, a tensor or a number)."""
    if isinstance(x, SymbolScalar):
        return x.value
    if isinstance(x, (torch.Tensor, int, float, bool)):
        return x
    raise TypeError(f"expected a SymbolScalar, a tensor or a number, got {type(x).__name__}")


def _visible_of(*xs):
    for x in xs:
        if isinstance(x, SymbolicArray) and x.visible is not None:
            return x.visible
    return None


def _wrap_like(result, *operands):
    """``result`` wrapped as an array when any operand is one (it keeps the visibility)."""
    if any(isinstance(x, SymbolicArray) for x in operands):
        return SymbolicArray("", result, visible=_visible_of(*operands))
    return SymbolScalar("", result)


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


class SymbolScalar:
    """A per-row value of an online function (a row scale, ``o_scale``, ``o``).

    Built by the user as ``SymbolScalar("m", Var("-inf"))`` (a declaration: its value is
    the Var's number) or by the engine around a tensor. Supports ``+ - * / ** // %``,
    unary ``-``, comparisons (``==`` too: elementwise, as on tensors), ``& | ~``,
    ``abs exp exp2 log tanh sigmoid sqrt``, ``max(other)`` / ``min(other)``
    (elementwise with another value or a number), and torch functions
    (``torch.exp(x)``) through ``__torch_function__``."""

    def __init__(self, varname: str = "", value=None, prev=None, shape_idx=None, require_grad=True):
        self.varname = varname
        self.shape_idx = shape_idx
        self.require_grad = require_grad
        self.code = value if isinstance(value, Var) else None
        if isinstance(value, Var):
            self._value = value.number
        elif value is None:
            self._value = None
        else:
            self._value = _data(value)

    @property
    def value(self):
        if self._value is None:
            what = f"{self.code!r}" if self.code is not None else "no value"
            raise ValueError(
                f"{self.varname or 'SymbolScalar'}: {what} has no number to evaluate; "
                'declare it with a numeric Var, e.g. Var("0.0") or Var("-inf")'
            )
        return self._value

    def tensor(self) -> torch.Tensor:
        return _as_tensor(self.value)

    def __repr__(self) -> str:
        v = self._value
        shown = f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
        return f"{type(self).__name__}({self.varname!r}, {shown})"

    # -- arithmetic ------------------------------------------------------------------
    def _bin(self, other, fn, reverse=False):
        a, b = _data(self), _data(other)
        a, b = (b, a) if reverse else (a, b)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = _as_tensor(a)
        return _wrap_like(fn(a, b), self, other)

    def __add__(self, o):
        return self._bin(o, lambda a, b: a + b)

    def __radd__(self, o):
        return self._bin(o, lambda a, b: a + b, True)

    def __sub__(self, o):
        return self._bin(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._bin(o, lambda a, b: a - b, True)

    def __mul__(self, o):
        return self._bin(o, lambda a, b: a * b)

    def __rmul__(self, o):
        return self._bin(o, lambda a, b: a * b, True)

    def __truediv__(self, o):
        return self._bin(o, lambda a, b: a / b)

    def __rtruediv__(self, o):
        return self._bin(o, lambda a, b: a / b, True)

    def __pow__(self, o):
        return self._bin(o, lambda a, b: a**b)

    def __rpow__(self, o):
        return self._bin(o, lambda a, b: a**b, True)

    def __neg__(self):
        return _wrap_like(-_as_tensor(self.value), self)

    def __lt__(self, o):
        return self._bin(o, lambda a, b: a < b)

    def __le__(self, o):
        return self._bin(o, lambda a, b: a <= b)

    def __gt__(self, o):
        return self._bin(o, lambda a, b: a > b)

    def __ge__(self, o):
        return self._bin(o, lambda a, b: a >= b)

    # Elementwise, as on tensors (so ``(q_idx - kv_idx) == 1`` is a tensor, not False).
    def __eq__(self, o):
        return self._bin(o, lambda a, b: a == b)

    def __ne__(self, o):
        return self._bin(o, lambda a, b: a != b)

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o):
        return self._bin(o, lambda a, b: a & b)

    def __rand__(self, o):
        return self._bin(o, lambda a, b: a & b, True)

    def __or__(self, o):
        return self._bin(o, lambda a, b: a | b)

    def __ror__(self, o):
        return self._bin(o, lambda a, b: a | b, True)

    def __invert__(self):
        return _wrap_like(~_as_tensor(self.value), self)

    def __mod__(self, o):
        return self._bin(o, lambda a, b: a % b)

    def __floordiv__(self, o):
        return self._bin(o, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError(
            "SymbolScalar: a symbolic value has no truth value (it holds a row of values); "
            "use torch.where or max/min instead of if"
        )

    # -- functions -------------------------------------------------------------------
    def _un(self, fn):
        return _wrap_like(fn(_as_tensor(self.value)), self)

    def abs(self):
        return self._un(torch.abs)

    def exp(self):
        return self._un(torch.exp)

    def exp2(self):
        return self._un(torch.exp2)

    def log(self):
        return self._un(torch.log)

    def tanh(self):
        return self._un(torch.tanh)

    def sigmoid(self):
        return self._un(torch.sigmoid)

    def sqrt(self):
        return self._un(torch.sqrt)

    def max(self, other):
        return self._bin(other, lambda a, b: torch.maximum(_as_tensor(a), _as_tensor(b)))

    def min(self, other):
        return self._bin(other, lambda a, b: torch.minimum(_as_tensor(a), _as_tensor(b)))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrapped = [a for a in list(args) + list(kwargs.values()) if isinstance(a, SymbolScalar)]

        def unwrap(x):
            if isinstance(x, SymbolScalar):
                return _as_tensor(x.value)
            if isinstance(x, (list, tuple)):
                return type(x)(unwrap(y) for y in x)
            return x

        out = func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        return _wrap_like(out, *wrapped) if isinstance(out, torch.Tensor) else out


class SymbolicArray(SymbolScalar):
    """A block of scores ``[B, H, R, N]``; ``visible`` (bool, broadcastable to it) marks
    the pairs the block mask lets through."""

    def __init__(self, varname: str = "", value=None, prev=None, shape_idx=None, *, visible=None):
        super().__init__(varname, value, prev, shape_idx)
        self.visible = visible

    def get_reduce(self, op: str):
        """A row reduction over the visible keys: ``"sum"``, ``"max"``, ``"abssum"``
        (sum of absolute values) or ``"min"``; returns a :class:`SymbolScalar`
        ``[B, H, R, 1]`` (a row that sees no key: 0 for the sums, -inf / inf)."""
        if op not in _REDUCES:
            raise ValueError(f"get_reduce: expected one of {_REDUCES}, got {op!r}")
        x = _as_tensor(self.value)
        vis = self.visible
        if op in ("sum", "abssum"):
            x = x.abs() if op == "abssum" else x
            x = x if vis is None else torch.where(vis, x, torch.zeros((), dtype=x.dtype))
            return SymbolScalar("", x.sum(-1, keepdim=True))
        fill = -math.inf if op == "max" else math.inf
        x = x if vis is None else torch.where(vis, x, torch.full((), fill, dtype=x.dtype))
        red = x.amax(-1, keepdim=True) if op == "max" else x.amin(-1, keepdim=True)
        return SymbolScalar("", red)


class SymbolicTensor(SymbolScalar):
    """A declared custom input: its name and declared shape (ints or the names
    ``"batch"``, ``"heads"``, ``"seq_len"``, ``"seq_len_kv"``); evaluated only once the
    engine binds a real tensor to it."""

    def __init__(self, varname: str, shape: tuple):
        super().__init__(varname, Var(varname))
        self.shape = tuple(shape)


class CustomIO:
    """The custom inputs of an engine: ``CustomIO({"softmax_bias": (1,)})``, name ->
    declared shape. At call time the tensors follow ``q, k, v`` in this order (or come
    by keyword), and ``custom_fwd_inputs.input_tensors[name]`` is the tensor at the
    current block's positions (broadcast like numpy against ``[B, H, Sq, Sk]``)."""

    def __init__(self, input_tensors: dict | None = None):
        input_tensors = {} if input_tensors is None else input_tensors
        if not isinstance(input_tensors, dict):
            raise ValueError(
                "custom_fwd_inputs: expected a dict of name -> shape, got "
                f"{type(input_tensors).__name__}"
            )
        self.input_tensors: dict[str, SymbolScalar] = {}
        for name, shape in input_tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"custom_fwd_inputs: names must be non-empty strings, got {name!r}"
                )
            if isinstance(shape, (int, str)):
                shape = (shape,)
            if not isinstance(shape, (tuple, list)) or len(shape) > 4:
                raise ValueError(
                    f"custom_fwd_inputs[{name!r}]: expected a shape of at most 4 dims, got {shape!r}"
                )
            self.input_tensors[name] = SymbolicTensor(name, tuple(shape))

    @property
    def names(self) -> list[str]:
        return list(self.input_tensors)

    def given(self, args, kwargs, arg: str, after: str) -> dict:
        """A call's custom inputs by name, from ``args`` (in declaration order, after
        ``after``) and ``kwargs``; ValueError naming ``arg`` for too many, an unknown
        name, one given twice or one missing."""
        names = self.names
        if len(args) > len(names):
            raise ValueError(
                f"{arg}: the engine takes {len(names)} custom inputs {names}, got "
                f"{len(args)} after {after}"
            )
        given = dict(zip(names, args))
        for n, x in kwargs.items():
            if n not in names:
                raise ValueError(f"{arg}: unknown input {n!r} (declared: {names})")
            if n in given:
                raise ValueError(f"{arg}: {n!r} given twice")
            given[n] = x
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"{arg}: missing {missing}")
        return given

    def bound(self, values: dict[str, SymbolScalar]) -> CustomIO:
        """A copy whose ``input_tensors`` hold ``values`` (what the user's score_mod sees)."""
        io = CustomIO()
        io.input_tensors = dict(values)
        return io

    def __repr__(self) -> str:
        shapes = {n: t.shape for n, t in self.input_tensors.items()}
        return f"CustomIO({shapes})"


def meta_tensor(*shape, dtype=torch.float32, **kwargs) -> torch.Tensor:
    """A tensor on the meta device that describes an input, ``meta_tensor(B, H, S, D,
    dtype=...)`` (AttentionEngine's order: heads before tokens)."""
    return torch.empty(*shape, dtype=dtype, device="meta", **kwargs)


def wrap(x, visible=None):
    """A tensor as the value the user's methods receive."""
    return SymbolicArray("", x, visible=visible) if visible is not None else SymbolScalar("", x)


def unwrap(x, like: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor of a value a user's method returned (numbers broadcast to ``like``)."""
    if isinstance(x, SymbolScalar):
        x = x.value
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = torch.tensor(float(x), dtype=like.dtype if like is not None else torch.float64)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a tensor, a SymbolScalar or a number, got {type(x).__name__}")
    if like is not None:
        x = x.to(device=like.device)
        if x.is_floating_point() and like.is_floating_point() and x.dtype != like.dtype:
            x = x.to(like.dtype)
    return x
