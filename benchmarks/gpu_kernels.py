"""Check and time the ``sdpa`` and ``flex`` local kernels on one GPU.

Run on one H100 / H200 from the repository root (about 3-4 minutes, most of it
FlexAttention compiling)::

    python benchmarks/gpu_kernels.py

CPU smoke test of this script (tiny sizes, no timing claims)::

    python benchmarks/gpu_kernels.py --smoke --out-dir /tmp/results

(a) Correctness. Each backend (``sdpa`` with its own op choice and with each op
forced, ``flex``, and ``attention(backend="auto")``) runs forward and backward on
full, causal (Sq == Sk, Sq < Sk, Sq > Sk), GQA 32/8, head dims 64/128/256, packed
causal documents, sliding-window and prefix-LM masks, in bf16 and float32. Its error
against the float64 reference must satisfy, per tensor (out, lse, dq, dk, dv), the
flash-attention test rule::

    max|kernel - ref64| <= 2 * max|math - ref64| + atol

where ``math`` is plain torch attention computed in the same dtype and ``atol`` is
twice the rounding error of that dtype at the reference's magnitude.

(b) Speed, bf16, B = 1, 32 heads, head dim 128, CUDA events, median of 10 after
warm-up. FLOPs: ``4 * B * H * Sq * Sk * D``, halved for causal, x2.5 for backward;
for packed documents only visible pairs count (``4 * B * H * D * mask.area()``).
Backward time is (forward + backward) - forward.
- full / causal at 8K and 32K tokens: ``attention(..., backend="auto")`` beside
  ``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``;
- packed causal documents at 32K tokens (long-tailed lognormal lengths, seed 1, about
  20 documents; the lengths are printed and saved): ``attention(..., backend="auto")``
  beside compiled FlexAttention called by hand with a ``create_block_mask`` document
  mask (mask build not timed).

(c) Writes ``benchmarks/results/gpu_kernels_<GPU>.md`` and ``.json`` (hardware,
torch / triton versions, date, command line) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from hamilton_attn import Mask, attention  # noqa: E402
from hamilton_attn.kernels import select_kernel  # noqa: E402
from hamilton_attn.kernels.flex import FlexKernel, compiled_flex_attention  # noqa: E402
from hamilton_attn.kernels.reference import ReferenceKernel  # noqa: E402
from hamilton_attn.kernels.sdpa import SdpaKernel  # noqa: E402

REF = ReferenceKernel()


# ---------------------------------------------------------------------------------------
# (a) correctness
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    mask: Mask
    hq: int
    hk: int
    d: int
    flex_fp32: bool = False  # also run flex / auto in float32 (each costs a compile)
    flex: bool = True  # run flex at all (a new shape costs two compiles on GPU)


def correctness_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [
            Case("causal 64", Mask.causal(64), 4, 2, 16, True),
            Case("causal 40x97 (Sq<Sk)", Mask.causal(40, 97), 4, 2, 16),
            Case("causal 97x40 (Sq>Sk)", Mask.causal(97, 40), 4, 4, 16),
            Case("docs causal 4", Mask.varlen([0, 7, 30, 31, 64], causal=True), 4, 1, 16),
            Case("sliding window", Mask.sliding_window(64, (9, 0)), 4, 2, 16),
        ]
    docs4 = [0, 100, 400, 650, 1024]
    docs20 = [0] + [round(1024 * (i / 20) ** 1.5) for i in range(1, 21)]
    return [
        Case("full 1024", Mask.full(1024), 8, 8, 128),
        Case("causal 1024", Mask.causal(1024), 8, 8, 128, True),
        Case("full 300x700", Mask.full(300, 700), 8, 8, 128, flex=False),
        Case("causal 384x1000 (Sq<Sk)", Mask.causal(384, 1000), 8, 8, 128),
        Case("causal 1000x384 (Sq>Sk, empty rows)", Mask.causal(1000, 384), 8, 8, 128),
        Case("causal 1x777 (one query)", Mask.causal(1, 777), 8, 8, 128),
        Case("GQA 32/8 causal 1024", Mask.causal(1024), 32, 8, 128),
        Case("D=64 causal 1024", Mask.causal(1024), 8, 8, 64),
        Case("D=256 causal 1024", Mask.causal(1024), 8, 8, 256),
        Case("D=256 full 1024", Mask.full(1024), 8, 8, 256),
        Case("docs causal, 4 docs", Mask.varlen(docs4, causal=True), 8, 8, 128),
        Case("docs causal, 20 docs", Mask.varlen(docs20, causal=True), 8, 8, 128),
        Case("prefix-LM 1024 (prefix 200)", Mask.prefix_lm(1024, 200), 8, 8, 128),
        Case("sliding window 1024 (256, 0)", Mask.sliding_window(1024, (256, 0)), 8, 8, 128),
    ]


def variants(device: torch.device, smoke: bool):
    """(label, kernel or None for attention(auto), dtypes) to check."""
    if device.type == "cpu":  # kept small: every new flex shape traces through dynamo
        return [
            ("sdpa", SdpaKernel(), ("bf16", "fp32")),
            ("flex", FlexKernel(block_size=16), ("fp32",)),
            ("auto", None, ("bf16",)),
        ]
    return [
        ("sdpa", SdpaKernel(), ("bf16", "fp32")),
        ("sdpa:cudnn", SdpaKernel(force_op="cudnn"), ("bf16",)),
        ("sdpa:flash", SdpaKernel(force_op="flash"), ("bf16",)),
        ("sdpa:efficient", SdpaKernel(force_op="efficient"), ("bf16", "fp32")),
        ("flex", FlexKernel(), ("bf16", "fp32")),
        ("auto", None, ("bf16", "fp32")),
    ]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def math_attention(q, k, v, dense, scale):
    """Plain torch attention computed in the inputs' dtype (the precision baseline)."""
    hq = q.shape[1]
    k = k.repeat_interleave(hq // k.shape[1], 1)
    v = v.repeat_interleave(hq // v.shape[1], 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~dense, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(p, v), lse


def run_kernel(kernel, q, k, v, dout, mask, scale):
    """(out, lse, dq, dk, dv) of a kernel's forward and backward, or of attention(auto)."""
    if kernel is not None:
        out, lse = kernel.forward(q, k, v, mask, scale)
        return (out, lse, *kernel.backward(dout, q, k, v, out, lse, mask, scale))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, mask, scale=scale, layout="bhsd", backend="auto", return_lse=True)
    out.backward(dout)
    return (out.detach(), lse, *(t.grad for t in leaves))


def _atol(ref, dtype):
    r = ref.to(dtype)
    ulps = 2 * ((r + 0.3) - 0.3 - r).abs().max().item() if r.numel() else 0.0
    # float32 kernels sum in another order than torch's math (tiles, split-K); a 1e-5
    # absolute slack on O(1) values is still far below any masking or scaling error.
    return max(ulps, 1e-5) if dtype == torch.float32 else ulps


def check_case(case: Case, label, kernel, dtype_name, device, seed) -> dict:
    dtype = DTYPES[dtype_name]
    mask = case.mask
    sq, sk = mask.shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(h, s):
        return torch.randn(1, h, s, case.d, generator=gen, device=device)

    q32, k32, v32, do32 = rnd(case.hq, sq), rnd(case.hk, sk), rnd(case.hk, sk), rnd(case.hq, sq)
    q, k, v, dout = (t.to(dtype) for t in (q32, k32, v32, do32))
    scale = 1.0 / math.sqrt(case.d)
    row = {"case": case.name, "backend": label, "dtype": dtype_name}
    if kernel is not None:
        reason = kernel.unsupported_reason(q, k, v, mask)
        if reason is not None:
            return {**row, "ok": True, "skipped": reason}
    else:
        row["picked"] = select_kernel("auto", q, k, v, mask).name
    # float64 reference on the same (rounded) inputs.
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = REF.forward(q64, k64, v64, mask, scale)
    ref = (ref_out, ref_lse, *REF.backward(do64, q64, k64, v64, ref_out, ref_lse, mask, scale))
    # Same-precision plain torch, with autograd.
    dense = mask.to_dense(device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    m_out, m_lse = math_attention(*leaves, dense, scale)
    m_out.backward(dout)
    base = (m_out.detach(), m_lse, *(t.grad for t in leaves))
    try:
        got = run_kernel(kernel, q, k, v, dout, mask, scale)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # report and go on to the next check
        return {
            **row,
            "ok": False,
            "error": f"{type(exc).__name__}: {str(exc)[:300]}",
            "trace": traceback.format_exc(limit=4),
        }
    errs, ok = {}, True
    live = ~torch.isneginf(ref_lse)
    for name, g, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        g, b, r = g.double(), b.double(), r.double()
        if name == "lse":
            if not torch.equal(torch.isneginf(g), ~live):
                ok = False
                errs[name] = {"err": math.inf, "tol": 0.0, "note": "-inf rows differ"}
                continue
            g, b, r = g[live], b[live], r[live]
        if not torch.isfinite(g).all():
            ok = False
            errs[name] = {"err": math.nan, "tol": 0.0, "note": "non-finite values"}
            continue
        err = (g - r).abs().max().item() if r.numel() else 0.0
        # lse is float32 whatever the inputs' dtype.
        tol = 2 * ((b - r).abs().max().item() if r.numel() else 0.0) + _atol(
            r, torch.float32 if name == "lse" else dtype
        )
        errs[name] = {"err": err, "tol": tol}
        ok &= err <= tol
    return {**row, "ok": bool(ok), "errors": errs}


def run_correctness(device, smoke) -> list[dict]:
    results = []
    cases = correctness_cases(smoke)
    for ci, case in enumerate(cases):
        for label, kernel, dtypes in variants(device, smoke):
            for dt in dtypes:
                if label == "flex" and not case.flex:
                    continue
                if (
                    dt == "fp32"
                    and label in ("flex", "auto")
                    and not case.flex_fp32
                    and device.type == "cuda"
                ):
                    continue  # each float32 flex shape is one more compile
                res = check_case(case, label, kernel, dt, device, seed=1000 + ci)
                results.append(res)
                print(_format_check(res), flush=True)
    return results


def _format_check(res: dict) -> str:
    head = f"{res['case']:<38} {res['backend']:<15} {res['dtype']:<5}"
    if "skipped" in res:
        return f"SKIP {head} ({res['skipped'][:90]})"
    if "error" in res:
        return f"FAIL {head} {res['error']}"
    picked = f" [{res['picked']}]" if "picked" in res else ""
    errs = " ".join(f"{k} {v['err']:.1e}/{v['tol']:.1e}" for k, v in res["errors"].items())
    return f"{'PASS' if res['ok'] else 'FAIL'} {head} {errs}{picked}"


# ---------------------------------------------------------------------------------------
# (b) speed
# ---------------------------------------------------------------------------------------


def bench_ms(fn, device, warmup=3, reps=10, inner=4) -> float:
    """Median time of one ``fn`` call in ms (CUDA events on GPU). Each repeat times
    ``inner`` back-to-back calls, as a training step issues them, so the host's launch
    time overlaps the GPU work for every implementation alike."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def doc_lengths(total: int, seed: int = 1) -> list[int]:
    """Long-tailed (lognormal) document lengths summing to ``total``, seeded."""
    gen = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    # lognormal(7.0, 1.2) at 32K tokens (the GPU_FACTS probe: 21 documents), scaled.
    mu = 7.0 + math.log(total / 32768)
    while sum(lens) < total:
        lens.append(max(16, int(torch.empty(1).log_normal_(mu, 1.2, generator=gen).item())))
    lens[-1] -= sum(lens) - total
    if lens[-1] <= 0:
        lens.pop()
        lens[-1] += total - sum(lens)
    return lens


def _time_pair(f, inputs, device, reps):
    """(forward ms, backward ms) of ``f()`` differentiated w.r.t. ``inputs``."""
    out = f()
    g = torch.randn_like(out)
    t_f = bench_ms(f, device, reps=reps)
    t_fb = bench_ms(lambda: torch.autograd.grad(f(), inputs, g), device, reps=reps)
    return t_f, max(t_fb - t_f, 1e-6)


def run_perf(device, smoke) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, h, d = (1, 32, 128) if not smoke else (1, 2, 16)
    sizes = (8192, 32768) if not smoke else (128,)
    reps = 10 if not smoke else 2
    rows = []

    def add(case, impl, kind, ms, flops, **extra):
        rows.append(
            {
                "case": case,
                "impl": impl,
                "pass": kind,
                "ms": ms,
                "tflops": flops / (ms * 1e-3) / 1e12,
                **extra,
            }
        )
        print(
            f"{case:<34} {impl:<28} {kind:<3} {ms:9.3f} ms {rows[-1]['tflops']:8.2f} TF/s",
            flush=True,
        )

    for s in sizes:
        gen = torch.Generator(device=device).manual_seed(s)
        q, k, v = (
            torch.randn(b, h, s, d, generator=gen, device=device, dtype=dt).requires_grad_()
            for _ in range(3)
        )
        for causal in (False, True):
            case = (
                f"{s // 1024}K {'causal' if causal else 'full'}"
                if s >= 1024
                else f"{s} {'causal' if causal else 'full'}"
            )
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            mask = Mask.causal(s) if causal else Mask.full(s)
            picked = _describe_auto(q, k, v, mask)
            ours = functools.partial(
                attention, q, k, v, causal=causal, layout="bhsd", backend="auto"
            )
            t_f, t_b = _time_pair(ours, (q, k, v), device, reps)
            add(case, f"auto [{picked}]", "fwd", t_f, flops)
            add(case, f"auto [{picked}]", "bwd", t_b, 2.5 * flops)
            torch_sdpa = functools.partial(
                F.scaled_dot_product_attention, q, k, v, is_causal=causal
            )
            if device.type == "cuda":
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_f, t_b = _time_pair(torch_sdpa, (q, k, v), device, reps)
                impl = "cuDNN SDPA"
            else:
                t_f, t_b = _time_pair(torch_sdpa, (q, k, v), device, reps)
                impl = "torch SDPA (cpu)"
            add(case, impl, "fwd", t_f, flops)
            add(case, impl, "bwd", t_b, 2.5 * flops)
        del q, k, v

    # Packed causal documents.
    s = 32768 if not smoke else 256
    lens = doc_lengths(s)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    mask = Mask.varlen(cu, causal=True)
    flops = 4 * b * h * d * mask.area()
    case = (
        f"{s // 1024 if s >= 1024 else s}{'K' if s >= 1024 else ''} packed docs ({len(lens)} docs)"
    )
    print(f"document lengths ({len(lens)}): {lens}", flush=True)
    gen = torch.Generator(device=device).manual_seed(7)
    q, k, v = (
        torch.randn(b, h, s, d, generator=gen, device=device, dtype=dt).requires_grad_()
        for _ in range(3)
    )
    picked = _describe_auto(q, k, v, mask)
    t_f, t_b = _time_pair(
        lambda: attention(q, k, v, mask, layout="bhsd", backend="auto"), (q, k, v), device, reps
    )
    add(case, f"auto [{picked}]", "fwd", t_f, flops, doc_lengths=lens)
    add(case, f"auto [{picked}]", "bwd", t_b, 2.5 * flops, doc_lengths=lens)
    doc = torch.repeat_interleave(
        torch.arange(len(lens), device=device), torch.tensor(lens, device=device)
    )

    def doc_mask(bb, hh, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block_mask = create_block_mask(doc_mask, None, None, s, s, device=str(device))
    if device.type == "cuda":
        fa = compiled_flex_attention()
        t_f, t_b = _time_pair(lambda: fa(q, k, v, block_mask=block_mask), (q, k, v), device, reps)
        add(case, "FlexAttention (compiled, by hand)", "fwd", t_f, flops)
        add(case, "FlexAttention (compiled, by hand)", "bwd", t_b, 2.5 * flops)
    else:  # flex has no CPU backward: forward only, eager
        qd, kd, vd = (t.detach() for t in (q, k, v))
        t_f = bench_ms(lambda: flex_attention(qd, kd, vd, block_mask=block_mask), device, reps=reps)
        add(case, "FlexAttention (eager, by hand)", "fwd", t_f, flops)
    return rows


def _describe_auto(q, k, v, mask) -> str:
    kernel = select_kernel("auto", q, k, v, mask)
    if kernel.name == "sdpa":
        ops = sorted({c.op for c in kernel.calls(q, k, v, mask)})
        return f"sdpa:{'+'.join(ops)}"
    return kernel.name


# ---------------------------------------------------------------------------------------
# (c) report
# ---------------------------------------------------------------------------------------


def gpu_kind(device) -> str:
    if device.type != "cuda":
        return "cpu-smoke"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def environment(device, argv) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "hardware": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/gpu_kernels.py", *argv]),
    }


def perf_table(rows: list[dict]) -> list[str]:
    """Markdown rows: our auto beside the baseline of the same case and pass."""
    lines = [
        "| case | pass | auto (picked) TF/s | baseline | baseline TF/s | auto / baseline |",
        "|---|---|---|---|---|---|",
    ]
    by_case: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["pass"]), []).append(r)
    for (case, kind), rs in by_case.items():
        ours = [r for r in rs if r["impl"].startswith("auto")]
        others = [r for r in rs if not r["impl"].startswith("auto")]
        for o in ours:
            if others:
                for base in others:
                    lines.append(
                        f"| {case} | {kind} | {o['tflops']:.1f} ({o['impl'][6:-1]}) | "
                        f"{base['impl']} | {base['tflops']:.1f} | "
                        f"{o['tflops'] / base['tflops']:.2f} |"
                    )
            else:
                lines.append(
                    f"| {case} | {kind} | {o['tflops']:.1f} ({o['impl'][6:-1]}) | - | - | - |"
                )
    return lines


def write_report(
    out_dir: Path, device, argv, checks, perf, name: str | None = None
) -> tuple[Path, Path]:
    env = environment(device, argv)
    kind = gpu_kind(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or f"gpu_kernels_{kind}"
    md_path, js_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    failed = [c for c in checks if not c["ok"]]
    skipped = [c for c in checks if "skipped" in c]
    lines = [
        f"# Local kernels on {env['hardware']}",
        "",
        f"- torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
        f"triton {env['triton']}, Python {env['python']}",
        f"- date {env['date']}",
        f"- command `{env['command']}`",
        "",
        "## Correctness (vs float64 reference; err <= 2 x same-dtype torch math + atol)",
        "",
        f"{len(checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped (backend cannot run the mask / dtype).",
        "",
    ]
    lines += ["```"] + [_format_check(c) for c in checks] + ["```", ""]
    if perf:
        lines += [
            "## Speed (bf16, B=1, H=32, D=128; TF/s, fwd 4*B*H*Sq*Sk*D, halved causal, "
            "x2.5 bwd; packed docs count visible pairs only)",
            "",
        ]
        lines += perf_table(perf)
        docs = [r for r in perf if "doc_lengths" in r]
        if docs:
            lines += ["", f"Packed document lengths (lognormal, seed 1): {docs[0]['doc_lengths']}"]
        lines.append("")
    md_path.write_text("\n".join(lines))
    js_path.write_text(
        json.dumps({"environment": env, "correctness": checks, "perf": perf}, indent=1, default=str)
    )
    return md_path, js_path


# ---------------------------------------------------------------------------------------


def _raise_recompile_limits():
    """Many shapes in one process: let dynamo compile each instead of falling back."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on CPU: tests this script, measures nothing",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="file stem (default gpu_kernels_GPU)")
    parser.add_argument("--no-perf", action="store_true", help="correctness checks only")
    parser.add_argument("--no-check", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    _raise_recompile_limits()
    t0 = time.perf_counter()
    checks = [] if args.no_check else run_correctness(device, args.smoke)
    perf = [] if args.no_perf else run_perf(device, args.smoke)
    md, js = write_report(args.out_dir, device, argv, checks, perf, args.name)
    failed = [c for c in checks if not c["ok"]]
    print(
        f"\n{len(checks)} checks, {len(failed)} failed; {time.perf_counter() - t0:.0f} s; "
        f"wrote {md} and {js}"
    )
    print("\n".join(perf_table(perf)) if perf else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
