"""Where the ``triton`` kernel's time goes, per case (one H100 / H200, repository root)::

    python benchmarks/gpu_triton_profile.py [--ncu]     (stage triton_profile of gpu_run.sh)

Cases: plain, softcap 30 and ALiBi softmax on causal 32K; packed causal documents of
64-512 tokens at 32K (forward and backward); long-tailed documents at 32K; the fused
block of one ``hamilton`` step at W = 8, 8K tokens per rank, packed documents. bf16,
B = 1, 32 heads, head dim 128.

Per case and pass: each compiled kernel's registers, spills and shared memory, and the
static instruction mix of its SASS (Triton's ``asm["sass"]``: tensor-core, special-function
and FP32 operations), and the forward's TF/s per setting of :data:`SETTINGS` (TMA
loads). With ``--ncu`` (run under ``ncu --profile-from-start off``, as the stage does)
nothing is timed: each case's kernels launch once more between cudaProfilerStart / Stop
for Nsight Compute's counters, in the order the script prints. Writes ``<out-dir>/<name>.md`` and ``.json`` (and each kernel's SASS
under ``--sass-dir``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_triton import (  # noqa: E402  (this folder's Triton benchmark)
    DEV,
    bench_ms,
    docs_mask,
    fused_blocks,
    lognormal_docs,
    rand_bhsd,
    uniform_docs,
)

from hamilton_attn.kernels import get_kernel  # noqa: E402
from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402
from hamilton_attn.variants import BlockVariant  # noqa: E402

#: SASS opcodes counted (by prefix): tensor core, special functions, FP32 arithmetic,
#: conversions, shuffles / barriers, loads and stores.
OPS = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "F2FP", "SHFL", "BAR",
       "LDG", "LDGSTS", "UTMALDG", "LDS", "LDSM", "STS", "STG", "ISETP", "IMAD", "FSETP")  # fmt: skip
#: The forward's switches compared (s6's run also timed Triton's automatic warp
#: specialisation, ``ws``, with pointer and TMA loads: no gain, and it does not compile
#: the entry loop; since removed).
SETTINGS = {"default": {}, "tma": {"TMA": True}}


def sass_mix(sass: str) -> dict:
    """Static counts of the opcodes of interest (``MUFU`` split by function)."""
    counts = collections.Counter()
    for line in sass.splitlines():  # "control bits<TAB>[@predicate] OPCODE operands;"
        words = [w for w in line.partition("\t")[2].split() if not w.startswith("@")]
        if not words or not words[0][:1].isupper():
            continue
        op = words[0]
        base = op.split(".")[0]
        if base == "MUFU":
            counts[op] += 1
        if base in OPS:
            counts[base] += 1
        counts["all"] += 1
    return dict(counts)


def compiled_kernels(jit) -> dict:
    """``{id: (kernel name, compiled kernel)}`` of every kernel compiled so far."""
    out = {}
    for name in ("fwd_kernel", "delta_kernel", "dq_kernel", "dkdv_kernel"):
        fn = getattr(jit, name)
        for caches in fn.device_caches.values():
            for k in caches[0].values():
                out[id(k)] = (name, k)
    return out


def describe(name, k, save=None) -> dict:
    if getattr(k, "n_regs", None) is None:
        k._init_handles()
    d = {"kernel": name, "regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
         "warps": k.metadata.num_warps, "stages": k.metadata.num_stages}  # fmt: skip
    try:
        sass = k.asm["sass"]
        d["sass"] = sass_mix(sass)
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            save.write_text(sass)
    except Exception as err:  # noqa: BLE001 - no disassembler on this machine
        d["sass"] = {"error": str(err)[:120]}
    return d


def cases():
    s32 = 32768
    causal = Mask.causal(s32)
    return [
        ("plain causal 32K", causal, None, False),
        ("softcap 30 causal 32K", causal, BlockVariant(kind="softmax", softcap=30.0), False),
        ("alibi causal 32K", causal,
         BlockVariant(kind="softmax", alibi=torch.rand(1, 32, device=DEV) * 0.01), False),
        ("docs 64-512 32K", docs_mask(uniform_docs(s32, 64, 512)), None, True),
        ("lognormal docs 32K", docs_mask(lognormal_docs(s32)), None, False),
        ("hamilton docs 8K/rank step", fused_blocks("hamilton", "docs", 8192)[0], None, False),
        ("plain causal 32K backward", causal, None, True),
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true", help="profile one launch per case, no timing")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--sass-dir", type=Path, default=None, help="also write each kernel's SASS")
    args = ap.parse_args(argv)
    kern = get_kernel("triton")
    jit = tk.load(False)
    base = {n: getattr(tk, n) for n in {n for sw in SETTINGS.values() for n in sw}}
    rows = []
    for case, mask, variant, bwd in cases():
        kw = {} if variant is None else {"variant": variant}
        q, k, v = (rand_bhsd(mask.shape[0 if i == 0 else 1], 32, 128, i) for i in range(3))
        do = torch.randn(1, 32, mask.shape[0], 128, device=DEV, dtype=torch.bfloat16)
        fl = 4.0 * 32 * 128 * mask.area()
        row = {"case": case}
        for label, switches in SETTINGS.items():
            for n, val in {**base, **switches}.items():
                setattr(tk, n, val)
            first = label == "default"
            before = compiled_kernels(jit)
            try:
                o, lse = kern.forward(q, k, v, mask, 0.088, **kw)
                if bwd and first:
                    kern.backward(do, q, k, v, o, lse, mask, 0.088, **kw)
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - a setting that does not compile
                row[f"setting={label}"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"{case} setting={label}: failed {str(err)[:300]}", flush=True)
                continue
            new = {i: nk for i, nk in compiled_kernels(jit).items() if i not in before}
            tag = "".join(ch if ch.isalnum() else "_" for ch in f"{case}_{label}")
            sass_dir = None if args.ncu else args.sass_dir
            entry = {
                "kernels": [
                    describe(n, c, sass_dir and sass_dir / f"{tag}_{n}.sass")
                    for n, c in new.values()
                ]
            }
            if args.ncu:
                torch.cuda.cudart().cudaProfilerStart()
                o, lse = kern.forward(q, k, v, mask, 0.088, **kw)
                if bwd and first:
                    kern.backward(do, q, k, v, o, lse, mask, 0.088, **kw)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                print(f"profiled: {case} setting={label} (fwd{', delta, dq, dkdv' if bwd and first else ''})",
                      flush=True)  # fmt: skip
            else:
                entry["fwd_tfs"] = (
                    fl / bench_ms(lambda: kern.forward(q, k, v, mask, 0.088, **kw)) / 1e9  # noqa: B023
                )
            row[f"setting={label}"] = entry
            print(f"{case} setting={label}: {json.dumps(entry)}", flush=True)
        for n, val in base.items():
            setattr(tk, n, val)
        rows.append(row)
        q = k = v = do = None
        torch.cuda.empty_cache()
    if args.ncu:
        return 0
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_triton_profile.py " + " ".join(argv or sys.argv[1:]),
    }
    name = args.name or "triton_profile"
    lines = [f"# Triton kernel profile: {env['date']}", "",
             f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; command "
             f"`{env['command']}`. bf16, B=1, 32 heads, head dim 128. Static SASS counts per "
             "compiled kernel; forward TF/s over visible pairs per setting (`tma`: TMA "
             "loads; `ws` in s6: Triton's warp specialisation).", "",
             "| case | setting | fwd TF/s | kernel | regs | spills | shared | warps/stages | "
             "HGMMA | MUFU.EX2 | MUFU.TANH | FFMA | FMUL | FADD | FMNMX | FSEL | all |",
             "|" + "---|" * 17]  # fmt: skip
    for r in rows:
        for label in SETTINGS:
            e = r.get(f"setting={label}", {})
            if "error" in e:
                lines.append(f"| {r['case']} | {label} | failed: {e['error'][:60]} |" + " |" * 14)
                continue
            for kd in e.get("kernels", []):
                s = kd["sass"]
                tfs = e.get("fwd_tfs")
                cells = [r["case"], label, f"{tfs:.0f}" if tfs else "-", kd["kernel"],
                         str(kd["regs"]), str(kd["spills"]), str(kd["shared"]),
                         f"{kd['warps']}/{kd['stages']}"]  # fmt: skip
                cells += [str(s.get(op, 0)) for op in
                          ("HGMMA", "MUFU.EX2", "MUFU.TANH", "FFMA", "FMUL", "FADD", "FMNMX",
                           "FSEL", "all")]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out_dir / f"{name}.json").write_text(
        json.dumps({"environment": env, "rows": rows}, indent=1)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
