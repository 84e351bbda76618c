"""Screenshot a `cbtool report` page in Debian's headless chromium (docs/report.png, shown in docs/report.md).

usage: python scripts/report_screenshot.py REPORT.html OUT.png [SEARCH [LABEL]]

Opens the report from disk, optionally types SEARCH and picks the label value LABEL (codes sorted by precision
for it), opens the first code card and saves a 1200x760 view of the code browser, reduced to a 64-colour
palette to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright


def main(report: Path, out: Path, search: str = "", label: str = "") -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(report.resolve().as_uri())
        if search:
            page.fill("#q", search)
        if label:
            page.select_option("#label", label)
        page.locator(".card button").first.click()
        page.locator("#browser").evaluate("e => e.scrollIntoView()")
        page.screenshot(path=str(out))
        browser.close()
    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:5])
