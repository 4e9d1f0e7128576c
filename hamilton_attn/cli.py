"""Command line: ``hamilton-attn demo | verify``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hamilton-attn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="every schedule on W ranks vs the reference (no GPU needed)")
    d.add_argument("--world-size", type=int, default=None,
                   help="ranks (default: 8 on CPU, one per GPU on cuda)")
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    d.add_argument("--seqlen", type=int, default=777)
    d.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on cuda")
    d.add_argument("--schedules", nargs="*", default=None)
    v = sub.add_parser("verify", help="every local backend here vs the reference")
    v.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    v.add_argument("--seqlen", type=int, default=97)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(args.world_size, args.device, args.seqlen, args.dtype, args.schedules)
    if args.cmd == "verify":
        import torch

        from .verify_cli import run_verify

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"hamilton-attn verify on {device}")
        return 0 if run_verify(device, seqlen=args.seqlen) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
