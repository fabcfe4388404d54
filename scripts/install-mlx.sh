#!/usr/bin/env bash
# Installs MLX's official wheel (pinned) into $MLX_DIR (default .mlx): the C++ headers
# (mlx/include) and libmlx (mlx/lib), which build.rs compiles and links the bridge against.
#   - Linux: mlx-cpu (or the wheel named), libmlx.so; Debian's OpenBLAS is put behind the wheel's
#     bundled reference BLAS/LAPACK names (the bundled reference BLAS is about 100x slower on matmul).
#   - macOS on Apple Silicon: mlx-metal, which carries MLX's C++ side: the headers, libmlx.dylib
#     (install name @rpath/libmlx.dylib) and mlx.metallib beside it, where libmlx looks for its
#     Metal kernels first (in the folder of the libmlx.dylib it was loaded from). The `mlx` wheel
#     holds only the Python extension and has none of these. The wheel is taken for
#     macosx_14_0_arm64 whatever the Python is: it is a carrier of C++ files, and Apple's own
#     python3 (3.9) is older than the wheel's Requires-Python.
#
#   scripts/install-mlx.sh [WHEEL]   WHEEL: mlx-cpu (Linux default), mlx-metal (macOS default),
#                                    mlx-cuda-13 (Linux)
#
# Used by scripts/setup.sh and the container builds (deploy/docker/), and run by tests/platforms.rs
# as a Mac would run it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_VERSION=0.32.4
MLX_DIR=${MLX_DIR:-$PWD/.mlx}

os=$(uname -s)
case "$os-$(uname -m)" in
  Linux-*) wheel=${1:-mlx-cpu}; pick=() ;;
  Darwin-arm64) wheel=${1:-mlx-metal}; pick=(--platform macosx_14_0_arm64 --ignore-requires-python) ;;
  Darwin-*)
    echo "install-mlx: MLX's Metal wheels are for Apple Silicon (arm64) only, not $(uname -m)" \
      "(a shell under Rosetta reports x86_64: run it natively)" >&2
    exit 1 ;;
  *) echo "install-mlx: unsupported OS $os" >&2; exit 1 ;;
esac
libs_dir=${wheel//-/_}.libs

stamp="$MLX_DIR/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheel==$MLX_VERSION" ]; then
  echo "install-mlx: installing $wheel==$MLX_VERSION into $MLX_DIR"
  rm -rf "$MLX_DIR"
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$MLX_DIR" ${pick[@]+"${pick[@]}"} "$wheel==$MLX_VERSION"
  if [ "$os" = Darwin ] && [ ! -e "$MLX_DIR/mlx/lib/mlx.metallib" ]; then
    echo "install-mlx: $wheel has no mlx/lib/mlx.metallib next to libmlx.dylib: MLX would find no Metal kernels" >&2
    exit 1
  fi
  echo "$wheel==$MLX_VERSION" > "$stamp"
fi

if [ "$os" = Linux ]; then
  multiarch=$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
  openblas=/usr/lib/$multiarch/openblas-pthread
  if [ ! -e "$openblas/libblas.so.3" ]; then
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libopenblas0-pthread >/dev/null
  fi
  # The wheel's libmlx.so asks for its bundled BLAS/LAPACK by their hashed names through its
  # RPATH; the same names as links to OpenBLAS swap the implementation without relinking.
  for lib in "$MLX_DIR/$libs_dir"/libblas-*.so.* "$MLX_DIR/$libs_dir"/liblapack-*.so.*; do
    [ -e "$lib" ] || [ -L "$lib" ] || continue
    case "$(basename "$lib")" in libblas-*) target=$openblas/libblas.so.3 ;; *) target=$openblas/liblapack.so.3 ;; esac
    if [ "$(readlink "$lib" || true)" != "$target" ]; then
      ln -sf "$target" "$lib"
      echo "install-mlx: $(basename "$lib") -> $target"
    fi
  done
fi
