#!/bin/sh
# Container entrypoint: picks OpenBLAS's kernels for the host's CPU (which the image cannot know
# in advance) unless OPENBLAS_CORETYPE is set, lets OpenBLAS's idle threads sleep at once
# (README, "CPU BLAS") unless OPENBLAS_THREAD_TIMEOUT is set, then runs mlx-embed with the given
# arguments.
set -eu
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  OPENBLAS_CORETYPE=$(/usr/local/lib/mlx-embed/blas-coretype)
  [ -z "$OPENBLAS_CORETYPE" ] || export OPENBLAS_CORETYPE
fi
export OPENBLAS_THREAD_TIMEOUT="${OPENBLAS_THREAD_TIMEOUT:-4}"
exec /usr/local/bin/mlx-embed "$@"
