"""One training step of a Llama-style transformers model: one GPU against context parallelism.

    torchrun --standalone --nproc_per_node 2 benchmarks/hf_train_step.py \\
        --seqlens 32768 131072 262144 --out benchmarks/results

A model with random weights built from a config (default 8 layers, hidden 2048, 16 heads,
8 KV heads, intermediate 5632, vocabulary 32000: about 0.5B parameters), one packed row
of long-tailed documents (``bench.doc_boundaries``: log-normal lengths, seeded), and a
training step (forward, backward, AdamW step), timed over ``--steps`` steps after
``--warmup``:

- **one GPU** (``impl`` ``one GPU``): transformers' own attention implementations
  (``--attn``: sdpa, flex_attention; packed documents through ``position_ids``) and
  ``hamilton`` (this project's attention through the transformers integration on a
  one-rank group), each without and with activation checkpointing
  (``model.gradient_checkpointing_enable()``). Under torchrun the one-GPU
  configurations are spread over the ranks (rank r runs every W-th), each alone on its
  GPU.
- **context parallel** over every rank (``impl`` ``CP xW``):
  ``hamilton_attn.integrations.transformers.prepare`` per ``--schedules`` x
  ``--dispatches``, with and without checkpointing; gradients summed over the ranks.

Every configuration builds the model from the same seed, so the first step's loss
(before any update) must agree between one GPU and CP within the dtype's rounding:
both are printed, with the largest relative difference. Reports ms per step (median),
tokens/s per GPU, peak memory (``torch.cuda.max_memory_allocated``, the largest rank's)
and, for our attention, the planner's prediction of the attention time per step
(``planner.cost.simulate_any`` on ``nvswitch:W`` with the batch's mask: layers x
forward+backward, plus one more forward with checkpointing; attention only, the rest of
the model is not modelled). A configuration that runs out of memory is reported as
``OOM`` and the next one runs (one-GPU runs: safely; CP: all ranks agree after each
configuration, but an OOM inside a collective on one rank only can hang the other: the
file is rewritten after every configuration, so what ran is kept).

Writes ``<out>/hf_train_<hardware>_<date>.md`` and ``.json`` (hardware, date, exact
command). Runs on CPU too (gloo, float32; tiny sizes through the options), as the test
``tests/test_benchmarks_hf.py`` does.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SINGLE_ATTN = ("sdpa", "flex_attention", "hamilton")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--seqlens", type=int, nargs="+", default=[32768, 131072, 262144], help="tokens per step")
    a("--layers", type=int, default=8)
    a("--hidden", type=int, default=2048)
    a("--heads", type=int, default=16)
    a("--kv-heads", type=int, default=8)
    a("--intermediate", type=int, default=5632)
    a("--vocab", type=int, default=32000)
    a("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    a("--steps", type=int, default=3, help="timed steps per configuration")
    a("--warmup", type=int, default=1, help="untimed steps before them")
    a("--lr", type=float, default=1e-4)
    a("--seed", type=int, default=0)
    a("--init-std", type=float, default=None,
      help="initializer_range of the random weights (default transformers' 0.02)")  # fmt: skip
    a("--attn", nargs="*", default=list(SINGLE_ATTN), help="one-GPU attention implementations")
    a("--ckpt", nargs="+", default=["off", "on"], choices=["off", "on"],
      help="activation checkpointing settings to run")  # fmt: skip
    a("--single-ckpt", nargs="+", default=None, choices=["off", "on"],
      help="checkpointing settings of the one-GPU runs (default: --ckpt)")  # fmt: skip
    a("--schedules", nargs="+", default=["auto"], help="CP schedules (prepare(schedule=))")
    a("--dispatches", nargs="+", default=["auto"], help="CP dispatches (prepare(dispatch=))")
    a("--backend", default="auto", help="our local kernel (plan(backend=))")
    a("--no-single", action="store_true", help="skip the one-GPU runs")
    a("--no-cp", action="store_true", help="skip the context-parallel runs")
    a("--timeout-min", type=float, default=40.0,
      help="process-group timeout (minutes): how long a rank waits for the others")  # fmt: skip
    a("--out", default="benchmarks/results")
    a("--name", default=None, help="file stem (default hf_train_<hardware>_<date>)")
    a("--tol", type=float, default=None,
      help="exit 1 if a CP loss differs from a one-GPU loss (same checkpointing) by more "
           "than this, relative (default: none; the table shows the difference)")  # fmt: skip
    return ap.parse_args(argv)


# -- setup -------------------------------------------------------------------------------


def init(timeout_min: float = 40.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's ranks (NCCL on GPUs, else gloo), or one
    process without a group."""
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return 0, 1, dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > local
    if cuda:
        torch.cuda.set_device(local)
    # Long timeout: rank r waits at barriers while the others run one-GPU configurations.
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
    )
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), dev


def hardware(dev: torch.device) -> tuple[str, str]:
    """(full name, short tag for file names)."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        short = next((k for k in ("H200", "H100", "A100", "B200") if k in name), name.split()[-1])
        return name, short
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "cpu"


def build_model(args, attn: str, dtype, dev):
    """The Llama-style model with the seed's random weights (identical every call)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seqlens),
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa" if attn == "hamilton" else attn,
        **({} if args.init_std is None else {"initializer_range": args.init_std}),
    )
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to(device=dev, dtype=dtype)
    if attn == "hamilton":
        from hamilton_attn.integrations import transformers as hat

        hat.enable(model)
    model.train()
    return model


def make_batch(args, seqlen: int, dev) -> dict:
    """One packed row of long-tailed documents: token ids, positions restarting per
    document, labels (unshifted), and the document offsets."""
    from hamilton_attn.cli.bench import doc_boundaries

    cu = doc_boundaries(seqlen, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (1, seqlen), generator=g)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])]).unsqueeze(0)
    return {"input_ids": ids.to(dev), "position_ids": pos.to(dev), "labels": ids.to(dev), "cu": cu}


# -- one configuration -------------------------------------------------------------------


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_config(args, cfg: dict, batch: dict, dtype, dev, group) -> dict:
    """Build, warm up and time one configuration; its row (``status`` ok / OOM / error).

    ``cfg``: impl (``one GPU`` / ``CP``), attn, ckpt, schedule, dispatch. ``group``: the
    CP group (None for one GPU; ``hamilton`` on one GPU gets a one-rank group)."""
    from hamilton_attn.integrations import transformers as hat

    row = dict(cfg, status="ok")
    model = opt = out = loss = None
    cp_batch = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
    ours = cfg["attn"] == "hamilton"
    try:
        _free(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        model = build_model(args, cfg["attn"], dtype, dev)
        if cfg["ckpt"] == "on":  # transformers 5.x's new name, else the old one
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        # Labels as prepare() cuts them: no token predicts the next document's first.
        labels = batch["labels"].clone()
        labels[batch["position_ids"] == 0] = -100
        times, losses, cp = [], [], None
        # One GPU runs "hamilton" on a one-rank group, its plan's own choice.
        sched, disp = (("auto", "auto") if cfg["impl"] == "one GPU"
                       else (cfg["schedule"], cfg["dispatch"]))  # fmt: skip
        for step in range(args.warmup + args.steps):
            _sync(dev)
            if group is not None and dist.is_initialized():
                dist.barrier(group=group)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if ours:
                # The plans are cached per mask: replanning each step, as a loader would.
                cp = hat.prepare(model, cp_batch, group, schedule=sched, dispatch=disp,
                                 backend=args.backend)  # fmt: skip
                out = model(**cp.inputs)
                loss = out.loss  # this rank's share of the batch's mean loss
                loss.backward()
                hat.sum_gradients(model, group)
                value = hat.global_loss(loss, group)
            else:
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            labels=labels, use_cache=False)  # fmt: skip
                loss = out.loss
                loss.backward()
                value = loss.detach()
            opt.step()
            _sync(dev)
            dt = time.perf_counter() - t0
            losses.append(float(value))
            if step >= args.warmup:
                times.append(dt)
            out = loss = None
        ms = statistics.median(times) * 1e3
        w = 1 if group is None else _size(group)
        row.update(
            ms_per_step=ms,
            tokens_per_s_per_gpu=batch["input_ids"].shape[1] / (ms / 1e3) / w,
            loss=losses[0],
            loss_last=losses[-1],
            losses=losses,
        )
        if ours and cp is not None:
            row.update(_prediction(args, cp, cfg["ckpt"] == "on", dtype))
    except Exception as err:  # noqa: BLE001 - one configuration's failure is its row
        row["status"] = "OOM" if _is_oom(err) else "error"
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        row["error"] = f"{type(err).__name__}: {first}"
    finally:
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        model = opt = out = loss = None
        _free(dev)
    return row


def _size(group) -> int:
    return dist.get_world_size(group)


def _prediction(args, cp, ckpt: bool, dtype) -> dict:
    """The planner's attention time for one step of this batch (ms): layers x
    (forward + backward), one more forward per layer with checkpointing; the schedule
    and dispatch the plan chose. {} where the planner cannot predict it."""
    from hamilton_attn.planner.cost import simulate_any
    from hamilton_attn.planner.model import Shapes

    p = next(iter(cp.plans.values()))
    info = {"plan_schedule": p.schedule.name, "plan_dispatch": p.placement.kind}
    try:
        shapes = Shapes(heads=args.heads, kv_heads=args.kv_heads,
                        head_dim=args.hidden // args.heads,
                        dtype_bytes=torch.finfo(dtype).bits // 8)  # fmt: skip
        mask = p.user_mask
        pred = simulate_any(p.schedule.name, f"nvswitch:{p.world_size}", mask.seqlen_q,
                            mask=mask, dispatch=p.placement.kind, shapes=shapes)  # fmt: skip
        per_layer = pred.fwd_bwd_s + (pred.fwd_s if ckpt else 0.0)
        info.update(pred_attn_ms=args.layers * per_layer * 1e3,
                    pred_attn_fwd_ms_layer=pred.fwd_s * 1e3,
                    pred_attn_fwd_bwd_ms_layer=pred.fwd_bwd_s * 1e3)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a prediction is a note, never a failure
        info["pred_error"] = f"{type(err).__name__}: {str(err)[:120]}"
    return info


def _dtype(args):
    return getattr(torch, args.dtype)


# -- the run -----------------------------------------------------------------------------

COLUMNS = ("seqlen", "docs", "impl", "attn", "ckpt", "schedule/dispatch", "ms/step",
           "tok/s/GPU", "peak GiB", "loss (step 0)",
           "rel. diff vs one GPU (step 0 / last)",
           "pred. attn ms/step")  # fmt: skip


def _fmt(x, f):
    return "-" if x is None else format(x, f)


def compare_losses(rows: list[dict]) -> None:
    """Each CP row's loss against the one-GPU loss of the same seqlen and checkpointing
    (``hamilton`` first, else any), as ``loss_ref`` / ``loss_rel_diff``."""
    for r in rows:
        if r["impl"] == "one GPU" or r.get("loss") is None:
            continue
        refs = [x for x in rows if x["impl"] == "one GPU" and x["seqlen"] == r["seqlen"]
                and x.get("loss") is not None]  # fmt: skip
        refs.sort(key=lambda x: (x["ckpt"] != r["ckpt"], x["attn"] != "hamilton"))
        if refs:
            ref = refs[0]
            r["loss_ref"] = ref["loss"]
            r["loss_ref_config"] = f"{ref['attn']}, ckpt {ref['ckpt']}"
            r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
            r["loss_last_rel_diff"] = abs(r["loss_last"] - ref["loss_last"]) / max(
                abs(ref["loss_last"]), 1e-30
            )


def table(rows: list[dict]) -> str:
    from hamilton_attn.tables import format_table

    body = []
    for r in rows:
        sd = "-" if r["impl"] == "one GPU" else f"{r['schedule']}/{r['dispatch']}"
        if r.get("plan_schedule") and r["impl"] != "one GPU":
            sd += f" ({r['plan_schedule']}/{r['plan_dispatch']})"
        if r["status"] != "ok":
            cells = (r["status"], "-", _fmt(r.get("peak_mem_gib"), ".1f"), "-", "-", "-")
        else:
            diff = r.get("loss_rel_diff")
            cells = (
                _fmt(r["ms_per_step"], ".1f"),
                _fmt(r["tokens_per_s_per_gpu"], ".0f"),
                _fmt(r.get("peak_mem_gib"), ".1f"),
                _fmt(r["loss"], ".5f"),
                "-"
                if diff is None
                else f"{diff:.1e} / {r['loss_last_rel_diff']:.1e} (vs {r['loss_ref_config']})",
                _fmt(r.get("pred_attn_ms"), ".1f"),
            )
        body.append((r["seqlen"], r["docs"], r["impl"], r["attn"], r["ckpt"], sd, *cells))
    return format_table(COLUMNS, body)


def write(args, rows, meta) -> str:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(
        args.out, args.name or f"hf_train_{meta['hardware_tag']}_{meta['date'][:10]}"
    )
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = table(rows)
    errors = [f"- {r['seqlen']} {r['impl']} {r['attn']} ckpt {r['ckpt']}: {r['error']}"
              for r in rows if r.get("error")]  # fmt: skip
    with open(stem + ".md", "w") as f:
        f.write(
            f"# transformers training step: one GPU against context parallelism\n\n"
            f"- hardware: {meta['hardware']} x {meta['world_size']}\n- date: {meta['date']}\n"
            f"- command: `{meta['command']}`\n"
            f"- torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}\n"
            f"- model: {meta['model']}\n"
            f"- one step = forward, backward, AdamW step; ms/step: median of {args.steps} "
            f"after {args.warmup} warm-up; tok/s/GPU = tokens / time / GPUs; peak GiB: "
            "max_memory_allocated (largest rank); loss: the first step's (same seed and "
            "weights everywhere), CP's relative difference to the one-GPU loss named, at the "
            "first step and at the last (after the AdamW updates); "
            "pred.: the planner's attention time per step (attention only; checkpointing "
            "adds a forward)\n\n"
        )
        f.write(text + "\n")
        if errors:
            f.write("\nErrors:\n" + "\n".join(errors) + "\n")
    return stem


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, dev = init(args.timeout_min)
    args.dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    dtype = _dtype(args)
    import transformers

    from hamilton_attn.integrations import transformers as hat  # noqa: F401 - registers

    name, tag = hardware(dev)
    stem = None
    meta = {
        "hardware": name,
        "hardware_tag": tag + (f"x{world}" if world > 1 else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["torchrun", f"--nproc_per_node {world}"] if world > 1 else ["python"])
        + " "
        + " ".join(sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "world_size": world,
        "args": vars(args),
        "model": _model_line(args),
    }
    # One-rank groups for "hamilton" on one GPU (new_group is collective: every rank
    # creates every rank's group).
    solo = [dist.new_group([r]) for r in range(world)] if world > 1 else [None]
    cp_group = dist.group.WORLD if world > 1 else None
    rows: list[dict] = []
    status = 0
    for seqlen in args.seqlens:
        batch = make_batch(args, seqlen, dev)
        base = {"seqlen": seqlen, "docs": len(batch["cu"]) - 1}
        singles = [] if args.no_single else [
            dict(base, impl="one GPU", attn=a, ckpt=c, schedule="-", dispatch="-")
            for c in (args.single_ckpt or args.ckpt) for a in args.attn
        ]  # fmt: skip
        mine = []
        for i, cfg in enumerate(singles):
            if i % world != rank:
                continue
            group = solo[rank] if cfg["attn"] == "hamilton" else None
            if cfg["attn"] == "hamilton" and world == 1:
                group = None
            r = run_config(args, cfg, batch, dtype, dev, group)
            r["order"] = i
            r["rank"] = rank
            mine.append(r)
            _log(rank, r, all_ranks=True)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            mine = [r for part in gathered for r in part]
        rows += sorted(mine, key=lambda r: r["order"])
        if world > 1 and not args.no_cp:
            for c in args.ckpt:
                for sc in args.schedules:
                    for dp in args.dispatches:
                        cfg = dict(base, impl=f"CP x{world}", attn="hamilton", ckpt=c,
                                   schedule=sc, dispatch=dp)  # fmt: skip
                        r = run_config(args, cfg, batch, dtype, dev, cp_group)
                        rows.append(_agree(r, dev))
                        _log(rank, rows[-1])
                        if rank == 0:  # after every configuration: a hang loses no row
                            compare_losses(rows)
                            write(args, rows, meta)
        compare_losses(rows)
        if rank == 0:
            stem = write(args, rows, meta)
        batch = None
    if rank == 0:
        print(table(rows))
        print(f"wrote {stem}.md and {stem}.json")
        if args.tol is not None:
            bad = [r for r in rows if (r.get("loss_rel_diff") or 0.0) > args.tol]
            if bad:
                print(f"LOSS MISMATCH: {len(bad)} CP row(s) differ by more than {args.tol}")
                status = 1
    if world > 1:
        flag = torch.tensor([status], device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        status = int(flag.item())
        dist.destroy_process_group()
    return status


def _agree(row: dict, dev) -> dict:
    """A CP row as every rank saw it: OOM / error if any rank had one, the largest peak
    memory and the slowest rank's time."""
    if not dist.is_initialized():
        return row
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    out = dict(rows[0])
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        out.update(status=bad[0]["status"], error=bad[0].get("error"))
    mems = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None]
    if mems:
        out["peak_mem_gib"] = max(mems)
    if not bad:
        out["ms_per_step"] = max(r["ms_per_step"] for r in rows)
        out["tokens_per_s_per_gpu"] = min(r["tokens_per_s_per_gpu"] for r in rows)
    return out


def _model_line(args) -> str:
    h, i, layers, v = args.hidden, args.intermediate, args.layers, args.vocab
    kvd = args.kv_heads * (h // args.heads)
    per_layer = 2 * h * h + 2 * h * kvd + 3 * h * i + 2 * h
    n = layers * per_layer + 2 * v * h + h
    return (f"LlamaForCausalLM, random weights (seed {args.seed}): {layers} layers, hidden {h}, "
            f"{args.heads} heads / {args.kv_heads} KV heads, intermediate {i}, vocabulary {v}: "
            f"{n / 1e9:.3f}B parameters (untied embeddings)")  # fmt: skip


def _log(rank: int, r: dict, all_ranks: bool = False) -> None:
    if rank != 0 and not all_ranks:
        return
    what = f"[rank {rank}] {r['seqlen']} {r['impl']} {r['attn']} ckpt {r['ckpt']}"
    if r["impl"] != "one GPU":
        what += f" {r['schedule']}/{r['dispatch']}"
    if r["status"] != "ok":
        print(f"{what}: {r['status']} {r.get('error', '')}", flush=True)
        return
    pred = f", predicted attention {r['pred_attn_ms']:.1f} ms" if "pred_attn_ms" in r else ""
    print(f"{what}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
          f"loss {r['loss']:.6f}{pred}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
