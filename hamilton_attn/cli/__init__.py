"""Command line: ``hamilton-attn demo | verify | bench | plan``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hamilton-attn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="every schedule on W ranks vs the reference (no GPU needed)")
    d.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks (default: 8 on CPU, one per GPU on cuda)",
    )
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    d.add_argument("--seqlen", type=int, default=777)
    d.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on cuda")
    d.add_argument("--schedules", nargs="*", default=None)
    v = sub.add_parser("verify", help="every local backend here vs the reference")
    v.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    v.add_argument("--seqlen", type=int, default=None, help="default 97 on CPU, 1000 on GPU")
    v.add_argument("--head-dim", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    v.add_argument(
        "--variants-only", action="store_true", help="only the attention variants' cases"
    )
    v.add_argument("--seed", type=int, default=0, help="the random draw of the inputs")
    b = sub.add_parser("bench", help="schedules vs one device and PyTorch's context_parallel")
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda if a GPU is visible, else cpu (gloo)",
    )
    b.add_argument("--world-size", type=int, default=None)
    b.add_argument(
        "--schedules",
        nargs="+",
        default=["ring", "bidi_ring", "allgather"],
        help="schedules, 'ulysses', or hybrids of heads x context such as ring+ulysses2",
    )
    b.add_argument("--dispatches", nargs="+", default=["zigzag"])
    b.add_argument(
        "--masks",
        nargs="+",
        default=["causal", "full", "docs"],
        help="causal, full, docs (long-tailed packed documents), docs_short (64-512 tokens), "
        "window",
    )
    b.add_argument("--tokens-per-device", type=int, nargs="+", default=[16384])
    b.add_argument("--heads", type=int, default=32)
    b.add_argument("--kv-heads", type=int, default=None)
    b.add_argument("--head-dim", type=int, default=128)
    b.add_argument("--dtype", default=None)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument(
        "--inner", type=int, default=3, help="back-to-back calls per timed sample (default 3)"
    )
    b.add_argument("--node-size", type=int, default=None, help="for hamilton_2level")
    b.add_argument("--no-torch-cp", action="store_true")
    b.add_argument(
        "--fwd-only", action="store_true", help="time the forward only (no forward+backward)"
    )
    b.add_argument(
        "--graphs",
        action="store_true",
        help="also time the forward replayed as CUDA graphs (ours and one device alike)",
    )
    b.add_argument(
        "--backward",
        nargs="+",
        default=["replay"],
        choices=["replay", "reverse"],
        help="backward modes to time (see plan(backward=...))",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every configuration this many times over, in turn; report medians",
    )
    b.add_argument(
        "--transports",
        nargs="+",
        default=None,
        choices=["nccl", "ce"],
        help="GPU transfer paths to time side by side (ce: copy engine within a host)",
    )
    b.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        choices=["auto", "reference", "sdpa", "flex", "triton"],
        help="local kernels to time side by side (one device and ours alike; default auto)",
    )
    b.add_argument(
        "--variants",
        nargs="+",
        default=["softmax"],
        choices=["softmax", "softcap", "sigmoid"],
        help="attention variants to time (softcap 30; sigmoid bias -log S); PyTorch's row "
        "and the ratios to it are plain softmax",
    )
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--name", default=None, help="file stem under --out")
    b.add_argument("--plot", default=None, help="PNG of efficiency against sequence length")
    from .plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(args.world_size, args.device, args.seqlen, args.dtype, args.schedules)
    if args.cmd == "verify":
        import torch

        from .verify import run_verify

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"hamilton-attn verify on {device}")
        gpu = device.startswith("cuda")
        return (
            0
            if run_verify(
                device,
                seqlen=args.seqlen or (1000 if gpu else 97),
                head_dim=args.head_dim or (64 if gpu else 32),
                seed=args.seed,
                plain=not args.variants_only,
            )
            else 1
        )
    if args.cmd == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    if args.cmd == "plan":
        from .plan import main as plan_main

        return plan_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
