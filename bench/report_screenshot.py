"""docs/report.png: a screenshot of a run's report.html in headless Chromium, for the README.

    .venv/bin/python bench/report_screenshot.py runs/demo/report.html [--out docs/report.png]

The same driver as tests/test_evaluate.py's browser test (playwright on Debian's /usr/bin/chromium,
never a downloaded browser; `make browser` installs it). The page is rendered 1200 px wide and
clipped to its first 1600 px (the headline, the quality table and the first plots), which keeps
the PNG small enough to commit. Prints JSON like the other bench scripts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a run's report.html")
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600, help="clip the page to its first N pixels")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(args.report.resolve().as_uri())
            page_height = page.evaluate("document.documentElement.scrollHeight")
            height = min(args.height, page_height)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": args.width, "height": height})
        finally:
            browser.close()
    print(json.dumps({"benchmark": "report_screenshot", "report": str(args.report), "out": str(args.out),
                      "width": args.width, "height": height, "page_height": page_height,
                      "bytes": args.out.stat().st_size}, indent=2))


if __name__ == "__main__":
    main()
