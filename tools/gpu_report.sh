#!/usr/bin/env bash
# The GPU figures of the closing notes, reproducible in one or two calls on a CUDA machine:
#   bash tools/gpu_report.sh bench OUT    # Table 1 memory + training-step benchmark
#   bash tools/gpu_report.sh sweeps OUT   # quick Fig 3 and Fig 4 sweeps on the bundled photos
# Run folders are packed into OUT/runs.tgz (checkpoints left out) for analysis/ to render.
set -euo pipefail
what=$1 out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
case "$what" in
  bench)
    python3 -m wetok.memory hydra.run.dir=/tmp/memory 2>&1 | tee "$out/memory.log"
    cp /tmp/memory/memory.csv /tmp/memory/memory.md "$out/"
    python3 -m wetok.bench.train_step --csv "$out/train_step.csv" 2>&1 | tee "$out/train_step.log"
    ;;
  sweeps)
    for sweep in fig3_quantizer fig4_groups; do
      python3 -m wetok.train -m +sweep=$sweep "hydra.sweep.dir=/tmp/runs/$sweep" 2>&1 \
        | tee "$out/$sweep.log"
    done
    tar czf "$out/runs.tgz" --exclude=checkpoints -C /tmp runs
    ;;
esac
