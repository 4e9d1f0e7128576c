#!/usr/bin/env bash
# Everything the GPU machine must confirm, in one device call (nvidia-h200-x2):
#   kernel correctness + rates (issue "Core"), `demo --device cuda` on 2 NCCL ranks
#   (issue "Context-parallel engine"), and the side-by-side bench with a profiler trace.
# Usage on the device: bash benchmarks/gpu_session.sh   (results land in $OUT, or ./gpu_out)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device returns at most 8 files from $OUT: work in a folder, tar it at the end.
FINAL="${OUT:-$PWD/gpu_out}"; OUT=/tmp/gpu_out; rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
STAGES="${STAGES:-verify kernels demo bench trace}"
nvidia-smi -L | tee "$OUT/hardware.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/hardware.txt"
run() { local name=$1; shift; echo "=== $name: $*"; timeout "${STAGE_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "=== $name exit ${PIPESTATUS[0]}"; }
for stage in $STAGES; do
  case $stage in
    verify)  run verify python -m hamilton_attn verify --device cuda ;;
    kernels) run gpu_kernels python benchmarks/gpu_kernels.py --out-dir "$OUT" ;;
    demo)    run demo_cuda python -m hamilton_attn demo --device cuda --seqlen 4096 ;;
    bench)   run bench python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules ring bidi_ring allgather \
               --dispatches zigzag contiguous --out "$OUT" --name bench_H200_W2 \
               --plot "$OUT/bench_H200_W2.png" ;;
    trace)   run trace python benchmarks/trace_run.py --out "$OUT" ;;
  esac
done
ls -la "$OUT"
tar czf "$FINAL/gpu_results.tar.gz" -C /tmp gpu_out
