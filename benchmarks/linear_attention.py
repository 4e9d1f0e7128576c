"""Linear attention on one GPU: fla's kernels beside ours, and the context-parallel state
exchange as a share of a step.

Run on one H100 / H200 from the repository root (fla-core installed, or its wheels
carried: ``benchmarks/gpu_run.sh linear`` installs them from ``benchmarks/wheels``)::

    python benchmarks/linear_attention.py [--budget-s 300]

CPU smoke run of this script (tiny sizes, no timing claims; fla is recorded missing)::

    python benchmarks/linear_attention.py --smoke --out-dir /tmp/linear

(a) Checks, small shapes (B = 1, packed documents, an initial state): the local backends
(``torch``: ``linear.chunked.chunked_local``; ``fla``: ``linear.fla_backend.fla_local``)
against the float64 recurrence (``testing.linear_oracle``), output, final state and
gradients of q, k, v, g and the initial state, for a per-token gate and a constant one,
float32 and bf16. The reference runs on the same rounded inputs, so the error is the
kernel's own arithmetic; tolerance: the max error over the max of the reference, 1e-2 in
float32 (fla's float32 dots run in TF32) and 2e-2 in bf16 (bf16 outputs; fla keeps its
forward's chunk states in bf16). A gradient fla refuses
(per-token gate on Hopper with Triton < 3.7.1, see ``fla_backend``) is recorded as such.

(b) Kernels, bf16, B = 1, Dk = Dv = 128, S in {8K, 32K}, H in {16, 32}, CUDA events
(median of 10 repeats of 3 back-to-back calls, after warm-up): fla's
``chunk_simple_gla`` called directly with a per-token gate ``g [B, S, H]`` and with a
constant one (``g_gamma [H]``); our wrapper ``fla_local``; our plain-torch
``chunked_local``; the public ``linear_attention(backend=...)`` (argument checks
included: the gate's sign is read on every call). Forward and forward+backward (grads
of q, k, v and the gate). Rates: tokens/s, and nominal TF/s of the chunked algorithm
with chunk C = 64, counting whole C x C blocks: forward ``2 * B * S * H * (C * (Dk + Dv)
+ 2 * Dk * Dv)`` flops, forward+backward 3x that.

(c) The state exchange at 32K tokens per rank, W in {2, 4, 8}, per H. MEASURED on this
GPU: the local chunk (from (b)), and the exchange's math on the worst rank (the last:
it folds W - 1 gathered states, ``S_in = a_i S_in + M_i``, float32 ``[B, H, Dk, Dv]``),
plus the incoming state's share of a run that continues an earlier rank's sequence
(``o += scale * (q * exp(G)) @ S_in`` over all 32K tokens, and the carried final state:
``linear.api.incoming_share`` itself, bf16 on the tensor cores), forward and
forward+backward. MODELLED, not measured:
the transfer, ``W * B * H * Dk * Dv * 4`` bytes (the gathered float32 states) over
NCCL's 119 GB/s (``shared/GPU_FACTS.md``: two H200s, p2p at 16 MiB, its smallest
measured message; smaller messages are slower, so this is a lower bound), once in the
forward and once more in the backward; beside it the planner's own prediction
(``linear.exchange_cost`` on ``nvswitch:W``, latencies included). Share of a step =
(math + transfer) / (local + math + transfer).

(d) Writes ``OUT_DIR/NAME.md`` and ``.json`` (hardware, date, command, torch / triton /
fla versions); ``--budget-s`` starts no timed case after that many seconds (the files
are rewritten after each case). Exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from gpu_kernels import bench_ms  # noqa: E402  (this folder's kernel benchmark)

from hamilton_attn.linear import exchange_cost, linear_attention  # noqa: E402
from hamilton_attn.linear.api import incoming_share  # noqa: E402
from hamilton_attn.linear.chunked import CHUNK, chunked_local  # noqa: E402
from hamilton_attn.linear.fla_backend import (  # noqa: E402
    fla_available,
    fla_local,
    fla_unsupported_reason,
)
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle  # noqa: E402

#: NCCL p2p between two H200s at 16 MiB (shared/GPU_FACTS.md), bytes per second.
NVLINK_BYTES_PER_S = 119e9
TOL = {torch.float32: 1e-2, torch.bfloat16: 2e-2}


def fla_info() -> dict:
    """fla-core's version and its ``chunk_simple_gla``, or why it is missing."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # any import failure: fla is recorded missing
        return {"version": None, "fn": None, "problem": f"{type(err).__name__}: {err}"}
    return {"version": importlib.metadata.version("fla-core"), "fn": chunk_simple_gla}


def _inputs(b, s, h, dk, dv, dtype, device, seed, gate="token"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(b, s, h, dk, generator=gen, device=device, dtype=dtype) for _ in "qk")
    v = torch.randn(b, s, h, dv, generator=gen, device=device, dtype=dtype)
    q, k = q * dk**-0.25, k * dk**-0.25  # keeps the state's growth modest
    if gate == "token":  # log-sigmoid of a normal: decays near 1, as trained GLA gates are
        g = torch.nn.functional.logsigmoid(
            4 + torch.randn(b, s, h, generator=gen, device=device)
        ).float()
    else:
        g = -torch.linspace(0.01, 0.2, h, device=device)
    return q, k, v, g


# ---------------------------------------------------------------------------------------
# (a) checks
# ---------------------------------------------------------------------------------------


def _relerr(x, ref) -> float:
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_checks(device, smoke) -> list[dict]:
    """Each backend against the float64 recurrence of the same rounded inputs (so the
    error is the kernel's own arithmetic, not the rounding of its inputs)."""
    cu = [0, 70, 71, 200, 263] if smoke else [0, 500, 501, 1200, 1337]
    s, h, dk, dv, scale = cu[-1], 3, 32, 32, 0.2
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    backends = {"torch": chunked_local}
    if fla_available(device):
        backends["fla"] = fla_local
    cu_t = torch.tensor(cu, dtype=torch.int64, device=device)
    out = []
    for gate in ("token", "constant"):
        q, k, v, g = _inputs(1, s, h, dk, dv, torch.float64, "cpu", 3, gate)
        h0 = torch.randn(len(cu) - 1, h, dk, dv, dtype=torch.float64) * 0.1
        names = ["q", "k", "v", "g", "h0"] if gate == "token" else ["q", "k", "v", "h0"]
        for dt in dtypes:
            # inputs as the kernels get them: q, k, v in dt; the gate and state float32
            x0 = [q.to(dt), k.to(dt), v.to(dt), g.float(), h0.float()]
            ref = [t.double().requires_grad_() for t in x0]
            o_ref, ht_ref = linear_recurrence_oracle(
                *ref[:4], scale=scale, cu_seqlens=cu, initial_state=ref[4]
            )
            do = torch.randn_like(o_ref)
            wrt = ref if gate == "token" else ref[:3] + ref[4:]
            grads_ref = torch.autograd.grad((o_ref * do).sum() + ht_ref.sum(), wrt)
            for bname, fn in backends.items():
                row = {"check": f"{bname} {gate} gate {str(dt)[6:]}", "errors": {}}
                x = [
                    t.to(device).requires_grad_(gate == "token" or i != 3) for i, t in enumerate(x0)
                ]
                xg = x[3]
                if bname == "torch" and gate == "constant":
                    xg = xg.expand(1, s, h)  # the torch path takes g [B, S, H] only
                why = fla_unsupported_reason(x[0], xg, needs_grad=True) if bname == "fla" else None
                with torch.set_grad_enabled(why is None):  # a refused backward: forward only
                    o, ht = fn(x[0], x[1], x[2], xg, scale, cu_t, x[4])
                row["errors"]["o"] = _relerr(o, o_ref.detach())
                row["errors"]["final_state"] = _relerr(ht, ht_ref.detach())
                if why is None:
                    loss = (o.float() * do.float().to(device)).sum() + ht.sum()
                    mine = x if gate == "token" else x[:3] + x[4:]
                    for n, gr, gref in zip(names, torch.autograd.grad(loss, mine), grads_ref):
                        row["errors"][f"d{n}"] = _relerr(gr, gref)
                else:
                    row["gradients"] = f"not checked: {why}"
                row["ok"] = max(row["errors"].values()) <= TOL[dt]
                out.append(row)
                errs = ", ".join(f"{n} {e:.1e}" for n, e in row["errors"].items())
                print(f"check {row['check']:<28} {'ok' if row['ok'] else 'FAIL'}: {errs}")
                if "gradients" in row:
                    print(f"      gradients {row['gradients']}")
    return out


# ---------------------------------------------------------------------------------------
# (b) kernels
# ---------------------------------------------------------------------------------------


def nominal_flops(b, s, h, dk, dv) -> float:
    """Forward flops of the chunked algorithm, whole C x C blocks (module docstring)."""
    return 2.0 * b * s * h * (CHUNK * (dk + dv) + 2 * dk * dv)


def _impls(fla, device):
    """``(label, gate kind, call(q, k, v, g) -> o)`` of every implementation timed: ours
    first (no autotuning), then fla's (its first call per shape autotunes for minutes)."""
    out = [("ours chunked_local (torch), g [B,S,H]", "token", lambda q, k, v, g:
            chunked_local(q, k, v, g, q.shape[-1] ** -0.5)[0])]  # fmt: skip
    if fla["fn"] is not None and device.type == "cuda":
        cgla = fla["fn"]
        out += [
            (
                "fla chunk_simple_gla, g_gamma [H]",
                "constant",
                lambda q, k, v, g: cgla(q, k, v, g_gamma=g)[0],
            ),
            ("fla chunk_simple_gla, g [B,S,H]", "token", lambda q, k, v, g: cgla(q, k, v, g)[0]),
        ]
    if fla_available(device):
        out.append(("ours fla_local, g [B,S,H]", "token", lambda q, k, v, g: fla_local(
            q, k, v, g, q.shape[-1] ** -0.5)[0]))  # fmt: skip
    for backend in ("torch", "fla"):
        if backend == "torch" or fla_available(device):
            out.append((f"linear_attention(backend={backend!r})", "token", lambda q, k, v, g,
                        b=backend: linear_attention(q, k, v, g, backend=b)))  # fmt: skip
    return out


def time_case(label, gate, call, s, h, dk, dv, dtype, device, reps) -> dict:
    q, k, v, g = _inputs(1, s, h, dk, dv, dtype, device, s + h, gate)
    row = {"case": f"S={s // 1024 if s >= 1024 else s}{'K' if s >= 1024 else ''} H={h}",
           "impl": label, "S": s, "H": h, "Dk": dk, "Dv": dv}  # fmt: skip
    flops = nominal_flops(1, s, h, dk, dv)
    with torch.no_grad():
        row["fwd_ms"] = bench_ms(lambda: call(q, k, v, g), device, reps=reps, inner=3)
    leaves = [t.requires_grad_() for t in (q, k, v)] + (
        [g.requires_grad_()] if gate == "token" else []
    )
    try:
        o = call(*leaves, g) if gate != "token" else call(*leaves)
        do = torch.randn_like(o)

        def fb():
            out = call(*leaves, g) if gate != "token" else call(*leaves)
            return torch.autograd.grad(out, leaves, do)

        fb()
        row["fb_ms"] = bench_ms(fb, device, reps=reps, inner=3)
    except (RuntimeError, ValueError) as err:  # fla's Hopper refusal of the gated backward
        row["fb_refused"] = str(err).splitlines()[0][:200]
    row["fwd_Mtok_s"] = s / row["fwd_ms"] / 1e3
    row["fwd_TFs"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
    if "fb_ms" in row:
        row["fb_Mtok_s"] = s / row["fb_ms"] / 1e3
        row["fb_TFs"] = 3 * flops / (row["fb_ms"] * 1e-3) / 1e12
    fb_txt = f"{row['fb_ms']:8.3f} ms" if "fb_ms" in row else f"refused ({row['fb_refused'][:60]})"
    print(f"{row['case']:<10} {label:<40} fwd {row['fwd_ms']:8.3f} ms  f+b {fb_txt}", flush=True)
    return row


# ---------------------------------------------------------------------------------------
# (c) the state exchange
# ---------------------------------------------------------------------------------------


def exchange_math(s, h, dk, dv, w, dtype, device, reps) -> dict:
    """Measured: the worst rank's fold of W - 1 gathered states and the incoming state's
    share of its output and final state, forward and forward+backward."""
    b = 1
    gen = torch.Generator(device=device).manual_seed(w)
    m = torch.randn(w, b, h, dk, dv, generator=gen, device=device)
    a = torch.rand(w, b, h, generator=gen, device=device)
    q, _, _, g = _inputs(b, s, h, dk, dv, dtype, device, 5)
    o = torch.randn(b, s, h, dv, device=device, dtype=dtype)
    fin = torch.randn(b, h, dk, dv, device=device)
    scale = dk**-0.5

    def fold(m, a):
        s_in = torch.zeros_like(m[0])
        for i in range(w - 1):
            s_in = a[i][..., None, None] * s_in + m[i]
        return s_in

    def share(q, g, s_in):  # linear/api.py _run: a run continuing an earlier sequence
        o2, carried = incoming_share(o, q, g, s_in, scale, s)
        return o2, fin + carried

    with torch.no_grad():
        fold_ms = bench_ms(lambda: fold(m, a), device, reps=reps, inner=3)
        share_ms = bench_ms(lambda: share(q, g, fold(m, a)), device, reps=reps, inner=3)
    leaves = [t.requires_grad_() for t in (q, g, m, a)]
    do, dfin = torch.randn_like(o), torch.randn_like(fin)

    def fb():
        o2, f2 = share(q, g, fold(m, a))
        return torch.autograd.grad((o2, f2), leaves, (do, dfin))

    fb_ms = bench_ms(fb, device, reps=reps, inner=3)
    return {"fold_ms": fold_ms, "fwd_math_ms": share_ms, "fb_math_ms": fb_ms}


def exchange_rows(kernel_rows, h, dk, dv, dtype, device, s, reps) -> list[dict]:
    local = {}
    for r in kernel_rows:
        if r["S"] == s and r["H"] == h and "linear_attention" not in r["impl"]:
            local[r["impl"]] = r
    rows = []
    for w in (2, 4, 8):
        math_t = exchange_math(s, h, dk, dv, w, dtype, device, reps)
        state_bytes = h * dk * dv * 4
        nbytes = w * state_bytes
        model_ms = nbytes / NVLINK_BYTES_PER_S * 1e3
        planner = exchange_cost(w, state_bytes, f"nvswitch:{w}")
        for impl, r in local.items():
            row = {"W": w, "S_per_rank": s, "H": h, "local": impl, "state_bytes": state_bytes,
                   "gathered_bytes": nbytes, "transfer_ms_modelled": model_ms,
                   "planner_allgather_ms": planner.allgather_s * 1e3,
                   "planner_ring_ms": planner.ring_s * 1e3, **math_t}  # fmt: skip
            ex_f = math_t["fwd_math_ms"] + model_ms
            row["fwd_local_ms"] = r["fwd_ms"]
            row["fwd_share"] = ex_f / (r["fwd_ms"] + ex_f)
            if "fb_ms" in r:
                ex_fb = math_t["fb_math_ms"] + 2 * model_ms
                row["fb_local_ms"] = r["fb_ms"]
                row["fb_share"] = ex_fb / (r["fb_ms"] + ex_fb)
            rows.append(row)
            fb_txt = f"{row['fb_share']:.3f}" if "fb_share" in row else "-"
            print(
                f"exchange W={w} H={h} {impl:<40} math fwd {math_t['fwd_math_ms']:.3f} / "
                f"f+b {math_t['fb_math_ms']:.3f} ms, transfer {model_ms:.3f} ms (modelled): "
                f"share fwd {row['fwd_share']:.3f}, f+b {fb_txt}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------
# (d) files
# ---------------------------------------------------------------------------------------


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def write(res, out_dir: Path, name: str, quiet=False) -> None:
    env = res["environment"]
    lines = [
        f"# Linear attention on one {env['gpu']}: {env['date']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, fla-core {env['fla']}; command "
        f"`{env['command']}`. bf16 (float32 on CPU), B = 1, Dk = Dv = 128 (smoke: 16); "
        "times are CUDA-event medians; nominal TF/s count the chunked algorithm's whole "
        f"{CHUNK} x {CHUNK} blocks (forward+backward 3x the forward's flops). "
        "See benchmarks/linear_attention.py for what each row calls.",
        "",
        f"Checks against the float64 recurrence: {sum(c['ok'] for c in res['checks'])} "
        f"passed, {sum(not c['ok'] for c in res['checks'])} failed.",
        "",
        "## Kernels (one device)",
        "",
        "| case | implementation | fwd ms | fwd Mtok/s | fwd TF/s | f+b ms | f+b Mtok/s | f+b TF/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["kernels"]:
        fb = r.get("fb_ms")
        fb_cell = _f(fb) if fb is not None else f"refused: {r.get('fb_refused', '')[:90]}"
        lines.append(
            f"| {r['case']} | {r['impl']} | {_f(r['fwd_ms'])} | {_f(r['fwd_Mtok_s'], '{:.1f}')} | "
            f"{_f(r['fwd_TFs'], '{:.1f}')} | {fb_cell} | {_f(r.get('fb_Mtok_s'), '{:.1f}')} | "
            f"{_f(r.get('fb_TFs'), '{:.1f}')} |"
        )
    lines += [
        "",
        f"## State exchange at {res['exchange_tokens_per_rank']} tokens per rank (math MEASURED "
        "on this GPU, transfer MODELLED)",
        "",
        "Math: the last rank's fold of W - 1 states plus the incoming state's share of "
        "its output and final state. Transfer: W x state bytes at "
        f"{NVLINK_BYTES_PER_S / 1e9:.0f} GB/s (GPU_FACTS.md), once forward, once more "
        "backward; the planner's model (`exchange_cost`, nvswitch:W, latencies included) "
        "beside it. Share = (math + transfer) / (local + math + transfer).",
        "",
        "| W | H | local kernel | local fwd / f+b ms | math fwd / f+b ms | transfer ms "
        "(modelled) | planner allgather / ring ms | share fwd | share f+b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["exchange"]:
        lines.append(
            f"| {r['W']} | {r['H']} | {r['local']} | {_f(r['fwd_local_ms'])} / "
            f"{_f(r.get('fb_local_ms'))} | {_f(r['fwd_math_ms'])} / {_f(r['fb_math_ms'])} | "
            f"{_f(r['transfer_ms_modelled'])} | {_f(r['planner_allgather_ms'])} / "
            f"{_f(r['planner_ring_ms'])} | {_f(r['fwd_share'])} | {_f(r.get('fb_share'))} |"
        )
    lines += ["", "## Checks", ""]
    for c in res["checks"]:
        errs = ", ".join(f"{n} {e:.1e}" for n, e in c["errors"].items())
        extra = f"; gradients {c['gradients']}" if "gradients" in c else ""
        lines.append(f"- {c['check']}: {'ok' if c['ok'] else 'FAIL'} ({errs}){extra}")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    if not quiet:
        print("\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no case after this")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file stem (default linear_GPU_date)")
    ap.add_argument("--no-check", action="store_true", help="timings only")
    ap.add_argument(
        "--impls", nargs="+", default=None, help="time only implementations naming one of these"
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    fla = fla_info()
    now = datetime.datetime.now(datetime.timezone.utc)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    name = (
        args.name or f"linear_{gpu.split()[-1] if device.type == 'cuda' else 'cpu'}_{now:%Y-%m-%d}"
    )
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    env = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "fla": fla["version"] or f"missing ({fla['problem']})",
        "python": platform.python_version(),
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/linear_attention.py " + " ".join(argv),
        "name": name,
    }
    print(json.dumps(env, indent=1), flush=True)
    res = {"environment": env, "checks": [], "kernels": [], "exchange": [], "errors": []}
    res["exchange_tokens_per_rank"] = None
    res["checks"] = [] if args.no_check else run_checks(device, args.smoke)
    save = lambda: write(res, args.out_dir, name, quiet=True)  # noqa: E731
    save()
    if args.smoke:
        seqlens, heads, dk, dtype, reps = [256], [2], 16, torch.float32, 2
    else:
        seqlens, heads, dk, dtype, reps = args.seqlens, args.heads, 128, torch.bfloat16, 10
    s_x = max(seqlens)  # the exchange's tokens per rank (32K by default)
    res["exchange_tokens_per_rank"] = s_x
    for h in heads:
        # the exchange's length first, its share measured right after it: a run cut short
        # by its budget still has the exchange (fla autotunes each shape for minutes)
        for s in sorted(seqlens, key=lambda n: n != s_x):
            for label, gate, call in _impls(fla, device):
                if args.impls and not any(x in label for x in args.impls):
                    continue
                if time.monotonic() - t0 > args.budget_s:
                    res["errors"].append(f"budget spent: {label} S={s} H={h} not run")
                    continue
                try:
                    res["kernels"].append(time_case(label, gate, call, s, h, dk, dk, dtype,
                                                    device, reps))  # fmt: skip
                except Exception:  # one failing case must not lose the others
                    res["errors"].append(f"{label} S={s} H={h}: {traceback.format_exc(limit=3)}")
                    print(res["errors"][-1], flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
            if s != s_x:
                continue
            if time.monotonic() - t0 > args.budget_s:
                res["errors"].append(f"budget spent: exchange H={h} not run")
                continue
            try:
                res["exchange"] += exchange_rows(res["kernels"], h, dk, dk, dtype, device, s_x,
                                                 reps)  # fmt: skip
            except Exception:
                res["errors"].append(f"exchange H={h}: {traceback.format_exc(limit=3)}")
                print(res["errors"][-1], flush=True)
            save()
    write(res, args.out_dir, name)
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
