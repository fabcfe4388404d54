#!/usr/bin/env bash
# Ours and the PyTorch peer in one run on one machine, on synthetic checkpoints with the real
# shapes of Qwen3-Embedding-0.6B and EmbeddingGemma-300m (`mlx-embed synth`), or on the real
# EmbeddingGemma-300m (GEMMA_DIR):
#   - `mlx-embed serve` loaded over gRPC on loopback by `mlx-embed bench`: one client sending
#     single short queries; open-loop single queries at a fixed rate; 128-256-token documents
#     at saturation;
#   - scripts/peer_bench.py (sentence-transformers) on the same folders and kinds of texts.
# Results: one JSON object per line in OUT/results.jsonl, the server's log and a final scrape.
#
#   scripts/bench-vs-peer.sh MLX_EMBED_BINARY OUT
# Knobs (environment): DEVICE (gpu|cpu), DTYPE (bf16|f32), MODELS ("qwen3 gemma"), RUNS
# ("single open docs"), QPS (open loop, 2000), DURATION (10s), WARM (unmeasured load first, 20s),
# CONCURRENCY (documents, 16), DOC_BATCH (32), PEER_BATCH (64), PEER_SECONDS (15), the server's
# BATCH_TOKENS (16384), BATCH_SIZE (64), MAX_WAIT (2ms), IDLE_SPIN (unset: 0s) and
# COMPILE_MIN_TOKENS (the default), PEER (1; 0 skips the peer), PYTHON (python3; with torch,
# transformers, sentence-transformers), STAGES (1: the server logs each call's stage times as
# JSON and OUT/stages.txt gets their P50 / P95 per run, from scripts/stage-times.py), GEMMA_DIR
# (a real EmbeddingGemma-300m folder, e.g. from scripts/fetch-embeddinggemma.py, instead of the
# synthetic one).
set -euo pipefail
bin=$1 out=$2
mkdir -p "$out"
DEVICE=${DEVICE:-gpu} DTYPE=${DTYPE:-bf16} PEER_SECONDS=${PEER_SECONDS:-15} PYTHON=${PYTHON:-python3}
WARM=${WARM:-20s} BATCH_TOKENS=${BATCH_TOKENS:-16384} BATCH_SIZE=${BATCH_SIZE:-64} MAX_WAIT=${MAX_WAIT:-2ms} IDLE_SPIN=${IDLE_SPIN:-}
QPS=${QPS:-2000} DURATION=${DURATION:-10s} CONCURRENCY=${CONCURRENCY:-16}
DOC_BATCH=${DOC_BATCH:-32} PEER_BATCH=${PEER_BATCH:-64} MODELS=${MODELS:-qwen3 gemma}
results=$out/results.jsonl
: > "$results"
if [ "$DEVICE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
else
  { grep -m1 "model name" /proc/cpuinfo; nproc; } | tee "$out/cpu.txt"
fi

synth=${SYNTH_DIR:-/tmp/synth}
model_dir() { if [ "$1" = gemma ] && [ -n "${GEMMA_DIR:-}" ]; then echo "$GEMMA_DIR"; else echo "$synth/$1"; fi; }
to_synth=()
for m in $MODELS; do [ "$(model_dir "$m")" != "$synth/$m" ] || to_synth+=("$m"); done
[ ${#to_synth[@]} = 0 ] || "$(dirname "$0")/synth-models.sh" "$bin" "$synth" "$DTYPE" "${to_synth[@]}" 2>&1 | tee -a "$out/server.log"
config=/tmp/bench-config.yaml
cat > "$config" <<EOF
limits: {max_concurrent_requests: 4096, max_items_per_request: 512}
batching: {max_batch_tokens: $BATCH_TOKENS, max_batch_size: $BATCH_SIZE, max_wait: $MAX_WAIT, max_queue: 65536${IDLE_SPIN:+, idle_spin: $IDLE_SPIN}}
metrics: {listen: 127.0.0.1:9464}
models:
EOF
for m in $MODELS; do
  echo "  - {name: $m, source: $(model_dir "$m"), dtype: $DTYPE, device: $DEVICE${COMPILE_MIN_TOKENS:+, compile_min_tokens: $COMPILE_MIN_TOKENS}}" >> "$config"
done

scrape() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())"; }
server_env=()
[ "${STAGES:-0}" != 1 ] || server_env=(RUST_LOG=info,mlx_embed::grpc::observe=debug,mlx_embed::engine=debug MLX_EMBED_LOG_FORMAT=json)
env ${server_env[@]+"${server_env[@]}"} OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4} "$bin" serve --config "$config" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 2>>"$out/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  ready=$(scrape 2>/dev/null | grep -c '^mlx_embed_model_ready{.*} 1' || true)
  [ "$ready" = "$(echo $MODELS | wc -w)" ] && break
  sleep 0.2
done
scrape | grep -E '^mlx_embed_model_load_duration_seconds|^process_resident_memory_bytes' | tee -a "$out/server.log"

bench() {  # name model args...
  local name=$1 model=$2; shift 2
  echo "== ours $model $name"
  "$bin" bench --addr 127.0.0.1:50051 --metrics-addr 127.0.0.1:9464 --model "$model" --warmup 3s \
    --duration "$DURATION" --json /tmp/report.json "$@"
  python3 -c "import json,sys; r=json.load(open('/tmp/report.json')); r['run']=sys.argv[1]; r['model']=sys.argv[2]; print(json.dumps(r))" \
    "$name" "$model" >> "$results"
}
RUNS=${RUNS:-single open docs}
for m in $MODELS; do
  # Unmeasured first: kernels compiled at first use (MLX's CUDA backend) for the shapes ahead.
  "$bin" bench --addr 127.0.0.1:50051 --model "$m" --workload mixed --batch 8 --concurrency 4 --warmup 0s --duration "$WARM" >/dev/null
  for run in $RUNS; do
    case $run in
      single) bench single "$m" --workload short --batch 1 --concurrency 1 ;;
      open) bench open "$m" --workload short --batch 1 --qps "$QPS" --connections 8 ;;
      docs) bench docs "$m" --workload docs --batch "$DOC_BATCH" --concurrency "$CONCURRENCY" --connections 8 ;;
    esac
  done
done
scrape > "$out/metrics.txt"
[ "$DEVICE" != gpu ] || nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/gpu memory used with the server up: /' | tee -a "$out/server.log"
kill $server; wait $server 2>/dev/null || true
[ "${STAGES:-0}" != 1 ] || "$(dirname "$0")/stage-times.py" "$out/server.log" "$results" | tee "$out/stages.txt"

for m in $MODELS; do
  [ "${PEER:-1}" = 1 ] || break
  echo "== peer $m"
  peer_device=cpu; [ "$DEVICE" != gpu ] || peer_device=cuda
  "$PYTHON" "$(dirname "$0")/peer_bench.py" --model-dir "$(model_dir "$m")" --device "$peer_device" --dtype "$DTYPE" \
    --batch "$PEER_BATCH" --seconds "$PEER_SECONDS" --json "$results" 2>&1 | grep -v -E "Loading weights|deprecated" || true
done
