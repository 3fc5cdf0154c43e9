"""Headless Chromium helpers for browser tests: dump the DOM, take screenshots, read PNGs.

Chromium runs offline (network hosts do not resolve) with a throwaway profile, so a page
only draws if everything it needs is inlined.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

_CANDIDATES = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary ($CODELENS_CHROMIUM, /usr/bin/chromium, then PATH)."""
    env = os.environ.get("CODELENS_CHROMIUM")
    if env and Path(env).exists():
        return env
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Chromium's path; skip the test without it, or fail if CODELENS_REQUIRE_BROWSER=1."""
    path = find_chromium()
    if path is None:
        message = "headless Chromium not found (apt-get install chromium)"
        if os.environ.get("CODELENS_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; CODELENS_REQUIRE_BROWSER=1 demands it")
        pytest.skip(message)
    return path


def _run(binary: str, url: str, extra: list[str], budget_ms: int, timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="codelens-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--mute-audio",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def file_url(path: str | os.PathLike, fragment: str = "") -> str:
    """file:// URL of path, with an optional #fragment (passed through as given)."""
    url = Path(path).resolve().as_uri()
    return f"{url}#{fragment}" if fragment else url


def dump_dom(binary: str, url: str, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The serialised DOM after scripts ran for budget_ms of virtual time."""
    return _run(binary, url, ["--dump-dom"], budget_ms, timeout)


def screenshot(
    binary: str,
    url: str,
    png: str | os.PathLike,
    size: tuple[int, int] = (1200, 900),
    budget_ms: int = 5000,
    timeout: float = 120,
) -> Path:
    """Save a PNG screenshot of url at the given window size."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}"]
    _run(binary, url, extra, budget_ms, timeout)
    if not png.exists():
        raise RuntimeError("chromium wrote no screenshot")
    return png


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG to a uint8 array [height, width, channels]."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or interlace != 0 or channels is None:
        raise ValueError(f"unsupported PNG (depth {depth}, colour {color}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1).copy()
        if kind == 1:  # Sub: running sum per channel
            line = (line.reshape(width, channels).cumsum(0, dtype=np.int64) % 256).astype(np.uint8)
            line = line.reshape(stride)
        elif kind == 2:  # Up
            line = line + prev
        elif kind in (3, 4):  # Average, Paeth: sequential per byte
            cur, up = line.tolist(), prev.tolist()
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                if kind == 3:
                    pred = (left + up[x]) // 2
                else:
                    pred = _paeth(left, up[x], up[x - channels] if x >= channels else 0)
                cur[x] = (cur[x] + pred) & 255
            line = np.array(cur, dtype=np.uint8)
        elif kind != 0:
            raise ValueError(f"bad PNG filter {kind}")
        out[y] = line
        prev = line
    return out.reshape(height, width, channels)


def content_pixel_share(pixels: np.ndarray) -> float:
    """Share of pixels that differ from the most common (background) colour."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((flat != background).any(axis=1).mean())


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.scripts = 0
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        self.scripts += tag == "script"

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    """Text content of a DOM dump outside <script> and <style>, entities decoded."""
    parser = _TextParser()
    parser.feed(dom)
    parser.close()
    return "".join(parser.parts)


def script_elements(html: str) -> int:
    """Number of <script> elements an HTML parser sees (script text is not parsed)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return parser.scripts
