"""Pack and unpack the device bundle: Python packages the GPU machine's image lacks.

Used by scripts/device_bundle.sh (here, to build) and scripts/device_bundle_install.sh
(on the GPU machine, to unpack, with no network). Standard library only: it runs
under this machine's python3 and under the image's (3.12).

A bundle is a folder of ``<group>.tar.xz`` archives plus ``MANIFEST.json``. Each
archive holds a site-packages tree: the wheels of its group unpacked as pip would
(packages + dist-info, ``.data/purelib|platlib`` folded in), minus the paths
stripped from them, plus ``bin/`` launchers for the console scripts asked for.
Invariant: unpacking every archive into one folder and putting it first on
PYTHONPATH gives the same imports as installing those wheels with pip.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MANIFEST = "MANIFEST.json"
# Bump when the archive layout changes: the build cache is keyed on it and the pins.
LAYOUT_VERSION = 1
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def _canon(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _wheel_for(wheels: Path, pin: str) -> Path | None:
    name, version = pin.split("==")
    for w in sorted(wheels.glob("*.whl")):
        w_name, w_version = w.name.split("-")[:2]
        if _canon(w_name) == _canon(name) and w_version == version:
            return w
    return None


def fetch(pins: list[str], wheels: Path, python_version: str) -> dict[str, Path]:
    """Each pin's wheel for CPython ``python_version`` on x86-64 Linux, downloaded once."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if _wheel_for(wheels, p) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               "-d", str(wheels)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        subprocess.run(cmd + missing, check=True)
    found = {p: _wheel_for(wheels, p) for p in pins}
    lost = [p for p, w in found.items() if w is None]
    if lost:
        raise SystemExit(f"no wheel found for {lost} in {wheels}")
    return found


def _unpack_wheel(wheel: Path, site: Path, strip: list[str]) -> dict:
    """Unzip ``wheel`` into ``site`` as pip lays it out; return its manifest entry."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        data_dir = dist_info[:-len(".dist-info")] + ".data"
        meta = z.read(f"{dist_info}/METADATA").decode()
        entry_points = (z.read(f"{dist_info}/entry_points.txt").decode()
                        if f"{dist_info}/entry_points.txt" in names else "")
        top = set()
        for n in names:
            if n.endswith("/") or any(n == s or n.startswith(s.rstrip("/") + "/") for s in strip):
                continue
            rel = n
            if n.startswith(data_dir + "/"):
                kind, _, rest = n[len(data_dir) + 1:].partition("/")
                if kind not in ("purelib", "platlib"):
                    continue  # scripts/headers/data: not needed to import
                rel = rest
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (z.getinfo(n).external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)
            head = rel.split("/")[0]
            if not head.endswith(".dist-info"):
                top.add(head[:-3] if head.endswith(".py") else head.split(".")[0])
    header = meta.split("\n\n", 1)[0]  # the description body follows the first blank line
    fields = [line.split(":", 1) for line in header.splitlines() if ":" in line]
    version = next(v.strip() for k, v in fields if k == "Version")
    requires = [v.strip() for k, v in fields if k == "Requires-Dist"]
    return {"version": version, "wheel": wheel.name, "top_level": sorted(top),
            "requires": requires, "entry_points": entry_points}


def _write_launchers(site: Path, entry_points: str, names: list[str]) -> None:
    """``bin/<name>`` for each console script in ``names`` (run with the python on PATH)."""
    cp = configparser.ConfigParser(delimiters=("=",))
    cp.optionxform = str
    cp.read_string(entry_points)
    scripts = dict(cp["console_scripts"]) if cp.has_section("console_scripts") else {}
    (site / "bin").mkdir(exist_ok=True)
    for name in names:
        module, _, func = scripts[name].strip().partition(":")
        path = site / "bin" / name
        path.write_text(f"#!/usr/bin/env python3\nimport sys\nfrom {module} import {func}\n"
                        f"sys.exit({func}())\n")
        path.chmod(0o755)


def _pack(site: Path, archive: Path) -> None:
    """A reproducible tar.xz of ``site`` (sorted names, zeroed owners and times)."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with lzma.open(archive, "wb", preset=6) as raw, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(site.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(site)), recursive=False, filter=clean)


def build(spec: dict, out: Path, cache: Path) -> dict:
    """Build the bundle ``spec`` describes into ``out``; archives are cached by content key.

    ``spec``: {"python_version", "groups": {group: {"pins": [...], "strip": [...],
    "scripts": {pin_name: [console script, ...]}}}}.
    """
    key = hashlib.sha256(json.dumps([LAYOUT_VERSION, spec], sort_keys=True).encode()).hexdigest()
    built = cache / "build" / key[:16]
    if not (built / MANIFEST).is_file():
        all_pins = [p for g in spec["groups"].values() for p in g["pins"]]
        wheels = fetch(all_pins, cache / "wheels", spec["python_version"])
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            manifest = {"layout": LAYOUT_VERSION, "python_version": spec["python_version"],
                        "archives": {}}
            for group, g in spec["groups"].items():
                site = tmp / "site" / group
                dists = {}
                for pin in g["pins"]:
                    name = pin.split("==")[0]
                    entry = _unpack_wheel(wheels[pin], site, g.get("strip", []))
                    if g.get("scripts", {}).get(name):
                        _write_launchers(site, entry["entry_points"], g["scripts"][name])
                    del entry["entry_points"]
                    dists[name] = entry
                archive = tmp / f"{group}.tar.xz"
                _pack(site, archive)
                shutil.rmtree(site)
                manifest["archives"][archive.name] = {
                    "bytes": archive.stat().st_size, "strip": g.get("strip", []), "dists": dists}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            shutil.rmtree(tmp / "site", ignore_errors=True)
            built.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(built, ignore_errors=True)
            tmp.rename(built)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar.xz"):
        old.unlink()
    for f in built.iterdir():
        shutil.copy2(f, out / f.name)
    return json.loads((out / MANIFEST).read_text())


def install(bundle: Path, target: Path) -> None:
    """Unpack every archive of ``bundle`` into ``target`` (no network, no pip)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    target.mkdir(parents=True, exist_ok=True)
    for name in manifest["archives"]:
        with tarfile.open(bundle / name, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
            else:
                tar.extractall(target)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a bundle from a JSON spec on stdin")
    b.add_argument("out", type=Path)
    b.add_argument("--cache", type=Path, required=True)
    i = sub.add_parser("install", help="unpack a bundle into a folder")
    i.add_argument("bundle", type=Path)
    i.add_argument("target", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        manifest = build(json.load(sys.stdin), args.out, args.cache)
        total = sum(a["bytes"] for a in manifest["archives"].values())
        for name, a in manifest["archives"].items():
            print(f"{name:24s} {a['bytes'] / 2**20:6.1f} MiB  {len(a['dists'])} dists")
        print(f"{'total':24s} {total / 2**20:6.1f} MiB  in {args.out}")
    else:
        install(args.bundle, args.target)


if __name__ == "__main__":
    main()
