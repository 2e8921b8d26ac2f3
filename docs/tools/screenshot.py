"""A PNG of an HTML report, drawn by headless Chromium (Debian's ``chromium`` package).

    python docs/tools/screenshot.py REPORT.html OUT.png [--width 1100] [--height 1200]

`make screenshot` runs the demo job, then this on its ``latest.html``, into docs/img/. The
test suite uses `screenshot` where Chromium is installed and skips that test where not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    """The headless browser's path, or None when none is installed."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(html: Path, png: Path, width: int = 1100, height: int = 1200) -> Path:
    """Draw ``html`` (a file: nothing else is loaded) into ``png``; raises RuntimeError
    when no browser is installed or it fails."""
    binary = browser()
    if binary is None:
        raise RuntimeError(f"no headless browser: install one of {', '.join(BROWSERS)}")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pulse-batch-shot-") as profile:
        done = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",  # as root in a container
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png.resolve()}",
                html.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"{binary} failed ({done.returncode}): {done.stderr[-2000:]}")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1200)
    args = parser.parse_args()
    print(screenshot(args.html, args.png, args.width, args.height))  # noqa: T201


if __name__ == "__main__":
    main()
