"""ALiBi's split distance against the per-pair distance on one GPU: the checks of
``gpu_triton.check`` (float64 oracle, budget 2x a same-precision torch reference) on
causal and bottom-right blocks, slopes drawn from several seeds (up to 1), with
``ALIBI_SPLIT`` on and off, printing each case's worst output.

    python benchmarks/gpu_alibi_split.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_triton as g  # noqa: E402

import hamilton_attn.kernels.triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402
from hamilton_attn.variants import BlockVariant  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args(argv)
    saved = tk.ALIBI_SPLIT
    try:
        failed = _run(args.seeds)
    finally:
        tk.ALIBI_SPLIT = saved
        tk._pick.cache_clear()
    print(f"{failed} failed")
    return 0


def _run(seeds: int) -> int:
    failed = 0
    for seed in range(seeds):
        gen = torch.Generator(device=g.DEV).manual_seed(seed)
        slopes = torch.rand(1, 4, device=g.DEV, generator=gen)
        for mname, mask in (
            ("causal 700", Mask.causal(700)),
            ("causal 300x1100", Mask.causal(300, 1100)),
        ):
            var = BlockVariant(kind="softmax", alibi=slopes, shift=5)
            for dtype in (torch.bfloat16, torch.float16):
                for split in (True, False):
                    tk.ALIBI_SPLIT = split
                    tk._pick.cache_clear()
                    r = g.check(
                        f"seed {seed} {mname} {str(dtype)[6:]} split={split}",
                        mask,
                        dtype,
                        variant=var,
                    )
                    failed += not r["ok"]
    return failed


if __name__ == "__main__":
    sys.exit(main())
