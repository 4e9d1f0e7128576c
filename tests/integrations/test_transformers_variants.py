"""hamilton_attn.integrations.transformers with attention variants (issue #18, item 2):
tiny random-weight Gemma2 (logit soft-capping, query_pre_attn_scalar, final logit
soft-capping, sliding and full layers) and GptOss (attention sinks ``s_aux``, sliding and
full layers, MoE) trained context-parallel on 2 and 3 gloo ranks over packed documents of
odd lengths give the logits, loss and gradient of every parameter (the sinks included) of
the same model run in one process, each document on its own, in float64.

The one-process references, and why:
- GptOss: transformers' own eager attention (it computes the sink softmax in the inputs'
  dtype, float64 here; sdpa is not supported by GptOss). Each document runs on its own:
  GptOssModel builds its masks without ``position_ids``, so transformers itself would
  let packed documents attend across each other.
- Gemma2: its eager attention computes the softmax in float32 (``dtype=torch.float32``)
  and sdpa refuses soft-capping, so neither is float64; the reference is ``eager64``
  below: the same math as Gemma2's eager (scores * scaling, softcap * tanh(s / softcap),
  transformers' additive mask, softmax) in float64. A test ties it to transformers' eager
  (equal within float32 rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers.masking_utils import eager_mask  # noqa: E402

from hamilton_attn.integrations import transformers as hat  # noqa: E402

VOCAB = 83
DOCS = (11, 23, 17)  # odd lengths, packed: S = 51
WINDOW = 5  # shorter than the documents


def eager64(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
            softcap=None, s_aux=None, **kwargs):  # fmt: skip
    """Float64 eager attention: Gemma2's eager math without its float32 softmax (and
    gpt-oss's sink column, for the check of the sink test's reference)."""
    assert dropout == 0.0
    rep = query.shape[1] // key.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (key, value))
    s = query @ k.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        s = s + attention_mask
    if s_aux is not None:
        s = torch.cat([s, s_aux.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if s_aux is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2).contiguous(), p


AttentionInterface.register("eager64", eager64)
AttentionMaskInterface.register("eager64", eager_mask)

REFERENCE = {"gemma2": "eager64", "gpt_oss": "eager"}
CAP = 1.7


def _config(name: str, impl: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, sliding_window=WINDOW, attention_dropout=0.0,
                  layer_types=["sliding_attention", "full_attention"],
                  attn_implementation=impl)  # fmt: skip
    if name == "gemma2":
        # query_pre_attn_scalar != head_dim: the scale comes from the module, not 1/sqrt(D)
        return transformers.Gemma2Config(query_pre_attn_scalar=13, attn_logit_softcapping=CAP,
                                         final_logit_softcapping=9.0, **common)  # fmt: skip
    if name == "gpt_oss":
        # eager experts: grouped_mm has no float64; default RoPE (yarn's needs a longer
        # original context than this tiny model has)
        return transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2,
                                         experts_implementation="eager",
                                         rope_parameters={"rope_type": "default",
                                                          "rope_theta": 10000.0},
                                         **common)  # fmt: skip
    raise ValueError(name)


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name, REFERENCE[name]))
    model = model.double()
    with torch.no_grad():  # scores (and sinks) of a size that matters: init std is 0.02
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.normal_(0.0, 0.6)
            if name == "gpt_oss":
                attn.sinks.normal_(0.0, 1.5)
    return model


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(DOCS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOCS]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}


def _reference(model, batch):
    """One process, each document its own forward: logits [1, S, V], mean loss over the
    global label count, every parameter's gradient."""
    model.zero_grad()
    count = sum(n - 1 for n in DOCS)
    logits, total, a = [], 0.0, 0
    for n in DOCS:
        ids = batch["input_ids"][:, a : a + n]
        out = model(input_ids=ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(
            out[0, :-1], batch["labels"][0, a + 1 : a + n], reduction="sum"
        )
        total = total + ce / count
        logits.append(out.detach())
        a += n
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.cat(logits, dim=1), total.detach(), grads, count


def _errors(ctx, name, seed, options):
    ref = _model(name)
    batch = _batch(seed)
    want_logits, want_loss, want_grads, count = _reference(ref, batch)
    model = hat.enable(copy.deepcopy(ref))
    model.zero_grad()
    cp = hat.prepare(model, batch, ctx.group, **options)
    out = model(**cp.inputs)
    local = cp.loss(out.logits)
    local.backward()
    hat.sum_gradients(model, ctx.group)
    grads = dict(model.named_parameters())
    sinks = [n for n in want_grads if n.endswith("sinks")]
    return {
        "logits": (cp.gather(out.logits.detach()) - want_logits).abs().max().item(),
        "loss": (hat.global_loss(local, ctx.group) - want_loss).abs().item(),
        "grad": {n: (grads[n].grad - g).abs().max().item() for n, g in want_grads.items()},
        "grad_scale": max(g.abs().max().item() for g in want_grads.values()),
        # per sink: (error relative to its own gradient's size, that size)
        "sinks": {
            n: ((grads[n].grad - want_grads[n]).norm() / want_grads[n].norm()).item() for n in sinks
        },
        "sink_size": min((want_grads[n].norm().item() for n in sinks), default=0.0),
        "count": (int(cp.num_items), count),
        "kinds": sorted(str(k) for k in cp.plans),
        "local_len": cp.placement.local_len,
    }


def _case(ctx, name, seed, options):
    return _errors(ctx, name, seed, options)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
@pytest.mark.parametrize("w, options", [(2, {}), (3, {"dispatch": "minheap", "schedule": "ring"})])
def test_variant_models_match_one_process(pool, name, w, options):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs per run
    for errs in pool.run(_case, w, name, seed, options):
        assert errs["count"][0] == errs["count"][1], errs
        assert errs["kinds"] == [str(WINDOW), "None"], errs
        assert errs["local_len"] < sum(DOCS), errs  # really split
        assert errs["logits"] < 1e-10, errs
        assert errs["loss"] < 1e-12, errs
        scale = max(1.0, errs["grad_scale"])
        for n, err in errs["grad"].items():
            # Gemma2RMSNorm computes in float32 (x.float(), weight.float()): its weight's
            # gradient is a float32 sum over tokens, summed in another order per rank.
            f32 = name == "gemma2" and n.endswith("norm.weight")
            assert err < (1e-6 if f32 else 1e-10) * scale, (n, err, errs)
        if name == "gpt_oss":
            assert len(errs["sinks"]) == 2, errs
            assert errs["sink_size"] > 1e-7, errs  # a sink gradient that can be wrong
            assert max(errs["sinks"].values()) < 1e-9, errs  # relative to its size


def test_gemma2_reference_is_transformers_eager_in_float64():
    """eager64 is Gemma2's eager math: equal to transformers' eager up to its float32
    softmax, and exactly the hamilton path in one process."""
    ref = _model("gemma2")
    batch = _batch(7)
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        mine = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        ref.set_attn_implementation("eager")
        theirs = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert 0 < (mine - theirs).abs().max().item() < 1e-5
        ref.config.attn_logit_softcapping = None  # the cap is really applied
        for layer in ref.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert (uncapped - theirs).abs().max().item() > 1e-3
    model = hat.enable(_model("gemma2"))
    cp = hat.prepare(model, batch)
    with torch.no_grad():
        got = cp.gather(model(**cp.inputs).logits)
    assert (got - mine).abs().max().item() < 1e-12


def test_sinks_reference_matches_eager64():
    """transformers' eager gpt-oss attention and eager64's sink column agree (float64)."""
    model = _model("gpt_oss")
    ids = _batch(11)["input_ids"][:, : DOCS[1]]
    with torch.no_grad():
        theirs = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation("eager64")
        mine = model(input_ids=ids, use_cache=False).logits
    assert (mine - theirs).abs().max().item() < 1e-12


def test_unhandled_variants_are_refused():
    model = hat.enable(_model("gpt_oss"))
    batch = _batch(3)
    cp = hat.prepare(model, batch)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, cp.placement.local_len, 8, dtype=torch.float64)
    k = torch.randn(1, 2, cp.placement.local_len, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"s_aux: expected per-head sink logits \[4\]"):
        hat.hamilton_attention(attn, q, k, k, None, scaling=0.3, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks: this form of attention sinks"):
        hat.hamilton_attention(attn, q, k, k, None, scaling=0.3, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="softcap: expected a number"):
        hat.hamilton_attention(attn, q, k, k, None, scaling=0.3, softcap=-1.0)
    out, weights = hat.hamilton_attention(attn, q, k, k, None, scaling=0.3, softcap=0.0,
                                          s_aux=attn.sinks)  # fmt: skip
    assert weights is None and out.shape == (1, cp.placement.local_len, 4, 8)
    model.config.attention_chunk_size = 8
    with pytest.raises(ValueError, match="attention_chunk_size=8 is not supported"):
        hat.prepare(model, batch)
    gemma = hat.enable(_model("gemma2"))
    for layer in gemma.model.layers:
        layer.self_attn.is_causal = False  # use_bidirectional_attention (Gemma 3 style)
    cp = hat.prepare(gemma, batch)
    with pytest.raises(ValueError, match="non-causal"):
        gemma(**cp.inputs)
