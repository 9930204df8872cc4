"""Shared by tests/test_serve_security.py and benchmarks/reliability_serve.py: a live
``destatic serve`` process on loopback, hostile inputs (decompression bombs, a LAB TIFF, deep
JSON) and a caller of the gradio UI's endpoints."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import io
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

EVIL_ORIGIN = "https://evil.example"
JSON = {"content-type": "application/json"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A running ``destatic serve``: its base URL, process and log file (stdout + stderr)."""

    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 120) -> Iterator[LiveServer]:
    """``destatic serve ARGS`` on a free loopback port, until it answers ``/api/health``
    (any status: a server with a token answers 401); stopped when the block ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DESTATIC_TOKEN", "GRADIO_TEMP_DIR")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = Path(tempfile.mkstemp(prefix="destatic-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "destatic.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_until_up(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)


def _wait_until_up(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"destatic serve exited:\n{server.output()[-3000:]}")
        try:
            httpx.get(f"{server.url}/api/health", timeout=2)
            return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"destatic serve did not start:\n{server.output()[-3000:]}")
        time.sleep(0.2)


def api_client(url: str, token: str | None = None) -> httpx.Client:
    """A client of the JSON API (use it in ``with``), sending ``token`` as ``Authorization:
    Bearer`` if given."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=300)


@contextlib.contextmanager
def ui_client(url: str, auth: tuple[str, str] | None = None) -> Iterator[httpx.Client]:
    """A client of the gradio UI's endpoints, logged in with ``auth`` (user, password) if
    given, as a browser is after the login page."""
    with httpx.Client(base_url=url, timeout=300) as client:
        if auth is not None:
            login = {"username": auth[0], "password": auth[1]}
            client.post("/login", data=login).raise_for_status()
        yield client


# -- hostile inputs ------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zeros_zlib(size: int, block: int = 1 << 22) -> bytes:
    """A zlib stream of ``size`` zero bytes, fast: after a full flush the compressor forgets
    its history, so every whole block compresses to the same bytes and is repeated."""
    c = zlib.compressobj(9)
    first = c.compress(bytes(min(block, size))) + c.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(size, block)
    repeat = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH) if whole > 1 else b""
    tail = c.compress(bytes(rest)) + c.flush() if whole else c.flush()
    adler = struct.pack(">I", (size % 65521) << 16 | 1)  # Adler-32 of zeros: s1 = 1, s2 = n
    return first + repeat * max(whole - 1, 0) + tail[:-4] + adler


@functools.lru_cache(maxsize=4)
def png_bomb(side: int, mode: str = "RGB") -> bytes:
    """A valid black ``side``×``side`` PNG: small on the wire, ``side²·channels`` bytes
    decoded (12000 RGB: 0.4 MB → 432 MB)."""
    color_type, channels = {"L": (0, 1), "RGB": (2, 3)}[mode]
    header = struct.pack(">IIBBBBB", side, side, 8, color_type, 0, 0, 0)
    data = _zeros_zlib(side * (1 + side * channels))  # each row: filter byte + pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def lab_tiff(side: int = 32) -> bytes:
    """A LAB-mode TIFF: Pillow reads it but cannot convert it to a greyscale mask."""
    return image_bytes(Image.new("LAB", (side, side)), "TIFF")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def noise_png(side: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def deep_json(depth: int) -> bytes:
    """``{"prompt": [[[…]]]}`` nested ``depth`` lists deep."""
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def malformed_requests() -> dict[str, bytes]:
    """JSON bodies for ``/api/generate`` that once answered 500; each must now be a 400."""
    big = b64(png_bomb(20000, "L"))
    good = b64(noise_png())

    def body(**fields: Any) -> bytes:
        return json.dumps({"prompt": "red heart", "steps": 1, **fields}).encode()

    return {
        "sampler: []": body(sampler=[]),
        "sampler: {}": body(sampler={}),
        "grid: []": body(grid=[]),
        "grid: {}": body(grid={}),
        "image: 20000² PNG": body(image=big),
        "mask: 20000² PNG": body(image=good, mask=big),
        "control_image: 20000² PNG": body(control_image=big),
        "mask: LAB TIFF": body(image=good, mask=b64(lab_tiff())),
        'prompt: "\\ud800"': b'{"prompt": "red \\ud800 heart", "steps": 1}',
        "JSON 100000 deep": deep_json(100_000),
    }


# -- the gradio UI's endpoints -------------------------------------------------------------------
def file_data(path: str) -> dict[str, Any]:
    """A gradio FileData argument naming ``path``, as a client may send it."""
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def ui_arguments(endpoint: str, image: Any, size: int = 32) -> list[Any]:
    """The argument list of the UI's ``endpoint`` (control, img2img, inpaint) with ``image``
    as its image input; two sampler steps, one image."""
    knobs = ["euler", "default", 2, 3.0, 0, 1, size]
    if endpoint == "control":
        return ["red heart", "", image, False, 1.0, 0.0, 1.0, *knobs]
    if endpoint == "img2img":
        return ["red heart", "", image, 0.6, *knobs]
    if endpoint == "inpaint":
        return [
            "red heart",
            "",
            {"background": image, "layers": [image], "composite": image},
            *knobs,
        ]
    raise ValueError(f"no UI endpoint {endpoint!r}")


def gradio_call(
    ui: httpx.Client, endpoint: str, data: list[Any], headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """POST ``/gradio_api/call/ENDPOINT`` and read its event stream: (status, text); the status
    is the POST's when it was refused, else the stream's."""
    r = ui.post(f"/gradio_api/call/{endpoint}", json={"data": data}, headers=headers)
    if r.status_code != 200:
        return r.status_code, r.text
    events = ui.get(f"/gradio_api/call/{endpoint}/{r.json()['event_id']}")
    return events.status_code, events.text


def upload(ui: httpx.Client, data: bytes, name: str = "image.png") -> dict[str, Any]:
    """Upload ``data`` as the browser does; the FileData that names it."""
    r = ui.post("/gradio_api/upload", files={"files": (name, data)})
    r.raise_for_status()
    return {**file_data(r.json()[0]), "orig_name": name}


def served_files(ui: httpx.Client, text: str) -> list[bytes]:
    """The contents of every file that ``text`` links to (``/gradio_api/file=…``) or names
    (a gradio cache path in a message), fetched back from the server."""
    paths = set(re.findall(r"/gradio_api/file=([^\"'\s]+)", text))
    paths |= set(re.findall(r"(/[^\"'\s=]+/[0-9a-f]{40,}/[^\"'\s\\]+)", text))  # in messages
    return [ui.get(f"/gradio_api/file={p}").content for p in sorted(paths)]


def event_error(text: str) -> str | None:
    """The message of the ``event: error`` in a gradio event stream, if any."""
    lines = text.splitlines()
    for kind, data in itertools.pairwise(lines):
        if kind == "event: error" and data.startswith("data: "):
            return str((json.loads(data[6:]) or {}).get("error"))
    return None


@dataclass
class Secrets:
    """Files no client may ever see: a text file holding ``marker`` and a PNG of ``pixels``."""

    text: Path
    png: Path
    marker: bytes
    pixels: np.ndarray

    @classmethod
    def write(cls, folder: Path) -> Secrets:
        marker = b"SECRET-" + np.random.default_rng().bytes(8).hex().encode()
        (folder / "secret.txt").write_bytes(marker + b"\n")
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[:16, :, 0] = 255  # red over blue
        pixels[16:, :, 2] = 255
        Image.fromarray(pixels).save(folder / "secret.png")
        return cls(folder / "secret.txt", folder / "secret.png", marker, pixels)

    def leaked(self, ui: httpx.Client, text: str) -> bool:
        """Whether a server answer ``text``, or a file it links to, holds the marker or shows
        the PNG (resized back to 32×32: the Control tab previews its input)."""
        if self.marker in text.encode():
            return True
        for body in served_files(ui, text):
            if self.marker in body or self._shows_png(body):
                return True
        return False

    def _shows_png(self, body: bytes) -> bool:
        try:
            image = Image.open(io.BytesIO(body)).convert("RGB").resize((32, 32))
        except OSError:
            return False
        return float(np.abs(np.asarray(image, np.float32) - self.pixels).mean()) < 30


# -- load ----------------------------------------------------------------------------------------
class RssSampler:
    """Resident memory of process ``pid`` (None: not measured) before the block, and its peak
    during it (psutil, every 50 ms)."""

    def __init__(self, pid: int | None):
        self.pid, self.before, self.peak, self._stop = pid, 0, 0, threading.Event()

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self.before = self.peak = self._rss()
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())


@dataclass
class Burst:
    """What :func:`bomb_burst` saw."""

    what: str
    codes: list[int]
    wall: float  # seconds until every bomb was answered
    health_max: float  # the slowest /api/health meanwhile, seconds
    health_polls: int
    rss_before: int  # bytes (0: not measured)
    rss_peak: int


def bomb_burst(api: httpx.Client, pid: int | None, count: int = 16, side: int = 12000) -> Burst:
    """POST ``count`` ``side``² PNG bombs to ``/api/generate`` at once while timing
    ``/api/health`` and sampling the RSS of the server process ``pid``."""
    body = json.dumps({"prompt": "x", "steps": 1, "image": b64(png_bomb(side))}).encode()
    latencies: list[float] = []
    done = threading.Event()

    def time_health() -> None:
        while not done.is_set():
            start = time.perf_counter()
            api.get("/api/health").raise_for_status()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)

    def post(_: int) -> int:
        return api.post("/api/generate", content=body, headers=JSON).status_code

    start = time.perf_counter()
    with RssSampler(pid) as rss, concurrent.futures.ThreadPoolExecutor(count + 1) as pool:
        timer = pool.submit(time_health)
        codes = list(pool.map(post, range(count)))
        done.set()
        timer.result()
    what = f"{count}× {side}² PNG ({len(body) >> 10} KB)"
    wall = time.perf_counter() - start
    return Burst(what, codes, wall, max(latencies), len(latencies), rss.before, rss.peak)
