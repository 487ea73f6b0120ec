"""Download the wheel closure a package set needs on the lent GPU machine, minus what it already has.

The GPU machine has no network: everything it lacks must travel as wheels. pip's resolver cannot
be used for this (it would pull torch and the CUDA libraries the machine already has, and vLLM's
numba pin conflicts with the machine's numpy), so this walks the requirements itself:

  roots -> `pip download --no-deps` (cp312, manylinux x86_64) -> each wheel's Requires-Dist
        -> skip names the machine has (with a version that satisfies the requirement)
        -> skip names excluded on purpose (optional GPU kernel packages a small Llama-architecture
           model on an H100 does not use) -> repeat.

Usage (from the repository root):
  python bench/gpu/closure.py --dest .whl/vllm --roots bench/gpu/roots-vllm.txt \
      --exclude bench/gpu/exclude-vllm.txt --present bench/gpu/machine-packages.txt \
      --overrides bench/gpu/overrides-vllm.txt
Prints one line per wheel with its size and who asked for it, then the total.
"""

from __future__ import annotations

import argparse
import email.parser
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "linux_x86_64"]
ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_machine": "x86_64", "platform_system": "Linux", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}


def read_list(path: str | None) -> list[str]:
    if not path:
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def present_versions(lines: list[str]) -> dict[str, str | None]:
    """'name' or 'name==version' lines (pip freeze / pip list --format=freeze)."""
    out: dict[str, str | None] = {}
    for line in lines:
        name, _, ver = line.partition("==")
        out[canonicalize_name(name.strip())] = ver.strip() or None
    return out


def pip_download(reqs: list[str], dest: Path) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["--platform", "any"]
    return subprocess.run(cmd + reqs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode == 0


def pip_wheel(req: str, dest: Path) -> bool:
    """Pure-Python packages published only as sdists: build their (py3-none-any) wheel here."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", ":none:", "-w", str(dest), req]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode == 0


def wheels_by_name(dest: Path) -> dict[str, Path]:
    out = {}
    for w in dest.glob("*.whl"):
        name, _ver, _b, _tags = parse_wheel_filename(w.name)
        out[canonicalize_name(name)] = w
    return out


def requires(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is None:
            out.append(r)
            continue
        for extra in [""] + sorted(extras):
            if r.marker.evaluate({**ENV, "extra": extra}):
                out.append(r)
                break
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dest", required=True)
    ap.add_argument("--roots", required=True, help="requirement lines")
    ap.add_argument("--exclude", help="names never carried (not needed on the GPU path)")
    ap.add_argument("--present", help="names (or name==version) the machine has")
    ap.add_argument("--pins", help="name==version lines to prefer (e.g. a known-good local virtualenv)")
    ap.add_argument("--overrides", help="name==version lines that win over every requirement on that name")
    ap.add_argument("--needs-out", help="write 'name<spec>' for every package left to the machine (checked there)")
    a = ap.parse_args()
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    exclude = {canonicalize_name(n) for n in read_list(a.exclude)}
    present = present_versions(read_list(a.present))
    pins = present_versions(read_list(a.pins))
    overrides = {canonicalize_name(Requirement(r).name): Requirement(r) for r in read_list(a.overrides)}

    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    asked_by: dict[str, set[str]] = {}
    skipped: dict[str, str] = {}
    queue = [(Requirement(r), "root") for r in read_list(a.roots)]
    done: set[str] = set()
    while queue:
        batch: dict[str, Requirement] = {}
        for req, parent in queue:
            n = canonicalize_name(req.name)
            asked_by.setdefault(n, set()).add(parent)
            if n in overrides:
                pinned = next(iter(overrides[n].specifier)).version
                if str(req.specifier) and not req.specifier.contains(pinned, prereleases=True):
                    print(f"!! override {overrides[n]} beats {parent}'s {req.name}{req.specifier}", file=sys.stderr)
                req = overrides[n]
                specs[n] = req.specifier
            else:
                specs[n] = specs.get(n, SpecifierSet()) & req.specifier
            extras.setdefault(n, set()).update(req.extras)
            if n in exclude:
                skipped[n] = "excluded"
                continue
            if n in present:
                v = present[n]
                if v is None or specs[n].contains(Version(v), prereleases=True):
                    skipped[n] = f"on the machine ({v or 'version unknown'})"
                    continue
                skipped.pop(n, None)
                print(f"!! machine has {n} {v}, needs {specs[n]}: carrying it", file=sys.stderr)
            if n in done:
                have = wheels_by_name(dest).get(n)
                v = parse_wheel_filename(have.name)[1] if have else None
                if v is not None and not specs[n].contains(v, prereleases=True):
                    print(f"!! {n} {v} downloaded but {parent} needs {req.specifier}", file=sys.stderr)
                newly = req.extras - (extras[n] - req.extras)
                if have and newly:
                    queue.extend((r, n) for r in requires(have, set(req.extras)))
                continue
            batch[n] = req
        queue = []
        if not batch:
            break
        lines = []
        for n in batch:
            pin = pins.get(n)
            spec = specs[n]
            if pin and spec.contains(Version(pin), prereleases=True):
                lines.append(f"{n}=={pin}")
            else:
                lines.append(f"{n}{spec}")
        if not pip_download(lines, dest):
            for line in lines:
                if not pip_download([line], dest) and not pip_wheel(line, dest):
                    print(f"!! could not get a wheel for {line}", file=sys.stderr)
        have = wheels_by_name(dest)
        for n in batch:
            done.add(n)
            if n in have:
                queue.extend((r, n) for r in requires(have[n], extras.get(n, set())))

    total = 0
    have = wheels_by_name(dest)
    for n, w in sorted(have.items(), key=lambda kv: -kv[1].stat().st_size):
        size = w.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {w.name}  <- {', '.join(sorted(asked_by.get(n, {'?'})))[:80]}")
    print(f"{total / 2**20:8.2f} MiB in {len(have)} wheels")
    if a.needs_out:
        lines = [f"{n}{specs[n]}  # {', '.join(sorted(asked_by[n]))}" for n, why in sorted(skipped.items()) if why != "excluded"]
        Path(a.needs_out).write_text("\n".join(lines) + "\n")
    print(f"  left to the machine: {sum(w != 'excluded' for w in skipped.values())}, "
          f"excluded: {sorted(n for n, w in skipped.items() if w == 'excluded')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
