#!/usr/bin/env bash
# Installs MLX's official wheel (pinned) into $MLX_DIR (default .mlx): headers and libmlx.so.
# On Linux it also puts Debian's OpenBLAS behind the wheel's bundled reference BLAS/LAPACK names
# (the bundled reference BLAS is about 100x slower on matmul).
#
#   scripts/install-mlx.sh [WHEEL]   WHEEL: mlx-cpu (Linux default), mlx (macOS), mlx-cuda-13
#
# Used by scripts/setup.sh and the container builds (deploy/docker/). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_VERSION=0.32.4
MLX_DIR=${MLX_DIR:-$PWD/.mlx}

case "$(uname -s)" in
  Linux)  wheel=${1:-mlx-cpu} ;;
  Darwin) wheel=${1:-mlx} ;;
  *) echo "install-mlx: unsupported OS $(uname -s)" >&2; exit 1 ;;
esac
libs_dir=${wheel//-/_}.libs

stamp="$MLX_DIR/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheel==$MLX_VERSION" ]; then
  echo "install-mlx: installing $wheel==$MLX_VERSION into $MLX_DIR"
  rm -rf "$MLX_DIR"
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$MLX_DIR" "$wheel==$MLX_VERSION"
  echo "$wheel==$MLX_VERSION" > "$stamp"
fi

if [ "$(uname -s)" = Linux ]; then
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
