#!/usr/bin/env bash
# The forward pass alone (`mlx-embed profile`) on an NVIDIA machine, on the synthetic
# checkpoints in bf16: each model as served (batches of ≥ 1024 tokens compiled), with every batch
# compiled and with none, then Qwen3 shapes as served under other settings of MLX's CUDA backend
# (VARIANTS; `mlx-embed` itself sets MLX_USE_CUDA_GRAPHS=0 and MLX_ENABLE_TF32=0 unless set). Tables go to OUT/profile.log, every
# report to OUT/profile.jsonl (one line per run, with its label).
#
#   scripts/gpu-profile.sh PARTS_DIR MLX_EMBED_BINARY OUT
# Knobs: MODELS ("qwen3 gemma"), SHAPES, ITERATIONS (30), VARIANTS (environment settings, one
# run each, separated by spaces).
set -euo pipefail
parts=$1 bin=$2 out=$3
. "$(dirname "$0")/mlx-cuda-env.sh"
mkdir -p "$out"
MODELS=${MODELS:-qwen3 gemma} SHAPES=${SHAPES:-1x16,8x32,16x64,32x128,64x256} ITERATIONS=${ITERATIONS:-30}
VARIANTS=${VARIANTS:-MLX_USE_CUDA_GRAPHS=1}
synth=${SYNTH_DIR:-/tmp/synth}
# shellcheck disable=SC2086
"$(dirname "$0")/synth-models.sh" "$bin" "$synth" bf16 $MODELS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/profile.log"

profile() {  # label model compile-min-tokens [VAR=value]   (min tokens: "" = as served, none = not compiled)
  local label=$1 model=$2 min=$3 compile=(--compile true)
  [ "$min" = none ] && compile=(--compile false)
  [ -n "$min" ] && [ "$min" != none ] && compile+=(--compile-min-tokens "$min")
  echo "== $label" | tee -a "$out/profile.log"
  RUST_LOG=warn env ${4:+"$4"} "$bin" profile --model-dir "$synth/$model" --device gpu --dtype bf16 "${compile[@]}" \
    --shapes "$SHAPES" --iterations "$ITERATIONS" --json /tmp/profile.json 2>&1 | tee -a "$out/profile.log"
  python3 -c "import json,sys; r=json.load(open('/tmp/profile.json')); r['label']=sys.argv[1]; print(json.dumps(r))" \
    "$label" >> "$out/profile.jsonl"
}
for m in $MODELS; do
  profile "$m as served" "$m" ""
  profile "$m all compiled" "$m" 0
  profile "$m none compiled" "$m" none
done
for v in $VARIANTS; do
  profile "qwen3 as served $v" qwen3 "" "$v"
done
