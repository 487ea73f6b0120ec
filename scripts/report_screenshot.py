#!/usr/bin/env python3
"""Render a run's report.html to PNG with headless Chromium (the committed docs/report.png).

    .venv/bin/python scripts/report_screenshot.py RUN            # RUN: a run directory or a run id
    .venv/bin/python scripts/report_screenshot.py RUN -o docs/report.png --width 1200 --height 0

RUN is a directory holding report.html, or a run id looked up under --store (default: runs).
If report.html is missing but evaluation.json and decision.json exist, it is written first.
--height 0 (the default) captures the whole page; any other value captures that many pixels
from the top. The page is loaded with every network request refused: a report that needs
anything from outside would show it as a gap.

Uses the system's Chromium (Debian package `chromium`, or $GUIDED_AB_CHROMIUM) through the
`playwright` Python package; it never downloads a browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]


def chromium_path() -> str | None:
    """The system Chromium: $GUIDED_AB_CHROMIUM, /usr/bin/chromium, or `chromium` on PATH."""
    for cand in (os.environ.get("GUIDED_AB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def launch(playwright):
    """A headless Chromium from the system package, with the project's launch arguments."""
    exe = chromium_path()
    if exe is None:
        raise SystemExit("no Chromium found: install Debian's 'chromium' (bash scripts/install.sh --test) "
                         "or set GUIDED_AB_CHROMIUM=/path/to/chromium")
    return playwright.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)


def resolve_report(run: str, store: str) -> Path:
    d = Path(run)
    if not d.is_dir():
        d = Path(store) / run
    if not d.is_dir():
        raise SystemExit(f"{run!r} is neither a run directory nor a run id under {Path(store).resolve()} "
                         "(`guided-ab runs` lists them)")
    html = d / "report.html"
    if not html.is_file():
        sys.path.insert(0, str(REPO))
        from guided_ab.reports.files import write_html_report
        from guided_ab.store import RunStore

        rs = RunStore.open(d.parent, d.name)
        html = write_html_report(rs, rs.load_config(), rs.read_json("evaluation.json"), rs.read_json("decision.json"))
    return html.resolve()


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 0, scale: float = 1.0,
               optimize: bool = True) -> Path:
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height or 900}, device_scale_factor=scale)
            blocked: list[str] = []

            def refuse(route):
                blocked.append(route.request.url)
                route.abort()

            page.route(lambda url: not url.startswith(("file:", "data:")), refuse)
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_selector("#decision")
            if blocked:
                print(f"warning: the report asked for {len(blocked)} outside resource(s): {blocked[:3]}", file=sys.stderr)
            if height:
                page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": width, "height": height})
            else:
                page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    if optimize:
        _shrink(out)
    return out


def _shrink(path: Path) -> None:
    """Re-encode with a 256-colour palette (a flat report loses nothing visible, the file ~3x smaller)."""
    try:
        from PIL import Image  # Pillow comes with matplotlib
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory or run id")
    ap.add_argument("--store", default="runs", help="run store root, for a run id (default: runs)")
    ap.add_argument("-o", "--output", default="docs/report.png", help="PNG to write (default: docs/report.png)")
    ap.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels")
    ap.add_argument("--height", type=int, default=0, help="capture this many pixels from the top (0: whole page)")
    ap.add_argument("--scale", type=float, default=1.0, help="device scale factor (2 for a sharper, larger PNG)")
    ap.add_argument("--no-optimize", action="store_true", help="keep Chromium's PNG as is (no 256-colour palette)")
    args = ap.parse_args(argv)
    html = resolve_report(args.run, args.store)
    out = screenshot(html, Path(args.output), args.width, args.height, args.scale, optimize=not args.no_optimize)
    print(f"{out} ({out.stat().st_size // 1024} KiB) from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
