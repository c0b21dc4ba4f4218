#!/usr/bin/env bash
# The GPU figures of the closing notes, reproducible on a CUDA machine (one call each):
#   bash tools/gpu_report.sh memory OUT            # paper Table 1 (wetok.memory)
#   bash tools/gpu_report.sh bench OUT             # training-step benchmark
#   bash tools/gpu_report.sh eval OUT [OVERRIDES]  # evaluation benchmark (issue 10), compiled, 50k
#   bash tools/gpu_report.sh evalparts OUT "" "eval.batch_size=128 eval.num_workers=14" ...
#                                                  # parts only, one process per override set
#                                                  # ("" "": the 2nd finds compile_cache_dir filled)
#   bash tools/gpu_report.sh metricnets OUT        # LPIPS / Inception / PSNR + SSIM per option
#   bash tools/gpu_report.sh profile OUT           # is the evaluation GPU-bound? (torch.profiler)
#   bash tools/gpu_report.sh sweep OUT fig3_quantizer fig4_groups:table11_g1,table12_g2   # quick
#   bash tools/gpu_report.sh short OUT fig4_groups:table11_g1,table12_g2,table13_g4  # scale=short, +seeds=3
# Sweep run folders are packed into OUT/runs.tgz (no checkpoints) for analysis/. `short` runs
# every job of a sweep at once on the one GPU (hydra/launcher=local) under a CUDA MPS daemon,
# one sweep argument after the other; it needs data/wallpapers (python -m wetok.wallpapers).
set -euo pipefail
what=$1 out=$2
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
case "$what" in
  memory)
    python3 -m wetok.memory hydra.run.dir=/tmp/memory 2>&1 | tee "$out/memory.log"
    cp /tmp/memory/memory.csv /tmp/memory/memory.md "$out/"
    ;;
  bench)
    python3 -m wetok.bench.train_step --gn-silu recompute plain --overrides \
      train.compile_mode=reduce-overhead +train.compile_options.max_autotune_pointwise=true \
      --csv "$out/train_step.csv" 2>&1 | tee "$out/train_step.log"
    ;;
  eval)  # extra arguments: more config overrides (eval.batch_size=128 ...)
    python3 -m wetok.bench.evaluate --images 1024 50000 --steps 4 --warmup 2 \
      --json "$out/evaluate.json" \
      --overrides experiment=table06_gfq eval.batch_size=64 eval.num_workers=12 eval.compile=true \
      "$@" 2>&1 | tee "$out/evaluate.log"
    ;;
  evalparts)  # each argument: a set of overrides (quoted; "" = the defaults)
    i=0
    for set in "$@"; do
      i=$((i + 1))
      # shellcheck disable=SC2086  # the set splits into its overrides
      python3 -m wetok.bench.evaluate --parts-only --images 1024 2048 --steps 6 --warmup 2 \
        --json "$out/parts-$i.json" --overrides experiment=table06_gfq eval.batch_size=64 \
        eval.num_workers=12 eval.compile=true $set 2>&1 | tee "$out/parts-$i.log"
    done
    ;;
  profile)
    python3 tools/eval_gpu_profile.py --batches 130 2>&1 | tee "$out/eval_gpu_profile.log"
    ;;
  metricnets)
    python3 tools/metric_network_options.py --batch 64 2>&1 | tee "$out/metric_networks.md"
    ;;
  sweep)  # SWEEP[:job1,job2] ...: each argument runs as its own process, all in parallel
    for arg in "$@"; do
      sweep=${arg%%:*} jobs=${arg#*:} params=()
      [ "$jobs" != "$arg" ] && params=("experiment=$jobs")
      python3 -m wetok.train -m +sweep=$sweep "hydra.sweep.dir=/tmp/runs/$sweep" "${params[@]}" \
        > "$out/$sweep-${jobs//,/_}.log" 2>&1 &
    done
    wait
    tar czf "$out/runs.tgz" --exclude=checkpoints -C /tmp runs
    ;;
  short)  # SWEEP[:job1,job2] ...
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d
    for arg in "$@"; do
      sweep=${arg%%:*} jobs=${arg#*:} params=()
      [ "$jobs" != "$arg" ] && params=("experiment=$jobs")
      python3 -m wetok.train -m +sweep="$sweep" scale=short +seeds="${SEEDS:-3}" \
        hydra/launcher=local "hydra.sweep.dir=/tmp/runs/$sweep" "${params[@]}" \
        > "$out/$sweep-${jobs//,/_}.log" 2>&1 || echo "sweep $arg failed: $out/$sweep-${jobs//,/_}.log"
    done
    echo quit | nvidia-cuda-mps-control
    tar czf "$out/runs.tgz" --exclude=checkpoints -C /tmp runs
    ;;
esac
