#!/usr/bin/env bash
# The GPU check (issue 7) in one call: kernels, bandwidth, engine roofline, CUDA graphs, offload.
#
#   scripts/gpu_check.sh             on the lent GPU machine (writes under $OUT, or /tmp/gpu-check)
#   scripts/gpu_check.sh --dry-run   on CPU: the same stages at tiny sizes (CI runs this)
#
# On the device machine nothing can be downloaded: wheels carried in .whl/ (flashinfer-python
# 0.6.x, apache-tvm-ffi, msgspec; see docs/GPU.md) are installed into /tmp/site first, and
# flashinfer's JIT modules for the shapes checked are compiled in the background while the
# first stages run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
  export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer-ws}
  export MAX_JOBS=${MAX_JOBS:-8}
  [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]] && export CUDA_HOME=/usr/local/cuda
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ " $* " != *" --dry-run "* ]]; then
  $PY -m adrenaline.bench.flashinfer_warmup >"$OUT/jit_warmup.log" 2>&1 &
  WARM=$!
fi
$PY -m adrenaline.bench gpu-check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[[ -n "${WARM:-}" ]] && { wait "$WARM" || echo "flashinfer warm-up failed: see $OUT/jit_warmup.log"; }
exit "$rc"
