"""One token placement for every layer of a model (issue #18, item 1): a plan made with
``placement=`` another plan holds the same tokens on each rank, so tensors dispatched
once serve layers with different masks, against the float64 oracle, forward and
backward; the balanced dispatches weigh every layer's mask (``balance_masks=``)."""

from __future__ import annotations

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.testing.oracle import attention_oracle, max_err

S = 67


def _layers(s: int):
    docs = ha.Mask.varlen([0, s // 3, s // 3 + 5, s], causal=True)
    return {"causal": ha.Mask.causal(s), "window": ha.Mask.sliding_window(s, (6, 0)), "docs": docs}


def _model(ctx, dispatch):
    masks = _layers(S)
    first = ha.plan(masks["causal"], ctx.group, dispatch=dispatch, schedule="ring",
                    balance_masks=(masks["window"], masks["docs"]))  # fmt: skip
    plans = {"causal": first}
    for name in ("window", "docs"):
        plans[name] = ha.plan(masks[name], ctx.group, schedule="groupcast", placement=first)
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(1, S, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    ql, kl, vl = (ha.dispatch(t, first).detach().requires_grad_() for t in (q, k, v))
    dol = ha.dispatch(do, first)
    errs = {}
    for name, p in plans.items():  # one set of local tensors through every layer's plan
        assert p.placement is first.placement
        for t in (ql, kl, vl):
            t.grad = None
        out = ha.calc_attn(ql, kl, vl, p)
        out.backward(dol)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref, _ = attention_oracle(*(t.transpose(1, 2) for t in (qr, kr, vr)),
                                  masks[name].to_dense(), 8**-0.5)  # fmt: skip
        ref.transpose(1, 2).backward(do)
        got = [ha.undispatch(x, p) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
        want = [ref.transpose(1, 2).detach(), qr.grad, kr.grad, vr.grad]
        errs[name] = max(max_err(a, b) for a, b in zip(got, want))
    return errs


@pytest.mark.parametrize("dispatch", ["minheap", "balanced_zigzag", "zigzag"])
def test_one_placement_serves_every_layer(pool, dispatch):
    for errs in pool.run(_model, 3, dispatch):
        assert max(errs.values()) < 1e-9, errs


def test_each_mask_alone_would_place_tokens_otherwise():
    # The hazard placement= removes: balanced dispatches place each mask's tokens their
    # own way, so a tensor dispatched for one layer is not another layer's.
    masks = _layers(S)
    g = ha.SimulatedGroup(3)
    own = [ha.plan(m, g, dispatch="minheap").placement.rank_ranges for m in masks.values()]
    assert len(set(own)) > 1
    first = ha.plan(masks["causal"], g, dispatch="minheap", balance_masks=(masks["window"],))
    shared = ha.plan(masks["window"], g, placement=first)
    assert shared.placement is first.placement


@pytest.mark.parametrize("s", [67, 256, 1024])
def test_balancing_over_every_layer_evens_the_model_work(s):
    # Per rank, the work of all three layers together: balanced over every layer's mask
    # it is more even than balanced over the first layer's alone (1.021 -> 1.003 at 67).
    masks, g = _layers(s), ha.SimulatedGroup(3)

    def model_imbalance(first):
        per_layer = [ha.plan(m, g, placement=first).work for m in masks.values()]
        total = [sum(x) for x in zip(*per_layer)]
        return max(total) / (sum(total) / len(total))

    alone = ha.plan(masks["causal"], g, dispatch="minheap")
    both = ha.plan(masks["causal"], g, dispatch="minheap",
                   balance_masks=(masks["window"], masks["docs"]))  # fmt: skip
    assert model_imbalance(both) < model_imbalance(alone) - 0.004


def test_shared_placement_refuses_what_cannot_share_it():
    g = ha.SimulatedGroup(3)
    first = ha.plan(ha.Mask.causal(S), g, dispatch="minheap")
    with pytest.raises(ValueError, match="placement: the other plan is for 3 ranks, not 4"):
        ha.plan(ha.Mask.causal(S), ha.SimulatedGroup(4), placement=first)
    with pytest.raises(ValueError, match="places 67 query tokens, the mask has 60"):
        ha.plan(ha.Mask.causal(60), g, placement=first)
    with pytest.raises(ValueError, match="dispatch: 'zigzag' disagrees"):
        ha.plan(ha.Mask.full(S), g, placement=first, dispatch="zigzag")
    with pytest.raises(ValueError, match="placement: expected another hamilton_attn.Plan"):
        ha.plan(ha.Mask.full(S), g, placement=first.placement.rank_ranges)
    # A Placement as data (a peer's shard layout) is taken as it is, checked alike.
    taken = ha.plan(ha.Mask.full(S), g, placement=first.placement)
    assert taken.placement is first.placement and taken.kv_placement is first.placement
    with pytest.raises(ValueError, match="places 67 query tokens, the mask has 60"):
        ha.plan(ha.Mask.causal(60), g, placement=first.placement)
    with pytest.raises(ValueError, match=r"balance_masks\[0\]"):
        ha.plan(ha.Mask.full(S), g, dispatch="minheap", balance_masks=(ha.Mask.full(5),))
