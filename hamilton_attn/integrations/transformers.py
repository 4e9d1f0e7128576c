"""HuggingFace ``transformers`` models trained context-parallel (``docs/transformers.md``).

Two public hooks of transformers are used, nothing private: an attention function named
``"hamilton"`` registered with ``AttentionInterface`` (it runs :func:`calc_attn` on the
active batch's plans) and a mask function of the same name registered with
``AttentionMaskInterface`` (it refuses a padding mask handed to the model, which
transformers would otherwise drop for a custom attention function)::

    from hamilton_attn.integrations import transformers as hat

    hat.enable(model)                          # model.set_attn_implementation("hamilton")
    cp = hat.prepare(model, batch, group)      # batch: input_ids, position_ids, labels...
    out = model(**cp.inputs)                   # out.loss: this rank's share of the loss
    out.loss.backward()
    hat.sum_gradients(model, group)            # every rank now holds the exact gradient

Legend: B batch rows, S tokens per row, N = B * S tokens of the flattened batch, T local
tokens of this rank (padding included), H heads, D head dim, V vocabulary, W ranks.
A batch of B rows is flattened into one packed row of N tokens (each row its own
document, or several from ``position_ids`` resets), so the model always runs on
``[1, T]`` token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import AttentionInterface, AttentionMaskInterface

from .. import Mask, Plan, calc_attn, dispatch, get_position_ids, plan, undispatch
from ..variants import Softmax

NAME = "hamilton"
IGNORE_INDEX = -100
#: The layer types handled (``config.layer_types``), and whether they slide.
LAYER_TYPES = {"full_attention": False, "sliding_attention": True}
# The batch keys prepare() reads; any other key is refused (it would be silently lost).
_BATCH_KEYS = {"input_ids", "position_ids", "cu_seqlens", "labels", "attention_mask"}

_active: list = [None]  # the batch whose plans the attention function uses


# -- registration ------------------------------------------------------------------------


@torch.compiler.disable
def hamilton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on the active batch's plans.

    Takes ``query`` ``[1, Hq, T, D]`` and ``key``, ``value`` ``[1, Hk, T, D]`` (layout
    bhsd, Hk dividing Hq: GQA is handled by :func:`calc_attn`, keys are not repeated),
    this rank's local tokens of the batch made current by :func:`prepare`; the layer's
    mask is causal per document, windowed to ``sliding_window`` keys (the kwarg, else
    ``module.sliding_window``). ``softcap`` (Gemma 2's ``attn_logit_softcapping``:
    ``softcap * tanh(scaling * q.k / softcap)``) and ``s_aux`` (gpt-oss's per-head sink
    logits ``[Hq]``, ``module.sinks``: one extra logit in every row's softmax denominator,
    with no value) become ``variant=Softmax(softcap=, sink=)``; the sink's gradient on
    each rank is its own rows' share (:func:`sum_gradients` sums them). Returns
    ``(out, None)`` with ``out`` ``[1, T, Hq, D]`` (bshd, what the attention modules
    reshape to ``[1, T, Hq * D]``).
    """
    cp = _active[0]
    if cp is None:
        raise ValueError(
            "attn_implementation 'hamilton': no context-parallel batch is active; call "
            "hamilton_attn.integrations.transformers.prepare(model, batch, group) first"
        )
    problem = _call_problem(module, query, key, attention_mask, dropout, kwargs)
    if problem:
        raise ValueError(problem)
    variant = _variant(query, softcap, s_aux)
    window = (
        sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    )
    p = cp.plan_for(window)
    if query.shape[2] != p.local_len:
        raise ValueError(
            f"query: {query.shape[2]} tokens, but the active batch holds {p.local_len} per "
            "rank: call the model with the inputs of the batch prepare() returned last"
        )
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # bhsd -> bshd
    return calc_attn(q, k, v, p, scale=scaling, variant=variant), None


def _variant(query, softcap, s_aux) -> Softmax | None:
    """The layer's :class:`Softmax` variant (None: plain softmax); ValueError for a
    softcap or sink transformers' own attention would not read the same way."""
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0
    ):
        raise ValueError(f"softcap: expected a number >= 0 or None, got {softcap!r}")
    cap = float(softcap) if softcap else None  # 0 or None: no soft-capping (as in eager)
    if s_aux is not None:
        hq = query.shape[1]
        if not isinstance(s_aux, torch.Tensor) or tuple(s_aux.shape) != (hq,):
            got = tuple(s_aux.shape) if isinstance(s_aux, torch.Tensor) else type(s_aux)
            raise ValueError(
                f"s_aux: expected per-head sink logits [{hq}] (gpt-oss style), got {got}"
            )
        if not s_aux.is_floating_point():
            raise ValueError(f"s_aux: expected a floating-point tensor, got {s_aux.dtype}")
        s_aux = s_aux.to(query.device)
    if cap is None and s_aux is None:
        return None
    return Softmax(softcap=cap, sink=s_aux)


def _call_problem(module, query, key, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None:
        return (
            "attention_mask: the model was given a mask (4-d, or one transformers built); "
            "give the padding attention_mask to prepare() instead"
        )
    if dropout:
        return f"dropout: attention dropout {dropout} is not supported (set attention_dropout=0)"
    if kwargs.get("sinks") is not None:
        return "sinks: this form of attention sinks is not supported (gpt-oss's s_aux is)"
    if kwargs.get("output_attentions"):
        return "output_attentions: attention weights are never materialised here"
    if not getattr(module, "is_causal", True):
        return "module: non-causal (bidirectional or cross) attention is not supported"
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return (
            f"query, key: expected [1, H, T, D] self-attention tensors, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} (a KV cache is not supported)"
        )
    return None


@torch.compiler.disable
def _refuse_padding_mask(*args, attention_mask=None, **kwargs):
    """The mask function of ``"hamilton"``: no mask (prepare() built it); a padding mask
    given to the model itself would be dropped, so it is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask: padding passed to a 'hamilton' model is not applied here; give "
            "it to prepare() (the batch's 'attention_mask') and call model(**cp.inputs)"
        )
    return None


def register() -> None:
    """Register ``"hamilton"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (done on import; idempotent)."""
    AttentionInterface.register(NAME, hamilton_attention)
    AttentionMaskInterface.register(NAME, _refuse_padding_mask)


def enable(model):
    """Switch ``model`` (any transformers ``PreTrainedModel``) to ``"hamilton"`` attention;
    returns it. Same as ``model.set_attn_implementation("hamilton")``."""
    register()
    _unwrap(model).set_attn_implementation(NAME)
    return model


register()


# -- the model's layer kinds -------------------------------------------------------------


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _text_config(model):
    config = _unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding window (the keys a query sees, itself included) or
    None (full causal), from ``layer_types`` / ``sliding_window`` /
    ``use_sliding_window``; ValueError for a layer type not handled."""
    n = getattr(config, "num_hidden_layers", 1)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral-style: one window (or none) for every layer
        return (window,) * n
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"model: layer_types {bad} are not supported (only {sorted(LAYER_TYPES)})")
    return tuple(window if LAYER_TYPES[t] else None for t in types)


def _model_problem(model) -> str | None:
    config = _text_config(model)
    impl = getattr(config, "_attn_implementation", None)
    if impl != NAME:
        return (
            f"model: its attention implementation is {impl!r}, not {NAME!r}; call "
            "hamilton_attn.integrations.transformers.enable(model) first"
        )
    if _unwrap(model).training and getattr(config, "attention_dropout", 0.0):
        return (
            f"model: attention_dropout={config.attention_dropout} in training is not "
            "supported (set config.attention_dropout = 0)"
        )
    if getattr(config, "output_attentions", False):
        return "model: output_attentions=True is not supported (weights are never formed)"
    # attn_logit_softcapping is read from the attention call's softcap (what the model's
    # attention passes, as for transformers' own functions); chunked attention is not.
    if getattr(config, "attention_chunk_size", None):
        return f"model: attention_chunk_size={config.attention_chunk_size} is not supported"
    return None


# -- the batch ---------------------------------------------------------------------------


def _as_rows(x, name: str, b: int | None, s: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.is_floating_point():
        raise ValueError(
            f"{name}: expected an integer [B, S] tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if b is not None and (x.shape[1] != s or x.shape[0] not in (1, b)):
        raise ValueError(f"{name}: expected shape [{b}, {s}], got {tuple(x.shape)}")
    return x.expand(b, s) if b is not None else x


@dataclass(frozen=True)
class _Layout:
    """The flattened batch: documents, positions and shifted labels over N tokens."""

    shape: tuple[int, int]  # (B, S)
    segments: tuple[tuple[int, int, bool], ...]  # (start, end, is a document) covering N
    positions: torch.Tensor  # [N] long, RoPE positions (0 at padding)
    shifted: torch.Tensor | None  # [N] long: label of token t, -100 where none


def _layout(batch: dict) -> _Layout:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batch: expected a dict with 'input_ids' (and optional position_ids, "
                         "cu_seqlens, labels, attention_mask)")  # fmt: skip
    unknown = sorted(set(batch) - _BATCH_KEYS)
    if unknown:
        raise ValueError(f"batch: keys {unknown} are not handled (only {sorted(_BATCH_KEYS)})")
    ids = _as_rows(batch["input_ids"], "input_ids", None, None).cpu()
    b, s = ids.shape
    if b * s == 0:
        raise ValueError("input_ids: the batch is empty")
    valid = torch.ones(b, s, dtype=torch.bool)
    am = batch.get("attention_mask")
    if am is not None:
        if isinstance(am, torch.Tensor) and am.dim() == 4:
            raise ValueError("attention_mask: a 4-d mask is not supported; give the 2-d "
                             "padding mask (1 = token, 0 = padding)")  # fmt: skip
        am = _as_rows(am.long() if am.dtype == torch.bool else am, "attention_mask", b, s).cpu()
        if not bool(((am == 0) | (am == 1)).all()):
            raise ValueError("attention_mask: expected 0 (padding) and 1 (token) values")
        valid = am == 1
        if not bool(valid.any()):
            raise ValueError("attention_mask: every token is padding")
    given_pos = batch.get("position_ids")
    pos = None if given_pos is None else _as_rows(given_pos, "position_ids", b, s).cpu().long()
    t = torch.arange(s)
    start = valid & ((t == 0) | ~valid.roll(1, 1))
    if pos is not None:  # a document starts where positions do not continue by one
        start |= valid & (t > 0) & (pos != pos.roll(1, 1) + 1)
    cu = batch.get("cu_seqlens")
    if cu is not None:
        start |= _cu_starts(cu, b, s) & valid
    _check_padding_inside(valid, start, pos)
    flat_valid, flat_start = valid.reshape(-1), start.reshape(-1)
    doc = torch.where(flat_valid, flat_start.long().cumsum(0) - 1, torch.full_like(t[:1], -1))
    doc = torch.where(flat_valid, doc, -1 - torch.arange(b * s) // s)  # pad runs per row
    values, counts = torch.unique_consecutive(doc, return_counts=True)
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    segments = tuple((a, e, v >= 0) for a, e, v in zip(starts, ends, values.tolist()))
    if pos is None:  # count from 0 at each document's first token
        first = torch.repeat_interleave(torch.tensor(starts), counts)
        positions = torch.where(flat_valid, torch.arange(b * s) - first, 0)
    else:
        positions = torch.where(flat_valid, pos.reshape(-1), 0)
    shifted = None
    if batch.get("labels") is not None:
        labels = _as_rows(batch["labels"], "labels", b, s).cpu().long().reshape(-1)
        same = torch.zeros(b * s, dtype=torch.bool)
        same[:-1] = (doc[1:] == doc[:-1]) & flat_valid[:-1]
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:-1] = torch.where(same[:-1], labels[1:], IGNORE_INDEX)
    return _Layout((b, s), segments, positions, shifted)


def _cu_starts(cu, b: int, s: int) -> torch.Tensor:
    if b != 1:
        raise ValueError(f"cu_seqlens: documents of a packed batch need B = 1, got B = {b}")
    cu = torch.as_tensor(cu).cpu().long().reshape(-1)
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != s or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected increasing offsets from 0 to {s}, got {cu.tolist()}"
        )
    starts = torch.zeros(1, s, dtype=torch.bool)
    starts[0, cu[:-1]] = True
    return starts


def _check_padding_inside(valid, start, pos) -> None:
    """Padding between tokens of one row must end a document: a token after it starts a
    new one (its position does not continue the previous token's), else transformers'
    meaning (a hole in one document) and ours would differ."""
    after_pad = valid & ~valid.roll(1, 1)
    after_pad[:, 0] = False
    seen = valid.long().cumsum(1)
    for row, t in after_pad.nonzero().tolist():
        if seen[row, t - 1] == 0:
            continue  # left padding
        last = int(valid[row, :t].nonzero().max())
        if pos is None or int(pos[row, t]) == int(pos[row, last]) + 1:
            raise ValueError(
                f"attention_mask: padding inside a document (row {row}, before token {t}) "
                "is not supported; padding may lead or trail a row, or end a document "
                "(give position_ids that restart after it)"
            )


def _masks(layout: _Layout, windows) -> dict:
    """Per window, the mask over N tokens: causal per document, padding seeing nothing
    and seen by nothing."""
    cu = [0] + [e for _, e, _ in layout.segments]
    pads = [(a, e) for a, e, is_doc in layout.segments if not is_doc]
    n = cu[-1]
    out = {}
    for w in windows:
        m = Mask.varlen(cu, causal=True, window=(-1 if w is None else w - 1, 0))
        if pads:
            keep = [bd for bd in m.bands if not any(a <= bd.q0 and bd.q1 <= e for a, e in pads)]
            m = Mask(keep, n)
        out[w] = m
    return out


# -- prepare -----------------------------------------------------------------------------


def _world_size(group) -> int:
    if group is None:
        return dist.get_world_size() if _distributed() else 1
    size = getattr(group, "size", None)
    if callable(size):
        return int(size())
    return int(getattr(group, "world_size", 1))


@dataclass(eq=False)
class ContextParallelBatch:
    """One batch sharded over the ranks of ``group``: call ``model(**inputs)``.

    ``inputs``: this rank's ``input_ids`` and ``position_ids`` ``[1, T]`` (global RoPE
    positions, reset per document), ``use_cache=False`` and, with labels,
    ``labels`` = ``shift_labels`` (already shifted over the whole batch, so transformers
    does not shift again) and ``num_items_in_batch`` (the global count): the model's
    ``loss`` is then this rank's sum of cross-entropy over the global count, and the sum
    over ranks is the batch's mean loss. ``plans``: per sliding window (None: full
    causal) the plan its layers use, all of one token placement (``placement``).
    ``num_items``: 0-d long tensor, the global number of labels != -100 (None without
    labels). Active (the attention function uses it) from :func:`prepare` until the next
    prepare, or the end of its ``with`` block.
    """

    inputs: dict
    plans: dict
    placement: Plan
    num_items: torch.Tensor | None
    shape: tuple[int, int]
    group: object = None
    _previous: object = field(default=None, repr=False)

    def plan_for(self, window: int | None) -> Plan:
        """The plan of layers with this sliding window (None: full causal)."""
        p = self.plans.get(window)
        if p is None:
            raise ValueError(
                f"sliding_window: a layer with window {window} was not planned (the model "
                f"config gives {sorted(self.plans, key=str)}); pass windows= to prepare()"
            )
        return p

    @property
    def shift_labels(self) -> torch.Tensor | None:
        """``[1, T]`` local labels, shifted globally (-100: no label)."""
        return self.inputs.get("shift_labels")

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean loss: local sum of cross-entropy (in logits'
        dtype) over the global label count; the sum over ranks is the batch's loss."""
        if self.num_items is None:
            raise ValueError("labels: the batch given to prepare() had no labels")
        flat = logits.reshape(-1, logits.shape[-1])
        labels = self.shift_labels.reshape(-1).to(flat.device)
        ce = torch.nn.functional.cross_entropy(
            flat, labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return ce / self.num_items.to(ce.device).clamp(min=1)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``[1, T, ...]`` shard of a per-token tensor ``[B, S, ...]``
        (padding: zeros); differentiable."""
        b, s = self.shape
        if x.dim() < 2 or tuple(x.shape[:2]) != (b, s):
            raise ValueError(f"x: expected [{b}, {s}, ...], got {tuple(x.shape)}")
        return dispatch(x.reshape(1, b * s, *x.shape[2:]), self.placement, seq_dim=1)

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        """The whole batch ``[B, S, ...]`` from every rank's ``[1, T, ...]`` (logits,
        hidden states), on every rank; differentiable."""
        b, s = self.shape
        full = undispatch(x_local, self.placement, seq_dim=1)
        return full.reshape(b, s, *full.shape[2:])

    def __enter__(self):
        _active[0] = self
        return self

    def __exit__(self, *exc):
        if _active[0] is self:
            _active[0] = self._previous


def prepare(
    model,
    batch: dict,
    group=None,
    *,
    dispatch: str = "auto",
    schedule: str = "auto",
    windows=None,
    device=None,
    **plan_options,
) -> ContextParallelBatch:
    """Shard ``batch`` for ``model`` over ``group`` and make it the active batch.

    Args:
        model: a transformers causal LM switched to ``"hamilton"`` (:func:`enable`).
        batch: ``input_ids`` ``[B, S]`` (or ``[S]``), the same on every rank; optional
            ``position_ids`` (documents start where they do not continue by one, as
            transformers' packed-sequence detection reads them; default: counted from
            0 per document), ``cu_seqlens`` (B = 1: document offsets), ``labels``
            ``[B, S]`` (unshifted, as for transformers; shifted here over the whole
            batch: a document's last token and padding get -100), ``attention_mask``
            ``[B, S]`` (0 = padding: it sees nothing, is seen by nothing, has no label;
            it may lead or trail a row or end a document).
        group: the process group of the context-parallel ranks (default: the world).
        dispatch, schedule: as for :func:`hamilton_attn.plan` (the first layer kind's
            plan places the tokens, balanced over every layer kind's mask).
        windows: the layers' sliding windows (None: full), default from the config.
        device: where the inputs go (default: ``input_ids``' device).
        plan_options: other :func:`hamilton_attn.plan` options (backend, check, ...).

    Raises ValueError, before any communication, for a bad batch, a model feature not
    handled (see :func:`layer_windows`) or fewer tokens than ranks.
    """
    problem = _model_problem(model)
    if problem:
        raise ValueError(problem)
    layout = _layout(batch)
    kinds = sorted(set(layer_windows(_text_config(model)) if windows is None else windows),
                   key=lambda w: -1 if w is None else w)  # fmt: skip
    for w in kinds:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"windows: expected None or positive ints, got {w!r}")
    b, s = layout.shape
    n, world = b * s, _world_size(group)
    if n < world:
        raise ValueError(
            f"input_ids: {n} tokens cannot be split over {world} ranks (at least {world})"
        )
    masks = _masks(layout, kinds)
    first_mask = masks[kinds[0]]
    others = tuple(m for m in {masks[w]: None for w in kinds[1:]} if m != first_mask)
    first = plan(first_mask, group, dispatch=dispatch, schedule=schedule,
                 balance_masks=others, **plan_options)  # fmt: skip
    plans = {}
    for w in kinds:
        same = masks[w] == first_mask
        plans[w] = first if same else plan(masks[w], group, schedule=schedule,
                                           placement=first, **plan_options)  # fmt: skip
    dev = batch["input_ids"].device if device is None else torch.device(device)
    where = get_position_ids(first)  # global index of each local token; >= N: padding
    real = where < n
    take = where.clamp(max=n - 1)
    ids = batch["input_ids"].reshape(-1).cpu()[take]
    inputs = {
        "input_ids": ids.unsqueeze(0).to(dev),
        "position_ids": torch.where(real, layout.positions[take], 0).unsqueeze(0).to(dev),
        "use_cache": False,
    }
    num_items = None
    if layout.shifted is not None:
        local = torch.where(real, layout.shifted[take], IGNORE_INDEX).unsqueeze(0).to(dev)
        num_items = (layout.shifted != IGNORE_INDEX).sum().to(dev)
        inputs.update(labels=local, shift_labels=local, num_items_in_batch=num_items)
    cp = ContextParallelBatch(inputs, plans, first, num_items, layout.shape, group, _active[0])
    _active[0] = cp
    return cp


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_gradients(model, group=None) -> None:
    """All-reduce (sum) every parameter's gradient over ``group``: each rank's backward
    of its share of the loss leaves partial gradients; their sum is the exact gradient
    of the batch's loss. (DDP over the same ranks averages instead: scale by W.)"""
    if not _distributed():
        return  # one process: its gradients are whole
    for p in _unwrap(model).parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def global_loss(local_loss: torch.Tensor, group=None) -> torch.Tensor:
    """The batch's loss from this rank's share (detached; for logging), on every rank."""
    total = local_loss.detach().clone()
    if not _distributed():
        return total
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


__all__ = [
    "ContextParallelBatch",
    "IGNORE_INDEX",
    "NAME",
    "enable",
    "global_loss",
    "hamilton_attention",
    "layer_windows",
    "prepare",
    "register",
    "sum_gradients",
]
