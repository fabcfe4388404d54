#!/usr/bin/env bash
# Two builds of mlx-embed on one NVIDIA machine, in one run (a host's speed drifts between runs):
#   1. the vectors of both for the same texts (largest difference, per model);
#   2. the forward alone (`mlx-embed profile`), A, B, A, B;
#   3. end to end (scripts/bench-vs-peer.sh without the peer): one client sending single
#      queries, and queries started at QPS per second, A, B, A, B.
# Results: OUT/vectors.txt, OUT/profile.jsonl (label "A qwen3 1"…), OUT/e2e.jsonl (field "build").
#
#   scripts/gpu-ab.sh PARTS_DIR BINARY_A BINARY_B OUT
# Knobs: MODELS ("qwen3 gemma"), SHAPES (profile), ROUNDS (2), DURATION (10s), QPS (2000),
# STEPS ("vectors profile e2e": a subset runs those alone, to fit one command's time limit).
set -euo pipefail
parts=$1 a=$2 b=$3 out=$4
. "$(dirname "$0")/mlx-cuda-env.sh"
export MLX_ENABLE_TF32=${MLX_ENABLE_TF32:-0}
mkdir -p "$out"
STEPS=${STEPS:-vectors profile e2e} MODELS=${MODELS:-qwen3 gemma} SHAPES=${SHAPES:-1x16,4x32,8x32,16x64,64x256} ROUNDS=${ROUNDS:-2}
synth=${SYNTH_DIR:-/tmp/synth}
# shellcheck disable=SC2086
"$(dirname "$0")/synth-models.sh" "$a" "$synth" bf16 $MODELS > "$out/synth.log" 2>&1
step() { [[ " $STEPS " == *" $1 "* ]]; }

texts=("a short query about vector search"
  "a longer text about embedding servers: latency, batching, GPUs and the vector stores they feed")
step vectors && for m in $MODELS; do
  for side in A B; do
    bin=$a; [ $side = A ] || bin=$b
    RUST_LOG=warn "$bin" embed --model-dir "$synth/$m" --device gpu --dtype bf16 "${texts[@]}" > "/tmp/ab-$m-$side.json"
  done
  python3 - "$m" "/tmp/ab-$m-A.json" "/tmp/ab-$m-B.json" <<'PY' | tee -a "$out/vectors.txt"
import json, sys
a, b = (json.load(open(p))["embeddings"] for p in sys.argv[2:4])
diff = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
print(f"{sys.argv[1]}: {len(a)} vectors of {len(a[0])}, largest |A - B| {diff:.3g}")
PY
done

step profile && for round in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=$a; [ $side = A ] || bin=$b
    for m in $MODELS; do
      echo "== $side $m round $round" | tee -a "$out/profile.log"
      RUST_LOG=warn "$bin" profile --model-dir "$synth/$m" --device gpu --dtype bf16 --shapes "$SHAPES" \
        --iterations 30 --json /tmp/ab-profile.json 2>&1 | tee -a "$out/profile.log"
      python3 -c "import json,sys; r=json.load(open('/tmp/ab-profile.json')); r['label']=sys.argv[1]; print(json.dumps(r))" \
        "$side $m $round" >> "$out/profile.jsonl"
    done
  done
done

step e2e && for round in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=$a; [ $side = A ] || bin=$b
    echo "== $side end to end, round $round"
    PEER=0 RUNS="single open" WARM=${WARM:-5s} DURATION=${DURATION:-10s} MAX_WAIT=${MAX_WAIT:-0ms} \
      "$(dirname "$0")/bench-vs-peer.sh" "$bin" "/tmp/ab-e2e" > "$out/e2e-$side-$round.log" 2>&1
    python3 -c "
import json, sys
for line in open('/tmp/ab-e2e/results.jsonl'):
    r = json.loads(line); r['build'] = sys.argv[1]; print(json.dumps(r))" "$side $round" | tee -a "$out/e2e.jsonl" | cut -c1-240
  done
done
true
