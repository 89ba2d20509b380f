#!/usr/bin/env bash
# On the GPU machine: unpack the device bundle (scripts/device_bundle.sh) and check it imports.
#
#   scripts/device_bundle_install.sh [BUNDLE [TARGET]]   default: .device-bundle /tmp/site
#   eval "$(scripts/device_bundle_install.sh)"           ... and use it in this shell
#
# No network and no pip: each <group>.tar.xz is a site-packages tree, unpacked into TARGET.
# Progress and the import check go to stderr; stdout is only the two lines to eval:
#   export PYTHONPATH=TARGET:<repo>   export PATH=TARGET/bin:$PATH   (bin/serve, bin/ray)
# Exits non-zero (printing nothing to eval) if an archive is missing or a module the GPU
# path needs fails to import, so a device run stops before spending time on the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-.device-bundle}
TARGET=${2:-/tmp/site}
PY=${PY:-python3}
[[ -f "$BUNDLE/MANIFEST.json" ]] || { echo "no bundle in $BUNDLE (run scripts/device_bundle.sh here first)" >&2; exit 1; }
start=$SECONDS
if cmp -s "$BUNDLE/MANIFEST.json" "$TARGET/.device-bundle-manifest.json"; then
  echo "$TARGET already holds this bundle" >&2  # a second call on a machine still held
else
  $PY scripts/device_bundle.py install "$BUNDLE" "$TARGET" >&2
  cp "$BUNDLE/MANIFEST.json" "$TARGET/.device-bundle-manifest.json"
  echo "unpacked $BUNDLE into $TARGET in $((SECONDS - start)) s" >&2
fi
# What the image brings that the bundle relies on, and every module the GPU path imports
# that the bundle holds (a version clash with the image shows here, not mid-run).
PYTHONPATH="$TARGET:$PWD" $PY - "$BUNDLE" >&2 <<'EOF'
import importlib, importlib.metadata as md, json, sys
from pathlib import Path
manifest = json.loads((Path(sys.argv[1]) / "MANIFEST.json").read_text())
image = ["torch", "grpcio", "protobuf", "click", "aiohttp", "anyio", "h11", "numpy", "packaging"]
versions = []
for n in image:
    try:
        versions.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        versions.append(f"{n} MISSING")
print("image packages:", ", ".join(versions))
mods = ["ray", "ray.serve", "ray.util.placement_group", "fastapi", "starlette", "uvicorn",
        "pydantic", "msgspec", "adrenaline.serve.app", "adrenaline.serve.router",
        "adrenaline.actors.cluster", "flashinfer"]
failed = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # any failure here means the run would fail later
        failed.append(m)
        print(f"  import {m}: FAILED {type(e).__name__}: {e}")
in_bundle = sorted(d for a in manifest["archives"].values() for d in a["dists"])
print(f"bundle: {len(in_bundle)} dists; imports ok: {len(mods) - len(failed)}/{len(mods)}")
sys.exit(1 if failed else 0)
EOF
echo "export PYTHONPATH=$TARGET:$PWD"
echo "export PATH=$TARGET/bin:\$PATH"
