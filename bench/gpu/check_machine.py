"""Run ON the GPU machine (its python3): do the packages we leave to its image satisfy what the
carried packages require? Reads bench/gpu/needs-*.txt (written by closure.py --needs-out).
Prints one line per problem and a last line 'MACHINE-CHECK OK' or 'MACHINE-CHECK PROBLEMS n'."""

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# Upper bounds that are metadata only for our use (name -> why): reported, not counted.
KNOWN = {
    "numpy": "mistral_common caps numpy<2.4 for Python<=3.12 in its metadata; it is pure Python "
             "and vLLM imports it only for Mistral tokenizers",
}
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
            known = KNOWN.get(req.name.lower())
            print(f"{f.name}: {req.name} {v} does not satisfy {req.specifier}" + (f" (known: {known})" if known else ""))
            problems += 0 if known else 1
print("MACHINE-CHECK OK" if problems == 0 else f"MACHINE-CHECK PROBLEMS {problems}")
sys.exit(0)
