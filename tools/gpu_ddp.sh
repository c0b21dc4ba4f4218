#!/usr/bin/env bash
# Issue 12 on one machine with 2 GPUs (device kind nvidia-h200-x2): DDP over NCCL, one part per
# call (each well under 10 minutes), results and logs in OUT:
#   bash tools/gpu_ddp.sh bench OUT MODE [GB]   # MODE eager|compile|cudagraphs, GB null|128:
#                                               # 1 GPU then 2 GPUs (torchrun), sync_entropy on
#   bash tools/gpu_ddp.sh table OUT             # the scaling table from OUT/bench-*.json
#   bash tools/gpu_ddp.sh check OUT             # 2x8 vs 1x16 (fp32, eager, deterministic
#                                               # kernels, 20 steps), step-1 gradients
#   bash tools/gpu_ddp.sh resume OUT            # 2-rank resume (torchrun, then the variables
#                                               # submitit exports under Slurm) vs uninterrupted
#   bash tools/gpu_ddp.sh kill OUT              # a killed rank ends the job (torchrun; env-launched)
#   bash tools/gpu_ddp.sh eval OUT              # sharded evaluation (2 ranks) == one process
# Paper ablation model: C=128, B=4 (model=c128_b4), 256^2, GQ g=4 d'=8, batch 16 per GPU.
# Rehearsal on a CPU (gloo, tiny model, 32^2, few steps): WETOK_DDP_CPU=1 bash tools/gpu_ddp.sh ...
# Rehearsal on ONE GPU (the paper model; both ranks on GPU 0 over gloo: DDP's code paths with
# compile, CUDA graphs, accumulation and sync_entropy, not NCCL, not the scaling):
#   WETOK_DDP_SHARED_GPU=1 bash tools/gpu_ddp.sh ...
# On the device tool, after rsync to /work/main/.dev/i12 (see the common brief):
#   run(carry=[".whl", ".dev/i12"], kind="nvidia-h200-x2", command="python3 -m pip install -q
#   --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PYTHONPATH && cd .dev/i12 && export PYTHONPATH=$PWD:$PYTHONPATH
#   && bash tools/gpu_ddp.sh check $OUT")
set -euo pipefail
part=$1 out=$(realpath -m "$2")
shift 2
mkdir -p "$out"
runs=${WETOK_DDP_RUNS:-/tmp/wetok-ddp}
export PYTHONUNBUFFERED=1
TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc_per_node=2)
SYNC=(quantizer.sync_entropy=true loss.disc_sync_bn=true loss.lecam_sync=true)
PLAIN=(loss.disc_start=100000)  # the GAN off: see check
if [ "${WETOK_DDP_CPU:-0}" = 1 ]; then  # rehearsal: gloo on the CPU, tiny model
  export OMP_NUM_THREADS=1
  MODEL=(model=tiny data.image_size=32) DEVICE=(train.device=cpu)
  BENCH=(--device cpu --image-size 32 --batch-size 2 --warmup 1 --steps 2)
  STEPS=4 HALF=2 B1=4 B2=2 GB=8 NEVAL=7 EVDEV=(device=cpu)
  echo "CPU rehearsal (gloo)" | tee "$out/device.txt"
else
  MODEL=(model=c128_b4 quantizer=gq quantizer.groups=4 quantizer.group_dim=8 quantizer.dim=null
         data.image_size=256)
  DEVICE=(train.device=cuda)
  BENCH=(--image-size 256 --batch-size 16 --warmup 5 --steps 20)
  STEPS=20 HALF=10 B1=16 B2=8 GB=128 NEVAL=63 EVDEV=(device=cuda)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
  if [ "${WETOK_DDP_SHARED_GPU:-0}" = 1 ]; then
    export WETOK_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES=0
    echo "both ranks on GPU 0 over gloo: code paths only (not NCCL, not scaling)" \
      | tee -a "$out/device.txt"
  fi
fi
# training runs: no LPIPS (the VGG16 file is not on the device), records every step
TRAIN=("${MODEL[@]}" "${DEVICE[@]}" loss.perceptual_weight=0 train.log_every=1 train.eval_every=100000
       eval.num_images=32 "eval.metrics=[psnr,ssim]" train.ckpt_every=100000)

env_launch() {  # LOG ARGS...: wetok.train on 2 ranks started as Slurm tasks are (no torchrun):
  # the variables submitit's TorchDistributedEnvironment exports
  local log=$1 port=$((20000 + RANDOM % 20000)) pids=() rc=0
  shift
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
      MASTER_PORT=$port python3 -m wetok.train "$@" > "$log.rank$r" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}

rank_pid() {  # PARENT RANK: the child process started with RANK=rank
  local c
  for c in $(pgrep -P "$1"); do
    if tr '\0' '\n' < "/proc/$c/environ" | grep -qx "RANK=$2"; then echo "$c"; return; fi
  done
}

wait_started() {  # RUN_DIR PID: until the run logged a step (or the process ended)
  for _ in $(seq 600); do
    [ -s "$1/metrics.jsonl" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

case "$part" in
  bench)  # MODE [GB]: the train_step benchmark, 1 GPU then 2 GPUs
    mode=$1 gb=${2:-null} extra=()
    case "$mode" in
      eager) args=(--modes eager) ;;
      compile) args=(--modes compile) ;;
      cudagraphs) args=(--modes compile) extra=(train.compile_mode=reduce-overhead) ;;
      *) echo "bench: MODE eager|compile|cudagraphs, got $mode" >&2; exit 2 ;;
    esac
    over=("${MODEL[@]}" train.global_batch_size=$gb quantizer.sync_entropy=true "${extra[@]}")
    CUDA_VISIBLE_DEVICES=0 python3 -m wetok.bench.train_step \
      "${BENCH[@]}" "${args[@]}" --eval-steps 0 --no-flops \
      --json "$out/bench-$mode-gb$gb-1gpu.json" --overrides "${over[@]}" \
      2>&1 | tee "$out/bench-$mode-gb$gb-1gpu.log"
    "${TORCHRUN[@]}" -m wetok.bench.train_step "${BENCH[@]}" "${args[@]}" --eval-steps 0 \
      --no-flops --json "$out/bench-$mode-gb$gb-2gpu.json" --overrides "${over[@]}" \
      2>&1 | tee "$out/bench-$mode-gb$gb-2gpu.log"
    ;;
  table)  # mode, global batch, GPUs, ms/step, img/s, per-GPU peak, scaling vs 1 GPU
    python3 - "$out" <<'EOF' | tee "$out/bench-table.md"
import json, sys
from pathlib import Path
rows = {}
for path in sorted(Path(sys.argv[1]).glob("bench-*-gb*-*gpu.json")):
    mode, gb, gpus = path.stem.split("-")[1:]
    for r in json.loads(path.read_text())["train"]:
        rows[(mode, gb, int(gpus[0]))] = r
print("| mode | global batch | GPUs | ms/step | img/s | peak GiB per GPU | 2 GPUs / 1 GPU |")
print("|---|---|---|---|---|---|---|")
for (mode, gb, gpus), r in sorted(rows.items()):
    if r["status"] != "ok":
        print(f"| {mode} | {gb} | {gpus} | {r['status']} | - | - | - |")
        continue
    one = rows.get((mode, gb, 1), {})
    ratio = (f"{r['img_s'] / one['img_s']:.2f}x" if gpus == 2 and one.get("status") == "ok"
             else "-")
    peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
    batch = gb.removeprefix("gb")
    print(f"| {mode} | {batch if batch != 'null' else 'batch x GPUs'} | {gpus} | "
          f"{r['ms_median']:.1f} | {r['img_s']:.1f} | {peak} | {ratio} |")
EOF
    ;;
  check|resume)  # fp32 (TF32 off in cuDNN and cuBLAS), deterministic kernels (no cuDNN
    # benchmark: a GPU run repeats its losses; the noise-floor pair shows whether it does)
    export NVIDIA_TF32_OVERRIDE=0
    common=("${TRAIN[@]}" train.precision=fp32 train.compile=false train.deterministic=true
            "${SYNC[@]}")
    if [ "$part" = check ]; then
      rm -rf "$runs/one" "$runs/one_again" "$runs/two" "$runs/one_step1" "$runs/two_step1" \
        "$runs/one_plain" "$runs/two_plain"
      for run in one one_again; do
        python3 -m wetok.train "${common[@]}" train.batch_size=$B1 train.steps=$STEPS \
          hydra.run.dir=$runs/$run > "$out/check-$run.log" 2>&1
      done
      "${TORCHRUN[@]}" -m wetok.train "${common[@]}" train.batch_size=$B2 train.steps=$STEPS \
        hydra.run.dir=$runs/two > "$out/check-two.log" 2>&1
      python3 -m wetok.train "${common[@]}" train.batch_size=$B1 train.steps=1 \
        hydra.run.dir=$runs/one_step1 > "$out/check-one-step1.log" 2>&1
      "${TORCHRUN[@]}" -m wetok.train "${common[@]}" train.batch_size=$B2 train.steps=1 \
        hydra.run.dir=$runs/two_step1 > "$out/check-two-step1.log" 2>&1
      # the same with the GAN off: D's gradient jumps with its input's rounding (LeakyReLU kinks:
      # tools/gan_gradient_floor.py), so only this pair shows DDP's own gap
      # (paper model, 64^2, CPU: G 1.8e-6 without the GAN, 8.9e-4 with it; docs/multi_gpu.md)
      python3 -m wetok.train "${common[@]}" "${PLAIN[@]}" train.batch_size=$B1 train.steps=1 \
        hydra.run.dir=$runs/one_plain > "$out/check-one-plain.log" 2>&1
      "${TORCHRUN[@]}" -m wetok.train "${common[@]}" "${PLAIN[@]}" train.batch_size=$B2 \
        train.steps=1 hydra.run.dir=$runs/two_plain > "$out/check-two-plain.log" 2>&1
      {
        python3 -m wetok.bench.ddp_check $runs/one_again $runs/one \
          --label "1 GPU x $B1, run twice (the noise floor of the GPU kernels)"
        python3 -m wetok.bench.ddp_check $runs/two $runs/one --label "2 GPUs x $B2 vs 1 GPU x $B1"
        python3 -m wetok.bench.ddp_check $runs/two_step1 $runs/one_step1 \
          --label "step 1 (gradients): 2 GPUs x $B2 vs 1 GPU x $B1"
        python3 -m wetok.bench.ddp_check $runs/two_plain $runs/one_plain \
          --label "step 1, GAN off (G's gradients): 2 GPUs x $B2 vs 1 GPU x $B1"
        echo "ops without a deterministic kernel (warnings in the logs):"
        grep -ho "[A-Za-z_0-9]* does not have a deterministic implementation" "$out"/check-*.log \
          | sort | uniq -c || echo "  none"
      } 2>&1 | tee "$out/check.md"
    else
      rm -rf "$runs/uninterrupted" "$runs/split"
      "${TORCHRUN[@]}" -m wetok.train "${common[@]}" train.batch_size=$B2 train.steps=$STEPS \
        hydra.run.dir=$runs/uninterrupted > "$out/resume-uninterrupted.log" 2>&1
      "${TORCHRUN[@]}" -m wetok.train "${common[@]}" train.batch_size=$B2 train.steps=$HALF \
        hydra.run.dir=$runs/split > "$out/resume-split-1.log" 2>&1
      env_launch "$out/resume-split-2.log" "${common[@]}" train.batch_size=$B2 \
        train.steps=$STEPS hydra.run.dir=$runs/split
      grep -h "resumed from" "$out"/resume-split-2.log.rank* | tee "$out/resumed.txt"
      [ "$(wc -l < "$out/resumed.txt")" = 2 ] || { echo "not resumed on both ranks"; exit 1; }
      {
        python3 -m wetok.bench.ddp_check $runs/split $runs/uninterrupted \
          --label "2 ranks stopped at step $HALF, resumed by env launch, vs uninterrupted"
        ls -la $runs/uninterrupted $runs/split
      } 2>&1 | tee "$out/resume.md"
    fi
    ;;
  kill)  # a killed rank: torchrun ends the job naming it; env-launched rank 0 fails in time
    rm -rf "$runs/kill_torchrun" "$runs/kill_env"
    long=("${TRAIN[@]}" train.steps=100000 train.batch_size=$B2 train.dist_timeout_s=60)
    "${TORCHRUN[@]}" -m wetok.train "${long[@]}" hydra.run.dir=$runs/kill_torchrun \
      > "$out/kill-torchrun.log" 2>&1 &
    agent=$!
    wait_started $runs/kill_torchrun $agent
    victim=$(rank_pid $agent 1)
    t0=$(date +%s.%N)
    kill -9 "$victim"
    rc=0; wait $agent || rc=$?
    t1=$(date +%s.%N)
    {
      echo "torchrun: rank 1 (pid $victim) killed; job exit $rc after $(awk "BEGIN {print $t1 - $t0}") s"
      grep -E "rank +: |exitcode|SIGKILL" "$out/kill-torchrun.log" | head -5
    } | tee "$out/kill.md"
    port=$((20000 + RANDOM % 20000))
    for r in 0 1; do
      RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
        MASTER_PORT=$port python3 -m wetok.train "${long[@]}" hydra.run.dir=$runs/kill_env \
        > "$out/kill-env.log.rank$r" 2>&1 &
      pids[$r]=$!
    done
    wait_started $runs/kill_env ${pids[0]}
    t0=$(date +%s.%N)
    kill -9 ${pids[1]}
    rc=0; wait ${pids[0]} || rc=$?
    t1=$(date +%s.%N)
    {
      echo "env launch: rank 1 killed; rank 0 exit $rc after $(awk "BEGIN {print $t1 - $t0}") s" \
           "(train.dist_timeout_s=60)"
      # NCCL's watchdog may abort rank 0 itself at the timeout (then the status stays running)
      python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['status'],
        s.get('error', '(no error recorded)')[:400])" $runs/kill_env/summary.json
      tail -3 "$out/kill-env.log.rank0"
    } | tee -a "$out/kill.md"
    ;;
  eval)  # sharded evaluation: 2 ranks (torchrun) == one process, on a short run's checkpoint
    run=$runs/eval_run
    if [ ! -f "$run/checkpoints/last.pt" ]; then
      rm -rf "$run"
      python3 -m wetok.train "${TRAIN[@]}" train.batch_size=$B1 train.steps=$STEPS \
        train.ckpt_every=$STEPS hydra.run.dir=$run > "$out/eval-train.log" 2>&1
    fi
    # each evaluation its own cache folder: both compute the baselines and reference statistics;
    # batches of 1: a conv's rounding depends on which images share its batch; fp32 with
    # deterministic kernels: bf16 with cuDNN benchmark (each process timing its own algorithms)
    # flipped codes between the two (one GPU, 2026-12-03: PSNR 5.6e-4 dB apart)
    export NVIDIA_TF32_OVERRIDE=0
    ev=(num_images=$NEVAL "+run.eval.metrics=[psnr,ssim]" +run.eval.batch_size=1 "${EVDEV[@]}"
        +run.train.precision=fp32 +run.train.deterministic=true)
    python3 -m wetok.evaluate "$run" "${ev[@]}" "+run.eval.cache_dir=$runs/eval_cache1" \
      "out=$out/eval-1proc.json" > "$out/eval-1proc.log" 2>&1
    "${TORCHRUN[@]}" -m wetok.evaluate "$run" "${ev[@]}" "+run.eval.cache_dir=$runs/eval_cache2" \
      "out=$out/eval-2ranks.json" > "$out/eval-2ranks.log" 2>&1
    python3 - "$out/eval-1proc.json" "$out/eval-2ranks.json" <<'EOF2' | tee "$out/eval.md"
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:])
flat = lambda r: {**r["values"], **{f"{n}.{k}": v for n, d in r["baselines"].items()
                                    for k, v in d.items()}}
a, b = flat(one), flat(two)
print("| value | 1 process | 2 ranks | abs. difference |\n|---|---|---|---|")
worst = 0.0
for key in sorted(a):
    if isinstance(a[key], (int, float)) and isinstance(b.get(key), (int, float)):
        d = abs(a[key] - b[key])
        worst = max(worst, d)
        print(f"| {key} | {a[key]:.8g} | {b[key]:.8g} | {d:.2e} |")
    else:
        print(f"| {key} | {a[key]} | {b.get(key)} | {'equal' if a[key] == b.get(key) else 'DIFFERENT'} |")
same = a.keys() == b.keys() and all(
    abs(a[k] - b[k]) <= 1e-6 if isinstance(a[k], float) else a[k] == b[k] for k in a)
print(f"\nlargest difference {worst:.2e}; {'EQUAL' if same else 'NOT EQUAL'} within 1e-6")
sys.exit(0 if same else 1)
EOF2
    ;;
  *) echo "unknown part $part (bench|table|check|kill|eval)" >&2; exit 2 ;;
esac
