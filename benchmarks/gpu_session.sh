#!/usr/bin/env bash
# Everything the GPU machine must confirm, in one device call (nvidia-h200-x2):
#   kernel correctness + rates (issue "Core"), `demo --device cuda` on 2 NCCL ranks
#   (issue "Context-parallel engine"), and the side-by-side bench with a profiler trace.
# Usage on the device: bash benchmarks/gpu_session.sh   (results land in $OUT, or ./gpu_out)
# Session 2 (groupcast, minheap, MagiAttention examples, one-merge forward):
#   STAGES="magi:120 demo_gc:120 bench_gc:330" bash benchmarks/gpu_session.sh
# Session 3 (one causal call per own block, exact bf16 gradient sums, NCCL beside compute):
#   STAGES="overlap:120 opprof:150" bash benchmarks/gpu_session.sh (probes), then
#   STAGES="bench3:300 bench3gc:200 trace:60" bash benchmarks/gpu_session.sh
# Session 4 (CUDA-graph forward replay, transfer head start):
#   STAGES="graphs:150 bench4docs:150 overlap4:90 bench4hs:200" bash benchmarks/gpu_session.sh, then
#   STAGES="headstart:150 opprof4:120 bench4docs:200" HEAD_STARTS="0 20" DISPATCHES="balanced_zigzag minheap" \
#     bash benchmarks/gpu_session.sh, then (default 5 us head start, call-cost balance, one receive
#   buffer per step): STAGES="graphs:150 bench4:330 trace:90" bash benchmarks/gpu_session.sh, then
#   (sdpa joins tiled outputs in one cat; graph bar = faster one-device run):
#   STAGES="graphs:100 verify:100 final4:300" bash benchmarks/gpu_session.sh, then (own pieces to one
#   peer as one message): STAGES="final4b:150" bash benchmarks/gpu_session.sh
# Session 5 (copy-engine transfers, lead-in call, rounds): STAGES="ceprobe:150 timeline:150" (probes),
#   then STAGES="cecheck:150 timeline:100 dense5:330" (copy engine against NCCL; the GPU rendezvous
#   that starts each timed sample), then STAGES="final5:330 docs5:200" (NCCL default)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device returns at most 8 files from $OUT: work in a folder, tar it at the end.
FINAL="${OUT:-$PWD/gpu_out}"; OUT=/tmp/gpu_out; rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
STAGES="${STAGES:-demo:150 bench:200 trace:60 kernels:120 verify:100}"
nvidia-smi -L | tee "$OUT/hardware.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/hardware.txt"
# Each stage has its own time limit ("name:seconds" in STAGES); results are re-packed
# after every stage so a later stage running out of time loses nothing.
run() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "=== $name exit ${PIPESTATUS[0]}"; tar czf "$FINAL/gpu_results.tar.gz" -C /tmp gpu_out; }
for item in $STAGES; do
  stage=${item%%:*}; limit=${item#*:}; [ "$limit" = "$item" ] && limit=300
  case $stage in
    verify)  run verify "$limit" python -m hamilton_attn verify --device cuda ;;
    kernels) run gpu_kernels "$limit" python benchmarks/gpu_kernels.py --out-dir "$OUT" ;;
    demo)    run demo_cuda "$limit" python -m hamilton_attn demo --device cuda --seqlen 4096 ;;
    bench)   run bench "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules ring bidi_ring allgather \
               --dispatches zigzag contiguous --backward replay reverse --out "$OUT" --name bench_H200_W2 \
               --plot "$OUT/bench_H200_W2.png" ;;
    trace)   run trace "$limit" python benchmarks/trace_run.py --out "$OUT" ;;
    magi)    run magi "$limit" bash -c 'for ex in varlen flex; do echo "--- examples/magi_$ex.py"; \
               torchrun --nproc_per_node 2 examples/magi_$ex.py || echo "FAILED magi_$ex"; done' ;;
    demo_gc) run demo_groupcast "$limit" python -m hamilton_attn demo --device cuda --seqlen 8192 \
               --schedules groupcast ring ;;
    bench_gc) run bench_gc "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules ring groupcast --dispatches zigzag minheap \
               --backward replay reverse --repeats 10 --out "$OUT" --name bench_H200_W2_groupcast \
               --plot "$OUT/bench_H200_W2_groupcast.png" ;;
    overlap) run overlap "$limit" python benchmarks/gpu_overlap.py --out "$OUT" ;;
    bench3)  run bench3 "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules ring --dispatches zigzag minheap balanced_zigzag \
               --backward replay reverse --repeats 10 --inner 3 --out "$OUT" --name bench_H200_W2_session3 \
               --plot "$OUT/bench_H200_W2_session3.png" ;;
    bench3gc) run bench3gc "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules groupcast --dispatches zigzag minheap \
               --backward replay --repeats 10 --inner 3 --out "$OUT" --name bench_H200_W2_session3_groupcast ;;
    graphs)  run graphs_check "$limit" python benchmarks/gpu_graphs_check.py --out "$OUT" ;;
    overlap4) run overlap_head_start "$limit" python benchmarks/gpu_overlap.py --out "$OUT" --ctas \
               --head-start-us 0 5 20 50 ;;
    bench4hs) for hs in ${HEAD_STARTS:-0 20}; do
               run "bench4_hs$hs" "$((limit / 2))" env HAMILTON_ATTN_TRANSFER_HEAD_START_US=$hs python -m hamilton_attn bench \
               --device cuda --tokens-per-device 16384 --masks causal full --schedules ring \
               --dispatches zigzag --backward reverse --repeats 10 --inner 3 --out "$OUT" \
               --name "bench_H200_W2_session4_head_start_$hs"; done ;;
    bench4docs) for hs in ${HEAD_STARTS:-0}; do
               run "bench4docs_hs$hs" "$limit" env HAMILTON_ATTN_TRANSFER_HEAD_START_US=$hs python -m hamilton_attn bench \
               --device cuda --tokens-per-device 16384 --masks docs --schedules ring groupcast \
               --dispatches ${DISPATCHES:-zigzag balanced_zigzag minheap} --fwd-only --graphs --repeats 10 --inner 3 \
               --out "$OUT" --name "bench_H200_W2_session4_docs_graphs_hs$hs"; done ;;
    bench4)  run bench4 "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full docs --schedules ring groupcast --dispatches zigzag balanced_zigzag \
               --backward reverse --graphs --repeats 10 --inner 3 --out "$OUT" --name bench_H200_W2_session4 \
               --plot "$OUT/bench_H200_W2_session4.png" ;;
    final4)  for i in 1 2; do run "final4_docs_$i" "$((limit / 3))" python -m hamilton_attn bench --device cuda \
               --tokens-per-device 16384 --masks docs --schedules ring groupcast --dispatches zigzag balanced_zigzag \
               --fwd-only --graphs --repeats 10 --inner 3 --out "$OUT" --name "bench_H200_W2_session4_final_docs_$i"; done
             run final4_dense "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full --schedules ring groupcast --dispatches zigzag --backward reverse replay --graphs \
               --repeats 10 --inner 3 --out "$OUT" --name bench_H200_W2_session4_final_dense ;;
    final4b) run demo_groupcast4 "$limit" python -m hamilton_attn demo --device cuda --seqlen 8192 \
               --schedules groupcast ring
             run final4b_docs "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks docs causal --schedules ring groupcast --dispatches zigzag balanced_zigzag --fwd-only --graphs \
               --repeats 10 --inner 3 --out "$OUT" --name bench_H200_W2_session4_final_grouped ;;
    headstart) run head_start "$limit" python benchmarks/gpu_head_start.py --out "$OUT" --us 0 5 10 20 40 --rounds 4 ;;
    opprof4) run op_profile4 "$limit" bash -c "for sc in groupcast ring; do python benchmarks/gpu_op_profile.py \
               --out $OUT --mask docs --schedule \$sc --dispatch balanced_zigzag --fwd-only --backward replay; done" ;;
    cecheck) run ce_check "$limit" python benchmarks/gpu_ce_check.py --out "$OUT" ;;
    dense5)  run dense5 "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full --schedules ring groupcast --dispatches zigzag --backward reverse \
               --transports nccl ce --graphs --rounds ${ROUNDS:-3} --repeats 10 --inner 3 --out "$OUT" \
               --name bench_H200_W2_session5_dense --plot "$OUT/bench_H200_W2_session5_dense.png" ;;
    docs5)   run docs5 "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks docs --schedules ring groupcast --dispatches balanced_zigzag --fwd-only --graphs \
               --transports nccl ce --rounds ${ROUNDS:-3} --repeats 10 --inner 3 --out "$OUT" \
               --name bench_H200_W2_session5_docs ;;
    final5)  run final5_dense "$limit" python -m hamilton_attn bench --device cuda --tokens-per-device 16384 \
               --masks causal full --schedules ring groupcast --dispatches zigzag --backward reverse replay \
               --graphs --rounds ${ROUNDS:-3} --repeats 10 --inner 3 --out "$OUT" \
               --name bench_H200_W2_session5_final_dense --plot "$OUT/bench_H200_W2_session5_final_dense.png" ;;
    timeline) run timeline "$limit" python benchmarks/gpu_timeline.py --out "$OUT" ;;
    ceprobe) run ce_probe "$limit" python benchmarks/gpu_ce_probe.py --out "$OUT" ;;
    opprof)  run op_profile "$limit" bash -c "python benchmarks/gpu_op_profile.py --out $OUT --mask causal; \
               python benchmarks/gpu_op_profile.py --out $OUT --mask docs --schedule ring --dispatch balanced_zigzag" ;;
  esac
done
ls -la "$OUT"
tar czf "$FINAL/gpu_results.tar.gz" -C /tmp gpu_out
