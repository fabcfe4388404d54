#!/usr/bin/env bash
# Memory under the documents load, then at idle: for each model, the server's peak resident memory
# (VmHWM), its resident memory 1, 3 and 10 s after the load ends, the transparent huge pages in it,
# and MLX's active/cache/peak gauges. With BEFORE=<binary> (e.g. a build of an earlier commit) the
# same runs go through that binary too, in the same invocation, so the two columns compare.
#
#   scripts/memory-bench.sh                         # target/release/mlx-embed only
#   BEFORE=/tmp/mlx-embed-main scripts/memory-bench.sh
#
# Models: the two tiny fixtures, and EmbeddingGemma-300m and Qwen3-Embedding-0.6B shapes in f32
# written by `mlx-embed synth` into $SYNTH_DIR (once). MODELS="qwen3-tiny gemma-tiny" picks some.
# Load: `mlx-embed bench --workload docs --batch $BATCH --concurrency $CONCURRENCY` for $DURATION
# (defaults: 32 texts per request for the tiny models, $REAL_BATCH (4) for the real shapes, 2
# clients, 20s). AFTER_MEMORY is YAML put under `memory:` for the after binary (default: none,
# i.e. the defaults). With nvidia-smi, two more columns: the card's memory in use at most during
# the load (sampled every 250 ms; run nothing else on it) and what the server holds 10 s after.
# Linux only (reads /proc). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
AFTER=${AFTER:-target/release/mlx-embed}
BEFORE=${BEFORE:-}
DURATION=${DURATION:-20s}
CONCURRENCY=${CONCURRENCY:-2}
SYNTH_DIR=${SYNTH_DIR:-/tmp/mlx-embed-memory-models}
MODELS=${MODELS:-"qwen3-tiny gemma-tiny embeddinggemma-300m qwen3-embedding-0.6b"}
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-$(scripts/blas-coretype)} OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

folder() { # the model folder of a name, written by synth if it is a real model's shape
  case $1 in
    qwen3-tiny | gemma-tiny) echo "$PWD/tests/fixtures/$1" ;;
    *) [ -f "$SYNTH_DIR/$1/config.json" ] || "$AFTER" synth --model "$1" --dtype f32 --out "$SYNTH_DIR/$1" >&2
       echo "$SYNTH_DIR/$1" ;;
  esac
}
kib() { awk -v k="$2" '$1 == k":" {print $2}' "$1"; }
mib() { echo $(( $1 / 1024 )); }
gauge() { # MLX memory gauge of a kind, in MiB
  curl -s "http://$metrics/metrics" | awk -v k="kind=\"$1\"" 'index($0, "mlx_embed_mlx_memory_bytes{") == 1 && index($0, k) {printf "%d", $NF / 1048576}'
}

run() { # binary label model
  local bin=$1 label=$2 model=$3 dir; dir=$(folder "$model")
  { printf 'models:\n  - name: m\n    source: %s\n' "$dir"
    if [ "$label" = after ] && [ -n "${AFTER_MEMORY:-}" ]; then printf 'memory:\n%s\n' "$AFTER_MEMORY"; fi
  } > "$work/config.yaml"
  : > "$work/log" # there before the server's first line, for the loop below
  "$bin" serve --config "$work/config.yaml" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 2> "$work/log" &
  pid=$!
  local addr= metrics=
  for _ in $(seq 600); do
    addr=$(sed -n 's/^listening on //p' "$work/log"); metrics=$(sed -n 's/^metrics on //p' "$work/log")
    [ -n "$addr" ] && curl -s "http://$metrics/metrics" | grep -q '^mlx_embed_model_ready{model="m"} 1' && break
    sleep 0.5
  done
  local weights; weights=$(find -L "$dir" -name '*.safetensors' -printf '%s\n' | awk '{s += $1} END {printf "%.1f", s / 1048576}')
  local loaded; loaded=$(mib "$(kib /proc/$pid/status VmRSS)")
  local batch; case $model in *-tiny) batch=${BATCH:-32} ;; *) batch=${REAL_BATCH:-4} ;; esac
  local sampler=
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$work/smi" &
    sampler=$!
  fi
  local rate; rate=$("$bin" bench --addr "$addr" --workload docs --batch "$batch" --concurrency "$CONCURRENCY" --warmup 2s --duration "$DURATION" 2>/dev/null | awk '$1 == "per" {print $4}')
  [ -n "$sampler" ] && kill "$sampler"
  local idle=() t0=$SECONDS
  for at in 1 3 10; do
    while (( SECONDS - t0 < at )); do sleep 0.2; done
    idle+=("$(mib "$(kib /proc/$pid/status VmRSS)")")
  done
  local peak thp gpu=
  peak=$(mib "$(kib /proc/$pid/status VmHWM)")
  thp=$(mib "$(kib /proc/$pid/smaps_rollup AnonHugePages)")
  if command -v nvidia-smi > /dev/null; then
    gpu=" $(sort -n "$work/smi" | tail -1) | $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p="$pid" '$1 == p {print $2}') |"
  fi
  printf '| %s | %s | %s | %s | %s | %s | %s / %s / %s | %s | %s / %s / %s |%s\n' "$model" "$label" "$weights" "$rate" "$loaded" "$peak" \
    "${idle[0]}" "${idle[1]}" "${idle[2]}" "$thp" "$(gauge active)" "$(gauge cache)" "$(gauge peak)" "$gpu"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

gpu_head= gpu_rule=
if command -v nvidia-smi > /dev/null; then gpu_head=" GPU max MiB | GPU idle MiB |" gpu_rule="---|---|"; fi
echo "| model | binary | weights MiB | texts/s | RSS loaded MiB | RSS peak MiB | RSS idle 1 / 3 / 10 s MiB | THP idle MiB | MLX active / cache / peak MiB |$gpu_head"
echo "|---|---|---|---|---|---|---|---|---|$gpu_rule"
for model in $MODELS; do
  [ -n "$BEFORE" ] && run "$BEFORE" before "$model"
  run "$AFTER" after "$model"
done
