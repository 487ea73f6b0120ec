"""The sequence of device calls that carries the pieces to the lent GPU machine and runs there.

The device tool is called by the agent (it is no shell command), so this prints the calls to
make, one per piece, from bench/gpu/pieces.manifest: each carries one piece (`carry`) and copies
it into /tmp/pieces on the machine, which survives between calls only while the machine stays
warm (30 s after each call) -- make them back to back, nothing in between. The last call carries
the last piece and runs bench/gpu/remote.sh (unpack, check, `guided-ab run`, results to $OUT).

Usage: python bench/gpu/send.py [CONFIG]      (after bash bench/gpu/prepare.sh)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MIB = 64  # what one call may carry, working tree included


def main() -> int:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/gpu-h100.yaml"
    manifest = (ROOT / "bench/gpu/pieces.manifest").read_text().split("\n")
    pieces = [line.split() for line in manifest if line.startswith("part-")]
    for name, size in pieces:
        local = ROOT / ".gpu-pieces" / name
        if not local.is_file() or local.stat().st_size != int(size):
            print(f"{local} is missing or not {size} bytes: run bash bench/gpu/prepare.sh", file=sys.stderr)
            return 2
        if int(size) / 2**20 > LIMIT_MIB - 2:
            print(f"{name} is {int(size) / 2**20:.1f} MiB: too large for one call (PIECE_MIB)", file=sys.stderr)
            return 2
    calls = []
    for i, (name, _size) in enumerate(pieces):
        last = i == len(pieces) - 1
        calls.append({
            "carry": [f".gpu-pieces/{name}"],
            "timeout_s": 600 if last else 60,
            "command": (f"RUN_TIMEOUT_S=520 bash bench/gpu/remote.sh {config}" if last
                        else "mkdir -p /tmp/pieces && cp .gpu-pieces/part-* /tmp/pieces/ && ls -l /tmp/pieces"),
        })
    for i, call in enumerate(calls, 1):
        print(f"# call {i}/{len(calls)}")
        print(json.dumps(call))
    return 0


if __name__ == "__main__":
    sys.exit(main())
