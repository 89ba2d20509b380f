#!/usr/bin/env bash
# The device bundle (issue 11): the Python packages the GPU machine's image lacks, packed to
# travel with a `run` on it (carry: [".device-bundle"]; 64 MiB with the working tree).
#
#   scripts/device_bundle.sh [OUTDIR [GROUP...]]    default: .device-bundle, every group
#
# Groups, one <group>.tar.xz each (site-packages trees; see scripts/device_bundle.py):
#   ray         Ray 2.60 for CPython 3.12 without ray/jars, rllib, tune, train, data and llm,
#               with bin/ray and bin/serve launchers
#   serve-deps  what Ray Serve and adrenaline's serve layer import that the image lacks
#               (the image's package list: docs/GPU.md, "The device image")
#   gpu-deps    flashinfer and what it needs beyond the image, msgspec (adrenaline's configs),
#               xgrammar (structured outputs) and gguf (GGUF model files)
# Wheels are downloaded once into $ADRENALINE_CACHE/device-bundle (default
# ~/.cache/adrenaline) and the archives are cached there by the pins below.
# On the GPU machine: scripts/device_bundle_install.sh unpacks it (no network there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-.device-bundle}
shift || true
PY=${PY:-python3}
CACHE=${ADRENALINE_CACHE:-$HOME/.cache/adrenaline}/device-bundle
mkdir -p "$CACHE"

# Every version pinned. The image has python 3.12 and, among others: aiohttp, anyio, attrs,
# click, filelock, grpcio, h11, annotated-doc, jinja2, msgpack, numpy, packaging,
# prometheus-client, protobuf, pyyaml, requests, torch, zipp (tests/unit/test_device_bundle.py
# checks every requirement below is met by the image or the bundle).
RAY_PINS='["ray==2.60.0"]'
RAY_STRIP='["ray/jars", "ray/rllib", "ray/tune", "ray/train", "ray/data", "ray/llm"]'
SERVE_PINS='[
  "fastapi==0.165.0", "starlette==1.10.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
  "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0",
  "uvicorn==0.54.0",
  "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
  "rpds-py==2026.9.1",
  "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
  "opentelemetry-semantic-conventions==0.66b2", "opentelemetry-proto==1.45.2",
  "opentelemetry-exporter-prometheus==0.66b2",
  "grpcio-reflection==1.85.1", "watchfiles==1.3.0"
]'
GPU_PINS='["flashinfer-python==0.6.18.post1", "apache-tvm-ffi==0.1.15.post2", "msgspec==0.22.0",
           "xgrammar==0.2.8", "gguf==0.19.0"]'

SPEC=$(cat <<EOF
{"python_version": "3.12", "groups": {
  "ray": {"pins": $RAY_PINS, "strip": $RAY_STRIP, "scripts": {"ray": ["ray", "serve"]}},
  "serve-deps": {"pins": $SERVE_PINS},
  "gpu-deps": {"pins": $GPU_PINS}}}
EOF
)
if (($#)); then  # a subset of the groups (to split the bundle over two runs)
  SPEC=$(echo "$SPEC" | $PY -c 'import json, sys
spec = json.load(sys.stdin); want = sys.argv[1:]
unknown = set(want) - set(spec["groups"])
if unknown: sys.exit(f"unknown group(s) {sorted(unknown)}; known: {sorted(spec[\"groups\"])}")
spec["groups"] = {g: spec["groups"][g] for g in want}; print(json.dumps(spec))' "$@")
fi
echo "$SPEC" | $PY scripts/device_bundle.py build "$OUTDIR" --cache "$CACHE"
