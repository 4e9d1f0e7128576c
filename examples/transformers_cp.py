"""Train a tiny random-weight transformers model context-parallel, and check it.

    torchrun --nproc_per_node 2 examples/transformers_cp.py [--steps 3] [--model qwen2]

Each step shards one packed batch of documents over the ranks
(``hamilton_attn.integrations.transformers.prepare``), runs the model with ``"hamilton"``
attention, sums the ranks' gradients and takes an SGD step. Every rank also keeps a copy
of the model that trains on the whole batch in one process with transformers' own sdpa
attention; after each step the losses and every parameter must agree (float64), else
the script exits non-zero. gloo on CPU, NCCL when every rank has a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import transformers

from hamilton_attn.integrations import transformers as hat

VOCAB = 101


def tiny_model(name: str) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    if name == "llama":
        config = transformers.LlamaConfig(**common)
    elif name == "mistral":
        config = transformers.MistralConfig(sliding_window=16, **common)
    else:  # one sliding-window layer and one full layer
        config = transformers.Qwen2Config(sliding_window=16, use_sliding_window=True,
                                          layer_types=["sliding_attention", "full_attention"],
                                          **common)  # fmt: skip
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.AutoModelForCausalLM.from_config(config).double()


def packed_batch(step: int, device) -> dict:
    """Documents of odd lengths packed into one row; positions restart per document."""
    g = torch.Generator().manual_seed(100 + step)
    lengths = [int(n) for n in torch.randint(9, 40, (4,), generator=g)]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": ids.to(device)}


def reference_step(model, batch, opt) -> float:
    """The whole batch in one process: transformers' packed-sequence mask (position_ids,
    no cache), labels cut at document ends as prepare() does."""
    opt.zero_grad()
    labels = batch["labels"].clone()
    labels[batch["position_ids"] == 0] = -100  # no token predicts the next document's first
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                use_cache=False)  # fmt: skip
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="qwen2", choices=["llama", "mistral", "qwen2"])
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, device = dist.get_rank(), torch.device("cuda" if cuda else "cpu")
    ref = tiny_model(args.model).to(device)
    model = hat.enable(copy.deepcopy(ref))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    worst = 0.0
    for step in range(args.steps):
        batch = packed_batch(step, device)
        want = reference_step(ref, batch, ref_opt)
        opt.zero_grad()
        cp = hat.prepare(model, batch)  # the world group; the active batch
        out = model(**cp.inputs)
        loss = cp.loss(out.logits)  # this rank's share: local sum / global count
        loss.backward()
        hat.sum_gradients(model)
        opt.step()
        got = hat.global_loss(loss).item()
        param_err = max((p - q).abs().max().item()
                        for p, q in zip(model.parameters(), ref.parameters()))  # fmt: skip
        err = max(abs(got - want), param_err)
        worst = max(worst, err)
        if rank == 0:
            print(f"step {step}: loss {got:.6f} (one process {want:.6f}), max error {err:.2e}")
    ok = torch.tensor([float(worst <= args.tol)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print("match" if ok.item() == 1.0 else f"MISMATCH: max error {worst:.2e} > {args.tol}")
    dist.destroy_process_group()
    return 0 if ok.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
