#!/usr/bin/env bash
# End-to-end benchmark on an NVIDIA machine, ours and the PyTorch peer in one run, on synthetic
# checkpoints with the real shapes of Qwen3-Embedding-0.6B and EmbeddingGemma-300m (bf16):
#   - mlx-embed serve (MLX CUDA) loaded over gRPC on loopback by `mlx-embed bench`: one client
#     sending single short queries; open-loop single queries at a fixed rate; 128-256-token
#     documents at saturation;
#   - scripts/peer_bench.py (sentence-transformers) on the same folders and texts.
# Results: one JSON object per line in OUT/results.jsonl, the server's log and a final scrape.
#
#   scripts/gpu-bench.sh PARTS_DIR MLX_EMBED_BINARY OUT
#     PARTS_DIR: lib.part.* and include.tar.xz from shared/tools/pack-mlx-cuda
# Knobs (environment): QPS (open loop, default 2000), DURATION (10s), CONCURRENCY (docs, 16),
# DOC_BATCH (32), PEER_BATCH (64), MODELS ("qwen3 gemma").
set -euo pipefail
parts=$1 bin=$2 out=$3
prefix=/tmp/mlx-cuda
mkdir -p "$prefix" "$out"
[ -e "$prefix/mlx/lib/libmlx.so" ] || cat "$parts"/lib.part.* | xz -d | tar xf - -C "$prefix"
[ -e "$prefix/mlx/include" ] || tar xJf "$parts/include.tar.xz" -C "$prefix"
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
export LD_LIBRARY_PATH=$prefix/mlx/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
QPS=${QPS:-2000} DURATION=${DURATION:-10s} CONCURRENCY=${CONCURRENCY:-16}
DOC_BATCH=${DOC_BATCH:-32} PEER_BATCH=${PEER_BATCH:-64} MODELS=${MODELS:-qwen3 gemma}
results=$out/results.jsonl
: > "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

synth=/tmp/synth
declare -A blueprint=([qwen3]=qwen3-embedding-0.6b [gemma]=embeddinggemma-300m)
config=/tmp/bench-config.yaml
cat > "$config" <<EOF
limits: {max_concurrent_requests: 4096, max_items_per_request: 512}
batching: {max_batch_tokens: 32768, max_batch_size: 128, max_wait: 2ms, max_queue: 65536}
metrics: {listen: 127.0.0.1:9464}
models:
EOF
for m in $MODELS; do
  "$bin" synth --model "${blueprint[$m]}" --seed 1 --dtype bf16 --out "$synth/$m" 2>&1 | tee -a "$out/server.log"
  echo "  - {name: $m, source: $synth/$m, dtype: bf16, device: gpu}" >> "$config"
done

scrape() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())"; }
"$bin" serve --config "$config" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 2>>"$out/server.log" &
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
for m in $MODELS; do
  bench single "$m" --workload short --batch 1 --concurrency 1
  bench open "$m" --workload short --batch 1 --qps "$QPS" --connections 8
  bench docs "$m" --workload docs --batch "$DOC_BATCH" --concurrency "$CONCURRENCY" --connections 8
done
scrape > "$out/metrics.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/gpu memory used with the server up: /' | tee -a "$out/server.log"
kill $server; wait $server 2>/dev/null || true

for m in $MODELS; do
  echo "== peer $m"
  python3 scripts/peer_bench.py --model-dir "$synth/$m" --device cuda --dtype bf16 --batch "$PEER_BATCH" \
    --seconds 15 --json "$results" 2>&1 | grep -v -E "Loading weights|deprecated" || true
done
