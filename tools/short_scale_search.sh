#!/usr/bin/env bash
# Pick the scale=short setting from ONE call on one GPU: candidate settings train side by side
# (one process each, all on the same GPU), each for at most TRAIN_S seconds; runs cut short are
# evaluated from their last checkpoint; OUT/search.md then compares PSNR/SSIM with both trivial
# baselines (mean colour, avg pool at the token grid) on the 140 held-out wallpaper tiles.
#
#   python -m wetok.wallpapers data/wallpapers            # once, where apt works (~1.5 MB)
#   bash tools/short_scale_search.sh OUT                  # ~9 minutes on an H200
#   STEPS=2 ONLY="base bsq" DEVICE=cpu EXTRA="train.batch_size=2 data.image_size=64" \
#     bash tools/short_scale_search.sh /tmp/s              # the CPU check of the machinery
#
# Env: DATA (data/wallpapers), STEPS (3000), TRAIN_S (390), COMPILE (false: compiling 8 models
# at once costs minutes of the 9), WORKERS (2 loader workers per run), DEVICE (auto),
# ONLY (space-separated candidate names; default all), EXTRA (overrides added to every run),
# RUNS (/tmp/short_search_runs: run folders, checkpoints included). OUT gets the records
# (runs/<candidate>/ without checkpoints), one log per candidate and search.md.
set -uo pipefail
out=${1:?usage: short_scale_search.sh OUT}
data=${DATA:-data/wallpapers} steps=${STEPS:-3000} train_s=${TRAIN_S:-390}
compile=${COMPILE:-false} workers=${WORKERS:-2} device=${DEVICE:-auto} extra=${EXTRA:-}
runs=${RUNS:-/tmp/short_search_runs}
if [ ! -f "$data/manifest.csv" ]; then
  echo "error: DATA=$data: no wallpaper image folder (make it with: python -m wetok.wallpapers $data)" >&2
  exit 2
fi
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || echo cpu > "$out/gpu.txt"

# name | overrides on top of scale=short (GQ g=2 d'=8 of Fig 3 unless the experiment changes)
declare -A CANDIDATES=(
  [base]="experiment=table06_gfq"
  [gan]="experiment=table06_gfq loss.gan_weight=0.1"
  [lr1e-3]="experiment=table06_gfq optim.lr=1e-3 optim.disc_lr=1e-3"
  [down8]="experiment=table06_gfq model.downsample=8"
  [c128]="experiment=table06_gfq model.channels=128"
  [bsq]="experiment=table08_bsq"
  [lfq]="experiment=table07_lfq"
  [g32]="experiment=table16_g32"
  [ew0]="experiment=table06_gfq quantizer.entropy_weight=0"
  [lr1e-3ew0]="experiment=table06_gfq optim.lr=1e-3 quantizer.entropy_weight=0"
  [g32ew0]="experiment=table16_g32 quantizer.entropy_weight=0"
  [g32lr1e-3]="experiment=table16_g32 optim.lr=1e-3 optim.disc_lr=1e-3"
)
names=${ONLY:-base gan lr1e-3 down8 c128 bsq lfq g32}
for name in $names; do
  [ -n "${CANDIDATES[$name]+x}" ] || { echo "error: unknown candidate $name" >&2; exit 2; }
  # shellcheck disable=SC2086
  timeout --signal=TERM "$train_s" python3 -m wetok.train ${CANDIDATES[$name]} scale=short \
    name="search_$name" data.root="$data" train.steps="$steps" train.compile="$compile" \
    train.num_workers="$workers" train.device="$device" train.log_every=50 \
    train.eval_every=1000000 train.ckpt_every=250 hydra.run.dir="$runs/$name" $extra \
    > "$out/$name.log" 2>&1 &
done
wait
# runs stopped by the time limit have a checkpoint but no final evaluation: evaluate it
for name in $names; do
  run="$runs/$name"
  if ! grep -q '"final"' "$run/summary.json" 2>/dev/null && [ -f "$run/checkpoints/last.pt" ]; then
    python3 -m wetok.evaluate "$run" >> "$out/$name.log" 2>&1 &
  fi
done
wait
(cd "$runs" && tar cf - --exclude=checkpoints $names) | (mkdir -p "$out/runs" && cd "$out/runs" && tar xf -)
python3 tools/search_table.py "$out/runs" --title "scale=short candidates ($(cat "$out/gpu.txt"))" \
  > "$out/search.md" || echo "(tools/search_table.py failed: render OUT/runs where pandas is)" >&2
cat "$out/search.md"
