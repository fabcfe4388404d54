#!/usr/bin/env bash
# Writes the synthetic checkpoints the benchmarks run on (`mlx-embed synth`, seed 1), each once
# per dtype: DIR/qwen3 (Qwen3-Embedding-0.6B shapes) and DIR/gemma (EmbeddingGemma-300m shapes).
#
#   scripts/synth-models.sh MLX_EMBED_BINARY DIR DTYPE MODEL...   (MODEL: qwen3 | gemma)
set -euo pipefail
bin=$1 dir=$2 dtype=$3
shift 3
declare -A blueprint=([qwen3]=qwen3-embedding-0.6b [gemma]=embeddinggemma-300m)
for m in "$@"; do
  [ -n "${blueprint[$m]:-}" ] || { echo "unknown model $m (qwen3, gemma)" >&2; exit 2; }
  [ -e "$dir/$m/.$dtype" ] && continue
  rm -rf "${dir:?}/$m"
  "$bin" synth --model "${blueprint[$m]}" --seed 1 --dtype "$dtype" --out "$dir/$m"
  touch "$dir/$m/.$dtype"
done
