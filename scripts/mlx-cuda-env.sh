# Sourced by the scripts run on an NVIDIA machine (gpu-check.sh, gpu-bench.sh) with $parts set to
# a folder of lib.part.* and include.tar.xz from shared/tools/pack-mlx-cuda: unpacks MLX's CUDA
# runtime into /tmp/mlx-cuda once (the headers are needed at run time: MLX's CUDA backend
# compiles kernels with NVRTC) and puts it first on the library path, so binaries linked against
# the CPU wheel (same soname) run on the GPU. Compiled kernels are cached across processes.
prefix=/tmp/mlx-cuda
mkdir -p "$prefix"
[ -e "$prefix/mlx/lib/libmlx.so" ] || cat "$parts"/lib.part.* | xz -d | tar xf - -C "$prefix"
[ -e "$prefix/mlx/include" ] || tar xJf "$parts/include.tar.xz" -C "$prefix"
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
export LD_LIBRARY_PATH=$prefix/mlx/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
