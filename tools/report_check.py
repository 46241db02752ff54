"""Check a run report in a real headless browser (Debian's `chromium`), outside `make test`: the page
renders to a screenshot, and every inlined image decodes as a PNG of real size.

    .venv/bin/python tools/report_check.py runs/demo/report.html [--screenshot docs/report.png]
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from matplotlib import image


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("report", type=Path)
    p.add_argument("--screenshot", type=Path, default=None, help="where to keep the screenshot")
    a = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 2
    page = a.report.read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    for i, data in enumerate(images):
        pixels = image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50, f"image {i} is {pixels.shape}"
    shot = a.screenshot or Path(tempfile.mkdtemp()) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,2600", a.report.resolve().as_uri()], check=True, capture_output=True,
                   timeout=120)
    rendered = image.imread(shot)
    # A blank page is one colour; a rendered report has text, tables and plots.
    assert rendered.std() > 0.05, "the screenshot is blank"
    print(f"{a.report}: {len(images)} images decode; rendered to {shot} ({rendered.shape[1]}x{rendered.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
