#!/usr/bin/env bash
# The GPU check (issues 7, 11) in one call: kernels, bandwidth, engine roofline, CUDA graphs,
# offload; or, with --ray, the Ray actor path (serve_configs/gpu-1gpu.yaml) against offline.
#
#   scripts/gpu_check.sh             on the lent GPU machine (writes under $OUT, or /tmp/gpu-check)
#   scripts/gpu_check.sh --dry-run   on CPU: the same stages at tiny sizes (CI runs this)
#   scripts/gpu_check.sh --ray       the Ray actor path: serve the app of $RAY_CONFIG (default
#                                    serve_configs/gpu-1gpu.yaml) as Ray actors, send greedy
#                                    requests over HTTP, compare with the offline engine
#   scripts/gpu_check.sh --ray --dry-run   the same layout on CPU (tiny model, float32)
#
# On the device machine nothing can be downloaded. The device bundle carried in
# .device-bundle/ (scripts/device_bundle.sh: Ray, Serve's dependencies, flashinfer, msgspec)
# is unpacked into /tmp/site first; without one, wheels carried in .whl/ are installed there
# (docs/GPU.md). flashinfer's JIT modules for the shapes checked are compiled in the
# background while the first stages (or Ray's start-up) run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
DRY=0 RAY=0 ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1; ARGS+=("$a") ;;
    --ray) RAY=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
if ((!DRY)); then
  if [[ -f .device-bundle/MANIFEST.json ]]; then
    lines=$(PY=$PY scripts/device_bundle_install.sh .device-bundle /tmp/site) || exit 1
    eval "$lines"  # PYTHONPATH and PATH (bin/serve, bin/ray)
  elif compgen -G ".whl/*.whl" >/dev/null; then
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
if ((!DRY)); then
  $PY -m adrenaline.bench.flashinfer_warmup >"$OUT/jit_warmup.log" 2>&1 &
  WARM=$!
fi
if ((RAY)); then
  CHECK=(-m adrenaline.bench.ray_path_check --config "${RAY_CONFIG:-serve_configs/gpu-1gpu.yaml}"
         --out "$OUT")
  ((DRY)) && CHECK+=(--cpu)
  $PY "${CHECK[@]}" 2>&1 | tee "$OUT/ray_path.log"
else
  $PY -m adrenaline.bench gpu-check --out "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log"
fi
rc=${PIPESTATUS[0]}
[[ -n "${WARM:-}" ]] && { wait "$WARM" || echo "flashinfer warm-up failed: see $OUT/jit_warmup.log"; }
exit "$rc"
