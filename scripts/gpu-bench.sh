#!/usr/bin/env bash
# scripts/bench-vs-peer.sh on an NVIDIA machine: unpacks MLX's CUDA runtime (parts from
# shared/tools/pack-mlx-cuda), then runs ours (MLX CUDA, bf16) and the peer (PyTorch CUDA, bf16).
#
#   scripts/gpu-bench.sh PARTS_DIR MLX_EMBED_BINARY OUT
set -euo pipefail
parts=$1 bin=$2 out=$3
prefix=/tmp/mlx-cuda
mkdir -p "$prefix" "$out"
[ -e "$prefix/mlx/lib/libmlx.so" ] || cat "$parts"/lib.part.* | xz -d | tar xf - -C "$prefix"
[ -e "$prefix/mlx/include" ] || tar xJf "$parts/include.tar.xz" -C "$prefix"
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
export LD_LIBRARY_PATH=$prefix/mlx/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
DEVICE=gpu DTYPE=bf16 exec "$(dirname "$0")/bench-vs-peer.sh" "$bin" "$out"
