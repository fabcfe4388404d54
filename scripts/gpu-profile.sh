#!/usr/bin/env bash
# The forward pass alone (`mlx-embed profile`) on an NVIDIA machine, on the synthetic
# checkpoints in bf16: each model with the encoder compiled and not, then Qwen3 shapes compiled
# under other settings of MLX's CUDA backend (VARIANTS). Tables go to OUT/profile.log, every
# report to OUT/profile.jsonl (one line per run, with its label).
#
#   scripts/gpu-profile.sh PARTS_DIR MLX_EMBED_BINARY OUT
# Knobs: MODELS ("qwen3 gemma"), SHAPES, ITERATIONS (30), VARIANTS (environment settings, one
# run each, separated by spaces).
set -euo pipefail
parts=$1 bin=$2 out=$3
. "$(dirname "$0")/mlx-cuda-env.sh"
mkdir -p "$out"
MODELS=${MODELS:-qwen3 gemma} SHAPES=${SHAPES:-1x16,8x32,32x128,64x256} ITERATIONS=${ITERATIONS:-30}
VARIANTS=${VARIANTS:-MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=1000}
synth=${SYNTH_DIR:-/tmp/synth}
# shellcheck disable=SC2086
"$(dirname "$0")/synth-models.sh" "$bin" "$synth" bf16 $MODELS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/profile.log"

profile() {  # label model compile [VAR=value]
  local label=$1 model=$2 compile=$3
  echo "== $label" | tee -a "$out/profile.log"
  RUST_LOG=warn env ${4:+"$4"} "$bin" profile --model-dir "$synth/$model" --device gpu --dtype bf16 --compile "$compile" \
    --shapes "$SHAPES" --iterations "$ITERATIONS" --json /tmp/profile.json 2>&1 | tee -a "$out/profile.log"
  python3 -c "import json,sys; r=json.load(open('/tmp/profile.json')); r['label']=sys.argv[1]; print(json.dumps(r))" \
    "$label" >> "$out/profile.jsonl"
}
for m in $MODELS; do
  profile "$m plain" "$m" false
  profile "$m compiled" "$m" true
done
for v in $VARIANTS; do
  profile "qwen3 compiled $v" qwen3 true "$v"
done
