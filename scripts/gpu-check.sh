#!/usr/bin/env bash
# Runs the MLX parity tests and a matmul probe on an NVIDIA machine with MLX's CUDA runtime.
# The binaries are built on a Linux CPU machine (linked against the mlx-cpu wheel); libmlx.so
# has the same soname in the CUDA wheel, so LD_LIBRARY_PATH selects the CUDA build here.
#
#   scripts/gpu-check.sh PARTS_DIR BIN_DIR
#     PARTS_DIR: lib.part.* and include.tar.xz from shared/tools/pack-mlx-cuda (the headers are
#                needed at run time: MLX's CUDA backend compiles kernels with NVRTC)
#     BIN_DIR:   parity, mlx_bridge, bad_folders, quantized, mlx-embed, matmul_gflops, qmm_check,
#                and optionally server, bad_requests (release builds)
set -euo pipefail
parts=$1 bins=$2
. "$(dirname "$0")/mlx-cuda-env.sh"
# Test binaries look for fixtures where they were built.
built_in=$(strings "$bins/parity" | grep -m1 -o '/[^ ]*/tests/fixtures' | sed 's#/tests/fixtures##' || true)
if [ -n "$built_in" ] && [ ! -e "$built_in/tests/fixtures" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== matmul probe (GPU default device)"; "$bins/matmul_gflops" 4096 20
echo "== mlx-embed embed --device gpu"
"$bins/mlx-embed" embed --model-dir tests/fixtures/gemma-tiny --device gpu --dtype f32 "hello GPU" | cut -c1-160 || true
if [ -n "${QMM_CHECK:-}" ]; then
  echo "== quantized kernels vs the CPU (TF32 off)"; MLX_ENABLE_TF32=0 "$bins/qmm_check" || true
fi
echo "== mlx-embed embed --device gpu, 8-bit model (kernel check in the log)"
"$bins/mlx-embed" embed --model-dir tests/fixtures/qwen3-tiny-q8 --device gpu "hello GPU" 2>&1 | cut -c1-400 || true
# (The NVRTC check of the kernels' sources is for machines without a GPU; here MLX compiles them.)
echo "== bridge"; "$bins/mlx_bridge" --test-threads 1 --skip the_cuda_kernels_compile 2>&1 | grep "test result" || true
echo "== bad folders"; "$bins/bad_folders" --test-threads 1 2>&1 | grep "test result" || true
echo "== quantized"; MLX_EMBED_TEST_DEVICE=gpu "$bins/quantized" --test-threads 1 2>&1 | grep "test result" || true
if [ -x "$bins/server" ]; then
  echo "== the gRPC service with its models on the GPU (grpcurl is not carried)"
  MLX_ENABLE_TF32=0 MLX_EMBED_TEST_DEVICE=gpu "$bins/server" --skip grpcurl 2>&1 | grep -E "^test |panicked|test result" || true
  MLX_ENABLE_TF32=0 MLX_EMBED_TEST_DEVICE=gpu "$bins/bad_requests" 2>&1 | grep -E "panicked|test result" || true
fi
for tf32 in 0 1; do
  echo "== parity on the GPU, MLX_ENABLE_TF32=$tf32"
  MLX_ENABLE_TF32=$tf32 MLX_EMBED_TEST_DEVICE=gpu "$bins/parity" --test-threads 1 --nocapture 2>&1 \
    | grep -E "max|cosine|FAIL|test result|WARN" || true
done
