#!/usr/bin/env bash
# scripts/bench-vs-peer.sh on an NVIDIA machine: unpacks MLX's CUDA runtime (parts from
# shared/tools/pack-mlx-cuda), then runs ours (MLX CUDA, bf16) and the peer (PyTorch CUDA, bf16).
#
#   scripts/gpu-bench.sh PARTS_DIR MLX_EMBED_BINARY OUT
set -euo pipefail
parts=$1 bin=$2 out=$3
. "$(dirname "$0")/mlx-cuda-env.sh"
DEVICE=gpu DTYPE=bf16 exec "$(dirname "$0")/bench-vs-peer.sh" "$bin" "$out"
