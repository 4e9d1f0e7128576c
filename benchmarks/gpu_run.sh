#!/usr/bin/env bash
# The GPU measurements behind benchmarks/results/, one stage per measurement:
#
#   bash benchmarks/gpu_run.sh STAGE[:SECONDS] ...     (no argument: list the stages)
#   e.g. bash benchmarks/gpu_run.sh kernels:120 cp_efficiency_dense:330 cp_efficiency_docs:200
#
# Run from the repository root on the GPU machine (nvidia-h200-x2 for the two-GPU stages).
# Each stage writes the result named after it: STAGE_<GPU>x<count>_<date> for two-GPU
# stages (cp_efficiency_dense_H200x2_2026-11-30.md / .json / .png), STAGE_<GPU>_<date>
# for one-GPU stages (kernels_H200_2026-12-02.md / .json), the date in UTC; its log goes
# to log/. Everything lands in /tmp/gpu_out and is packed into $OUT/gpu_results.tar.gz
# (or ./gpu_out/) after every stage, so a later stage running out of time loses nothing.
# A stage's time limit is SECONDS (default 300). TAG (environment) is appended to every
# name, for a second run of a stage on one day (TAG=_b). benchmarks/README.md says which stage
# made which file in benchmarks/results/. LINEAR_ARGS (environment) is passed on to
# benchmarks/linear_attention.py (e.g. "--seqlens 32768 --heads 32"), VERIFY_ARGS to
# hamilton-attn verify (e.g. "--seed 1").
set -uo pipefail

STAGES_HELP="
one GPU:
  kernels                   gpu_kernels.py: sdpa/flex/auto against float64, and TF/s
  verify_cuda               hamilton-attn verify --device cuda (.txt)
  verify_variants_cuda      the same, only the attention variants' cases (.txt)
  verify_seeds_cuda         the variants' cases on the draws of seeds 1, 2, 3 (.txt each)
  block_choice              gpu_block_choice.py: each fused block through sdpa and flex
  edge_check                gpu_edge_check.py: non-finite K/V at unseen keys, per backend
  triton                    gpu_triton.py: the triton kernel against float64, and its TF/s
                            beside cuDNN, compiled flex and auto in the same run
  triton_variants           the same, only the variant checks and the first six cases
                            (short / long-tailed documents, dense causal, sigmoid, softcap,
                            ALiBi)
  triton_fused              gpu_triton.py --fused: the sdpa checks, then only the fused steps
                            (and long-tailed documents), sdpa+triton beside cuDNN per piece
  triton_ab                 gpu_triton.py --ab: the kernel's switches (counted RANGE loops
                            against the entry and run loops) and tile configurations side
                            by side
  kernels_perf              gpu_kernels.py's timings only (auto beside cuDNN and flex)
  triton_profile            gpu_triton_profile.py: registers, spills, SASS mix and TMA
                            loads' timing per case, then the same launches under ncu
  ae_quickstart             examples/attention_engine_quickstart.py on the GPU (.txt)
  linear, linear_timing     linear_attention.py: fla's chunk_simple_gla beside our linear
                            attention (checks, TF/s), the state exchange's share of a step
                            (installs fla-core from benchmarks/wheels if missing)
two GPUs, efficiency (hamilton-attn bench at 16K tokens per GPU):
  cp_efficiency_dense       causal and full, ring and groupcast, replay and reverse, graphs
  cp_efficiency_docs        packed documents forward, eager and graph, NCCL and copy engine
  cp_transports_dense       causal and full, copy engine against NCCL
  cp_dispatches_fwd         docs and causal forward, zigzag against balanced_zigzag
  cp_dispatches_ring        ring, zigzag / minheap / balanced_zigzag, causal / full / docs
  cp_efficiency_lengths     ring/zigzag at 16K and 32K tokens per GPU
  cp_schedules              ring / bidi_ring / allgather x zigzag / contiguous (simulate.py's
                            calibration)
  cp_spread_causal          the same causal ring/zigzag run four times: run-to-run spread
two GPUs, checks and probes:
  demo_cuda                 hamilton-attn demo --device cuda --seqlen 4096 (.txt)
  demo_groupcast            demo --seqlen 8192 --schedules groupcast ring (.txt)
  magi_examples             examples/magi_*.py under torchrun (.txt)
  copy_engine_probe         gpu_ce_probe.py: symmetric memory, copy-engine push against NCCL
  copy_engine_check         gpu_ce_check.py: copy-engine transport against NCCL and the oracle
  graphs_check              gpu_graphs_check.py: CUDA-graph replay against eager (NCCL)
  graphs_check_copy_engine  the same with HAMILTON_ATTN_TRANSPORT=ce
  transfer_overlap          gpu_overlap.py: a KV transfer beside the attention kernel
  head_start                gpu_head_start.py: ring efficiency per transfer head start
  timeline_ring             gpu_timeline.py: kernel timeline of the bench's timed loop
  trace_ring                trace_run.py: per-step profile of ring/zigzag causal (.json, .txt)
  op_profile_fb_causal_docs gpu_op_profile.py: kernel tables, causal and docs f+b (.txt)
  op_profile_docs_fwd       gpu_op_profile.py: docs forward, ring and groupcast (.txt)
issue #20's two-GPU round (benchmarks/README.md, \"The issue-20 round\"):
  x2_demo                   hamilton-attn demo --device cuda: schedules, Ulysses, hybrids,
                            variants, forward and backward against one GPU (.txt)
  x2_bench_16k              bench 16K/GPU: causal/full/docs/docs_short x ring/groupcast/
                            ulysses x zigzag/minheap x triton/auto, torch context_parallel
  x2_bench_64k              the same at 64K/GPU (fewer repeats)
  x2_variants               bench 16K/GPU ring/zigzag: softmax/softcap/sigmoid x auto/triton
  x2_hf                     hf_train_step.py: Llama ~0.5B training step at 32K/128K/256K,
                            one GPU (sdpa/flex/hamilton, +-checkpointing) vs CP over all GPUs
                            (installs transformers from benchmarks/wheels if missing)
  (the session-5 dense table again: stage cp_efficiency_dense)
"
if [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/gpu_run.sh STAGE[:SECONDS] ...$STAGES_HELP"
  exit 0
fi

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device returns at most 8 files from $OUT: work in a folder, tar it after each stage.
FINAL="${OUT:-$PWD/gpu_out}"
OUT=/tmp/gpu_out
rm -rf "$OUT"
mkdir -p "$OUT/log" "$FINAL"
nvidia-smi -L | tee "$OUT/log/hardware.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/log/hardware.txt"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
case $GPU_NAME in
  *H200*) GPU=H200 ;;
  *H100*) GPU=H100 ;;
  *) GPU=$(echo "$GPU_NAME" | awk '{print $NF}') ;;
esac
NGPU=$(nvidia-smi -L | wc -l)
DATE=$(date -u +%F)
HW1=$GPU          # one-GPU stages
HW=${GPU}x$NGPU   # stages on every GPU of the machine (two for the probes)
BENCH=(python -m hamilton_attn bench --device cuda --tokens-per-device 16384)

# transformers for x2_hf: installed from the wheels carried in benchmarks/wheels
# (benchmarks/fetch_wheels.sh) when the image lacks it; into the environment if pip may,
# else into /tmp/hf_site (no dependencies resolved there: every carried wheel by name).
ensure_transformers() {
  python -c "import transformers" 2>/dev/null && return 0
  [ -d benchmarks/wheels ] || { echo "no transformers and no benchmarks/wheels"; return 1; }
  pip install --no-index --find-links benchmarks/wheels transformers \
    && python -c "import transformers" && return 0
  local names
  names=$(ls benchmarks/wheels | sed 's/-.*//' | sort -u)
  # shellcheck disable=SC2086  # one package name per word
  pip install --no-index --no-deps --find-links benchmarks/wheels --target /tmp/hf_site \
    $names || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/hf_site"
  python -c "import transformers; print('transformers', transformers.__version__)"
}

# fla-core (flash-linear-attention) for the linear stage, likewise: pure-Python wheels
# (fla-core, einops, packaging, which fla imports without declaring it) from
# benchmarks/wheels; into /tmp/fla_site (only what is missing) where pip may not write.
ensure_fla() {
  python -c "import fla.ops.simple_gla" 2>/dev/null && return 0
  [ -d benchmarks/wheels ] || { echo "no fla-core and no benchmarks/wheels"; return 1; }
  pip install --no-index --find-links benchmarks/wheels fla-core==0.6.0 einops packaging \
    && python -c "import fla.ops.simple_gla" && return 0
  local names=fla-core
  python -c "import einops" 2>/dev/null || names="$names einops"
  python -c "import packaging" 2>/dev/null || names="$names packaging"
  # shellcheck disable=SC2086  # one package name per word
  pip install --no-index --no-deps --find-links benchmarks/wheels --target /tmp/fla_site \
    $names || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/fla_site"
  python -c "import fla; print('fla-core', fla.__version__)"
}

pack() { tar czf "$FINAL/gpu_results.tar.gz" -C /tmp gpu_out; }
# run LOG LIMIT CMD...: the command's output goes to the screen and to LOG.
run() {
  local log=$1 limit=$2
  shift 2
  echo "=== ${log#"$OUT"/}: $*"
  timeout "$limit" "$@" 2>&1 | tee "$log"
  echo "=== exit ${PIPESTATUS[0]}"
  pack
}

for item in "$@"; do
  stage=${item%%:*}
  limit=${item#*:}
  [ "$limit" = "$item" ] && limit=300
  name=${stage}_${HW}_${DATE}${TAG:-}
  name1=${stage}_${HW1}_${DATE}${TAG:-}
  log="$OUT/log/$stage.txt"
  case $stage in
    kernels)
      run "$log" "$limit" python benchmarks/gpu_kernels.py --out-dir "$OUT" --name "$name1" ;;
    verify_cuda)
      run "$OUT/$name1.txt" "$limit" python -m hamilton_attn verify --device cuda \
        ${VERIFY_ARGS:-} ;;
    triton)
      # start no timed case in the last 40 s of the stage (the file is saved after each)
      run "$log" "$limit" python benchmarks/gpu_triton.py --budget-s "$((limit - 40))" \
        --out-dir "$OUT" --name "$name1" ;;
    triton_fused)
      run "$log" "$limit" python benchmarks/gpu_triton.py --checks sdpa --fused \
        --budget-s "$((limit - 40))" --out-dir "$OUT" --name "$name1" ;;
    triton_variants)
      run "$log" "$limit" python benchmarks/gpu_triton.py --checks softcap,alibi,sigmoid \
        --first 6 --budget-s "$((limit - 40))" --out-dir "$OUT" --name "$name1" ;;
    triton_ab)
      run "$log" "$limit" python benchmarks/gpu_triton.py --ab --budget-s "$((limit - 60))" \
        --out-dir "$OUT" --name "$name1" ;;
    kernels_perf)
      run "$log" "$limit" python benchmarks/gpu_kernels.py --no-check --out-dir "$OUT" \
        --name "$name1" ;;
    triton_profile)
      # registers / spills / SASS mix and the switches' timing, then the same launches
      # under Nsight Compute (pipe use, warp stalls) where ncu reads counters.
      run "$log" "$limit" python benchmarks/gpu_triton_profile.py --out-dir "$OUT" \
        --name "$name1"
      if command -v ncu >/dev/null; then
        ncu --query-metrics > "$OUT/log/ncu_metrics.txt" 2>&1
        metrics=""
        for m in sm__inst_executed_pipe_xu sm__pipe_tensor_op_gmma_cycles_active \
          sm__pipe_fma_cycles_active sm__pipe_alu_cycles_active \
          sm__pipe_fmaheavy_cycles_active sm__inst_executed_pipe_fma \
          sm__inst_executed_pipe_alu sm__pipe_shared_cycles_active; do
          grep -q "^$m " "$OUT/log/ncu_metrics.txt" \
            && metrics="$metrics${metrics:+,}$m.avg.pct_of_peak_sustained_active"
        done
        run "$OUT/log/ncu_run.txt" "$limit" ncu --clock-control none \
          --profile-from-start off -k "regex:fwd_kernel|dq_kernel|dkdv_kernel" \
          --section SpeedOfLight --section ComputeWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section Occupancy \
          --section LaunchStats --section InstructionStats \
          ${metrics:+--metrics "$metrics"} -f -o /tmp/triton_ncu \
          python benchmarks/gpu_triton_profile.py --ncu
        ncu --import /tmp/triton_ncu.ncu-rep --csv --page details > "$OUT/${name1}_ncu.csv" 2>&1
        ncu --import /tmp/triton_ncu.ncu-rep --page details --print-details all \
          > "$OUT/${name1}_ncu.txt" 2>&1
        pack
      fi ;;
    ae_quickstart)
      run "$OUT/$name1.txt" "$limit" python examples/attention_engine_quickstart.py ;;
    linear | linear_timing)
      # linear_timing: without the float64 checks (their recurrence oracle takes minutes)
      lin=(); [ "$stage" = linear_timing ] && lin=(--no-check)
      # without fla the script still runs ours and records fla as missing; no timed case
      # starts in the stage's last 60 s (the files are rewritten after each case)
      ensure_fla || echo "linear: fla-core missing and not installable"
      run "$log" "$limit" python benchmarks/linear_attention.py --budget-s "$((limit - 60))" \
        "${lin[@]}" ${LINEAR_ARGS:-} --out-dir "$OUT" --name "$name1" ;;
    verify_variants_cuda)
      run "$OUT/$name1.txt" "$limit" python -m hamilton_attn verify --device cuda \
        --variants-only ${VERIFY_ARGS:-} ;;
    verify_seeds_cuda)
      for sd in 1 2 3; do
        run "$OUT/${name1}_seed$sd.txt" "$((limit / 3))" python -m hamilton_attn verify \
          --device cuda --variants-only --seed "$sd"
      done ;;
    block_choice)
      run "$log" "$limit" python benchmarks/gpu_block_choice.py --tokens 16384 --out "$OUT" \
        --name "$name1" ;;
    edge_check)
      run "$log" "$limit" python benchmarks/gpu_edge_check.py --out "$OUT" --name "$name1" ;;
    cp_efficiency_dense)
      run "$log" "$limit" "${BENCH[@]}" --masks causal full --schedules ring groupcast \
        --dispatches zigzag --backward reverse replay --graphs --rounds 3 --repeats 10 --inner 3 \
        --out "$OUT" --name "$name" --plot "$OUT/$name.png" ;;
    cp_efficiency_docs)
      run "$log" "$limit" "${BENCH[@]}" --masks docs --schedules ring groupcast \
        --dispatches balanced_zigzag --fwd-only --graphs --transports nccl ce --rounds 3 \
        --repeats 10 --inner 3 --out "$OUT" --name "$name" ;;
    cp_transports_dense)
      run "$log" "$limit" "${BENCH[@]}" --masks causal full --schedules ring groupcast \
        --dispatches zigzag --backward reverse --transports nccl ce --graphs --rounds 3 \
        --repeats 10 --inner 3 --out "$OUT" --name "$name" --plot "$OUT/$name.png" ;;
    cp_dispatches_fwd)
      run "$log" "$limit" "${BENCH[@]}" --masks docs causal --schedules ring groupcast \
        --dispatches zigzag balanced_zigzag --fwd-only --graphs --repeats 10 --inner 3 \
        --out "$OUT" --name "$name" ;;
    cp_dispatches_ring)
      run "$log" "$limit" "${BENCH[@]}" --masks causal full docs --schedules ring \
        --dispatches zigzag minheap balanced_zigzag --backward replay reverse --repeats 10 \
        --inner 3 --out "$OUT" --name "$name" --plot "$OUT/$name.png" ;;
    cp_efficiency_lengths)
      run "$log" "$limit" python -m hamilton_attn bench --device cuda \
        --tokens-per-device 16384 32768 --masks causal full --schedules ring --dispatches zigzag \
        --backward replay reverse --repeats 10 --out "$OUT" --name "$name" ;;
    cp_schedules)
      run "$log" "$limit" "${BENCH[@]}" --masks causal full docs \
        --schedules ring bidi_ring allgather --dispatches zigzag contiguous --out "$OUT" \
        --name "$name" --plot "$OUT/$name.png" ;;
    cp_spread_causal)
      # Four runs of one configuration (--inner 1 and 3, then twice the bench default of
      # 10 repeats), gathered into one file; the spread is the point, not any one run.
      runs=("inner1 --repeats 20 --inner 1" "inner3 --repeats 20 --inner 3"
            "repeat1 --repeats 10 --inner 3" "repeat2 --repeats 10 --inner 3")
      for r in "${runs[@]}"; do
        read -r tag opts <<<"$r"
        # shellcheck disable=SC2086  # $opts: the run's options, split on purpose
        run "$OUT/log/${stage}_$tag.txt" "$((limit / 4))" "${BENCH[@]}" --masks causal \
          --schedules ring --dispatches zigzag --backward replay reverse $opts \
          --out "$OUT/log" --name "causal_$tag"
      done
      {
        echo "# Causal 16K/GPU, ring/zigzag: the same configuration measured in four runs"
        for r in "${runs[@]}"; do
          tag=${r%% *}
          printf '\n## causal_%s\n\n' "$tag"
          tail -n +3 "$OUT/log/causal_$tag.md"
        done
      } > "$OUT/$name.md"
      pack ;;
    demo_cuda)
      run "$OUT/$name.txt" "$limit" python -m hamilton_attn demo --device cuda --seqlen 4096 ;;
    demo_groupcast)
      run "$OUT/$name.txt" "$limit" python -m hamilton_attn demo --device cuda --seqlen 8192 \
        --schedules groupcast ring ;;
    magi_examples)
      run "$OUT/$name.txt" "$limit" bash -c 'for ex in varlen flex; do
        echo "--- examples/magi_$ex.py"
        torchrun --nproc_per_node 2 "examples/magi_$ex.py" || echo "FAILED magi_$ex"
      done' ;;
    copy_engine_probe)
      run "$log" "$limit" python benchmarks/gpu_ce_probe.py --out "$OUT" --name "$name" ;;
    copy_engine_check)
      run "$log" "$limit" python benchmarks/gpu_ce_check.py --out "$OUT" --name "$name" ;;
    graphs_check)
      run "$log" "$limit" python benchmarks/gpu_graphs_check.py --out "$OUT" --name "$name" ;;
    graphs_check_copy_engine)
      run "$log" "$limit" env HAMILTON_ATTN_TRANSPORT=ce python benchmarks/gpu_graphs_check.py \
        --out "$OUT" --name "$name" ;;
    transfer_overlap)
      run "$log" "$limit" python benchmarks/gpu_overlap.py --out "$OUT" --name "$name" ;;
    head_start)
      run "$log" "$limit" python benchmarks/gpu_head_start.py --out "$OUT" --us 0 5 10 20 40 \
        --rounds 4 --name "$name" ;;
    timeline_ring)
      run "$log" "$limit" python benchmarks/gpu_timeline.py --out "$OUT" --name "$name" ;;
    trace_ring)
      # rank traces as NAME_rank<r>.json; the per-step summary it prints is NAME_summary.txt
      run "$OUT/${name}_summary.txt" "$limit" python benchmarks/trace_run.py --out "$OUT" \
        --name "$name" ;;
    op_profile_fb_causal_docs)
      run "$OUT/$name.txt" "$limit" bash -c "
        python benchmarks/gpu_op_profile.py --out '$OUT/log' --mask causal
        python benchmarks/gpu_op_profile.py --out '$OUT/log' --mask docs --schedule ring \
          --dispatch balanced_zigzag" ;;
    op_profile_docs_fwd)
      for sc in ring groupcast; do
        run "$OUT/log/${stage}_$sc.txt" "$((limit / 2))" python benchmarks/gpu_op_profile.py \
          --out "$OUT" --name "${stage}_${sc}_${HW}_${DATE}" --mask docs --schedule "$sc" \
          --dispatch balanced_zigzag --fwd-only --backward replay
      done ;;
    x2_demo)
      run "$OUT/$name.txt" "$limit" python -m hamilton_attn demo --device cuda --seqlen 4096 ;;
    x2_bench_16k | x2_bench_64k)
      # 2 backends x 3 schedules x 2 dispatches on 4 masks, one device per backend and
      # torch's context_parallel (causal, full) in the same run.
      if [ "$stage" = x2_bench_16k ]; then
        tok=(--tokens-per-device 16384 --repeats 5 --inner 3)
      else
        tok=(--tokens-per-device 65536 --warmup 1 --repeats 3 --inner 1)
      fi
      run "$log" "$limit" python -m hamilton_attn bench --device cuda "${tok[@]}" \
        --masks causal full docs docs_short --schedules ring groupcast ulysses \
        --dispatches zigzag minheap --backends triton auto --out "$OUT" --name "$name" ;;
    x2_variants)
      run "$log" "$limit" "${BENCH[@]}" --masks causal docs --schedules ring \
        --dispatches zigzag --variants softmax softcap sigmoid --backends auto triton \
        --repeats 5 --inner 3 --no-torch-cp --out "$OUT" --name "$name" ;;
    x2_hf)
      if ensure_transformers; then
        # checkpointing on first: an OOM inside a collective on one rank can hang the
        # other; the file is rewritten after every configuration, so what ran is kept.
        run "$log" "$limit" python -m torch.distributed.run --standalone \
          --nproc_per_node "$NGPU" benchmarks/hf_train_step.py --seqlens 32768 131072 262144 \
          --ckpt on off --steps 3 --warmup 1 --timeout-min 8 --out "$OUT" \
          --name "hf_train_${HW}_${DATE}"
      else
        echo "x2_hf: transformers missing and not installable" | tee "$log"
      fi ;;
    *)
      echo "unknown stage: $stage (bash benchmarks/gpu_run.sh lists them)" ;;
  esac
done
ls -la "$OUT"
pack
