"""hamilton_attn.integrations.transformers (issue #18, item 2): tiny random-weight Llama,
Mistral (sliding window shorter than the documents) and Qwen2 (full and sliding layers)
trained context-parallel on 2 and 4 gloo ranks give the logits, loss and gradient of
every parameter of the same model run in one process with transformers' own sdpa
attention (float64: transformers' packed-sequence mask from position_ids, use_cache
off); padding is honoured; bad input raises ValueError before any communication."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hamilton_attn import SimulatedGroup  # noqa: E402
from hamilton_attn.integrations import transformers as hat  # noqa: E402

VOCAB = 89
DOCS = (13, 29, 19)  # odd lengths, packed: S = 61
COMPILE_BACKEND = "aot_eager"  # inductor works too; its C++ build costs CI minutes
ROOT = Path(__file__).resolve().parents[2]


def _config(name: str, impl: str = "sdpa"):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation=impl)  # fmt: skip
    if name == "llama":
        return transformers.LlamaConfig(**common)
    if name == "mistral":
        return transformers.MistralConfig(sliding_window=7, **common)
    if name == "qwen2":
        return transformers.Qwen2Config(sliding_window=6, use_sliding_window=True,
                                        layer_types=["sliding_attention", "full_attention"],
                                        **common)  # fmt: skip
    raise ValueError(name)


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(name)).double()


def _packed_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(DOCS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOCS]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}


def _reference(model, batch, doc_starts=None):
    """transformers' own attention in one process: logits, float64 loss, gradients."""
    model.zero_grad()
    extra = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **extra).logits
    labels = batch["labels"].clone()
    if doc_starts is not None:
        labels[0, list(doc_starts)] = -100  # no prediction across documents
    target = labels[:, 1:].clone()
    if "attention_mask" in batch:  # padding neither predicts nor is predicted
        pad = batch["attention_mask"] == 0
        target[pad[:, 1:] | pad[:, :-1]] = -100
    target = target.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), target, ignore_index=-100
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads, int((target != -100).sum())


def _errors(ctx, name, batch, starts, compiled=False, **options):
    ref = _model(name)
    want_logits, want_loss, want_grads, count = _reference(ref, batch, starts)
    model = hat.enable(copy.deepcopy(ref))
    model.zero_grad()
    run = torch.compile(model, backend=COMPILE_BACKEND) if compiled else model
    cp = hat.prepare(run, batch, ctx.group, **options)
    out = run(**cp.inputs)
    local = cp.loss(out.logits)
    local.backward()
    hat.sum_gradients(model, ctx.group)
    logits = cp.gather(out.logits.detach())
    valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    grads = dict(model.named_parameters())
    return {
        "logits": (logits - want_logits)[valid].abs().max().item(),
        "loss": (hat.global_loss(local, ctx.group) - want_loss).abs().item(),
        # transformers' own loss path (it upcasts logits to float32 only)
        "hf_loss": (hat.global_loss(out.loss, ctx.group) - want_loss).abs().item(),
        "grad": max((grads[n].grad - g).abs().max().item() for n, g in want_grads.items()),
        "grad_scale": max(g.abs().max().item() for g in want_grads.values()),
        "count": (int(cp.num_items), count),
        "local_len": cp.placement.local_len,
        "shared": all(p.placement is cp.placement.placement for p in cp.plans.values()),
        "kinds": sorted(str(k) for k in cp.plans),
    }


def _models_case(ctx, names, options):
    batch = _packed_batch()
    starts = [sum(DOCS[:i]) for i in range(len(DOCS))]
    return {n: _errors(ctx, n, batch, starts, **options) for n in names}


def _check(errs, kinds=None):
    assert errs["count"][0] == errs["count"][1], errs
    assert errs["logits"] < 1e-10, errs
    assert errs["loss"] < 1e-12, errs
    assert errs["hf_loss"] < 1e-6, errs
    assert errs["grad"] < 1e-10 * max(1.0, errs["grad_scale"]), errs
    assert errs["shared"], errs
    if kinds is not None:
        assert errs["kinds"] == kinds, errs


KINDS = {"llama": ["None"], "mistral": ["7"], "qwen2": ["6", "None"]}


@pytest.mark.parametrize(
    "w, options",
    [(2, {}), (4, {"dispatch": "minheap", "schedule": "ring"}), (4, {"schedule": "groupcast"})],
)
def test_models_match_one_process(pool, w, options):
    names = ["llama", "mistral", "qwen2"]
    for per_rank in pool.run(_models_case, w, names, options):
        for name in names:
            _check(per_rank[name], KINDS[name])


def _compiled_case(ctx):
    batch = _packed_batch(seed=3)
    starts = [sum(DOCS[:i]) for i in range(len(DOCS))]
    return _errors(ctx, "qwen2", batch, starts, compiled=True)


def test_torch_compile(pool):
    for errs in pool.run(_compiled_case, 2):
        _check(errs)


def _padded_batch():
    # Two rows: the first right-padded, the second left-padded; positions count tokens.
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 23), generator=g)
    am = torch.ones(2, 23, dtype=torch.long)
    am[0, 18:] = 0
    am[1, :4] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    labels = ids.clone()
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos, "labels": labels}


def _padded_case(ctx, name):
    return _errors(ctx, name, _padded_batch(), None)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_padding_is_honoured(pool, name):
    for errs in pool.run(_padded_case, 3, name):
        _check(errs)


def test_cu_seqlens_and_batch_rows_give_the_packed_layout():
    model = hat.enable(_model("llama"))
    batch = _packed_batch()
    by_pos = hat.prepare(model, batch)
    cu = torch.tensor([0, 13, 42, 61])
    by_cu = hat.prepare(model, {"input_ids": batch["input_ids"], "cu_seqlens": cu,
                                "labels": batch["labels"]})  # fmt: skip
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(by_pos.inputs[key], by_cu.inputs[key]), key
    shifted = by_pos.shift_labels[0]
    assert shifted[[12, 41, 60]].tolist() == [-100, -100, -100]
    assert torch.equal(shifted[:12], batch["input_ids"][0, 1:13])
    # B rows of one document each: the same as the rows packed with positions reset.
    rows = torch.randint(0, VOCAB, (3, 17))
    cp = hat.prepare(model, {"input_ids": rows, "labels": rows})
    flat = {"input_ids": rows.reshape(1, -1), "labels": rows.reshape(1, -1),
            "position_ids": torch.arange(17).repeat(3).unsqueeze(0)}  # fmt: skip
    cp_flat = hat.prepare(model, flat)
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(cp.inputs[key], cp_flat.inputs[key]), key
    assert int(cp.num_items) == 3 * 16
    assert cp.gather(cp.shard(rows.unsqueeze(-1).double())).squeeze(-1).equal(rows.double())


def test_bad_input_is_refused():
    model = _model("llama")
    batch = _packed_batch()
    with pytest.raises(ValueError, match="attention implementation is 'sdpa'"):
        hat.prepare(model, batch)
    hat.enable(model)
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        hat.prepare(model, {"input_ids": batch["input_ids"][:, :3]}, SimulatedGroup(4))
    with pytest.raises(ValueError, match=r"batch: keys \['token_type_ids'\]"):
        hat.prepare(model, {**batch, "token_type_ids": batch["input_ids"]})
    hole = torch.ones(1, 61, dtype=torch.long)
    hole[0, 20:23] = 0
    with pytest.raises(ValueError, match="padding inside a document"):
        hat.prepare(model, {"input_ids": batch["input_ids"], "attention_mask": hole})
    with pytest.raises(ValueError, match="4-d mask"):
        hat.prepare(model, {**batch, "attention_mask": torch.ones(1, 1, 61, 61)})
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        hat.prepare(model, {**batch, "position_ids": torch.arange(60)})
    with pytest.raises(ValueError, match="cu_seqlens: expected increasing"):
        hat.prepare(model, {"input_ids": batch["input_ids"], "cu_seqlens": [0, 30, 70]})
    cp = hat.prepare(model, batch)
    with pytest.raises(ValueError, match="padding passed to a 'hamilton' model"):
        model(**cp.inputs, attention_mask=torch.zeros_like(cp.inputs["input_ids"]))
    with pytest.raises(ValueError, match="query: 10 tokens"):
        model(input_ids=batch["input_ids"][:, :10], use_cache=False)
    model.config.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="attention_dropout=0.1 in training"):
        hat.prepare(model, batch)
    model.config.attention_dropout = 0.0
    qwen = hat.enable(_model("qwen2"))
    qwen.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"layer_types \['linear_attention'\]"):
        hat.prepare(qwen, batch)
    qwen.config.layer_types = ["full_attention", "sliding_attention"]
    cp = hat.prepare(qwen, batch, windows=[None])  # a layer kind left out
    with pytest.raises(ValueError, match="window 6 was not planned"):
        qwen(**cp.inputs)


def test_example_runs_under_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "transformers_cp.py"), "--steps", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "match" in done.stdout, done.stdout
