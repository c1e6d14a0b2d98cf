"""Render report.html in headless Chromium and check that it shows its plots.

usage: python scripts/check_report_render.py DIR [--screenshot out.png]
Exits non-zero when Chromium is missing, the screenshot is blank, or an inlined image is
empty or not a PNG. Needs Debian's `chromium` (apt-get install chromium).
"""
import argparse
import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def inline_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def screenshot(html_path: Path, out: Path, height: int = 4000) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                        f"--window-size=1200,{height}", html_path.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out


def check(folder: Path, shot: Path) -> dict:
    html = (folder / "report.html").read_text()
    images = inline_images(html)
    if not images:
        raise SystemExit("report.html has no inlined images")
    sizes = []
    for raw in images:
        if not raw.startswith(b"\x89PNG") or len(raw) < 1000:
            raise SystemExit("an inlined image is empty or not a PNG")
        with Image.open(__import__("io").BytesIO(raw)) as im:
            sizes.append(im.size)
            colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
            if colors is None or len(colors) < 8:
                raise SystemExit(f"an inlined image of size {im.size} is blank")
    screenshot(folder / "report.html", shot)
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 22) or []
        # A rendered page of plots has thousands of colours; an empty or broken page a handful.
        if len(colors) < 200:
            raise SystemExit(f"the screenshot looks blank ({len(colors)} colours)")
    return {"images": len(images), "image_sizes": sizes, "screenshot_colours": len(colors), "screenshot": str(shot)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    shot = Path(args.screenshot or Path(args.dir) / "report_screenshot.png")
    print(check(Path(args.dir), shot))


if __name__ == "__main__":
    main()
