"""Run ON the GPU machine (its python3): do the packages we leave to its image satisfy what the
carried packages require? Reads bench/gpu/needs-*.txt (written by closure.py --needs-out).
Prints one line per problem and a last line 'MACHINE-CHECK OK' or 'MACHINE-CHECK PROBLEMS n'."""

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

problems = 0
for f in sorted(Path(__file__).parent.glob("needs-*.txt")):
    for line in f.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            v = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            print(f"{f.name}: {req.name} missing (needs {req.specifier or 'any'})")
            problems += 1
            continue
        if req.specifier and not req.specifier.contains(v, prereleases=True):
            print(f"{f.name}: {req.name} {v} does not satisfy {req.specifier}")
            problems += 1
print("MACHINE-CHECK OK" if problems == 0 else f"MACHINE-CHECK PROBLEMS {problems}")
sys.exit(0)
