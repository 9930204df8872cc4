"""`destatic serve --model emoji_video`: the HTTP API answers H.264 MP4s of the asked frames
and frame rate, with the request in their metadata (so `destatic generate --from` replays
them), bad frames and fps are one-line 400s, image models keep their PNGs, and the Video tab
plays its clip in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

gradio = pytest.importorskip("gradio", reason="the web UI needs gradio (pip install gradio)")
httpx = pytest.importorskip("httpx")
av = pytest.importorskip("av", reason="MP4 needs PyAV (pip install av)")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from destatic.cli import app as cli  # noqa: E402
from destatic.io.video import read_video, read_video_comment  # noqa: E402
from destatic.serve import Limits, create_app  # noqa: E402
from tests.serve_fixtures import (  # noqa: E402
    file_data,
    free_port,
    gradio_call,
    image_bytes,
    served_files,
    ui_client,
    upload,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LIMITS = Limits(max_side=64, max_images=2, max_waiting=4, max_frames=16)
CLIP = {"prompt": "rocket moves up", "steps": 4, "seed": 3, "num_frames": 6, "fps": 12}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def server():
    """``create_app("emoji_video")`` on a free localhost port, in a background thread."""
    import uvicorn

    app = create_app("emoji_video", LIMITS)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def seconds(path: Path) -> float:
    """The length of the video stream of an MP4, from its container."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def test_api_answers_an_mp4_with_its_request_that_generate_from_replays(server, tmp_path):
    health = httpx.get(f"{server}/api/health").json()
    assert (health["media"], health["num_frames"], health["model"]) == ("video", 8, "emoji_video")
    r = httpx.post(f"{server}/api/generate.mp4", json=CLIP, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(r.content)
    frames = read_video(clip)
    assert frames.shape == (6, 128, 128, 3)  # 32² enlarged ×4 for players
    assert seconds(clip) == pytest.approx(6 / 12)
    stored = json.loads(read_video_comment(clip))
    assert (stored["prompt"], stored["num_frames"], stored["seed"]) == ("rocket moves up", 6, 3)
    assert (stored["model"], stored["steps"], stored["sampler"]) == ("emoji_video", 4, "dpmpp_2m")

    again = tmp_path / "again.mp4"
    replay = ["generate", "--from", str(clip), "-o", str(again), "--fps", "12", "--dtype", "fp32"]
    result = CliRunner().invoke(cli, replay)
    assert result.exit_code == 0, result.output
    assert json.loads(read_video_comment(again)) == stored
    np.testing.assert_array_equal(read_video(again), frames)  # the same clip, bit for bit
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # and it moves

    r = httpx.post(f"{server}/api/generate", json={**CLIP, "num_images": 2}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fps"] == 12 and [p["seed"] for p in body["parameters"]] == [3, 4]
    second = tmp_path / "second.mp4"
    second.write_bytes(base64.b64decode(body["videos"][1]))
    assert read_video(second).shape == (6, 128, 128, 3)
    assert json.loads(read_video_comment(second))["seed"] == 4
    own = Path(os.environ["GRADIO_TEMP_DIR"])  # the API's MP4s are encoded there, then removed
    assert not list(own.glob("api-*"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_frames": 0}, "num_frames = 0 is out of range: use 1 … 16"),
        ({"num_frames": 17}, "num_frames = 17 is out of range: use 1 … 16"),
        ({"num_frames": -2}, "num_frames = -2 is out of range"),
        ({"num_frames": "8"}, "num_frames must be an integer"),
        ({"num_frames": 8.0}, "num_frames must be an integer"),
        ({"fps": 0}, "fps = 0 is out of range: use 1 … 120"),
        ({"fps": 121}, "fps = 121 is out of range"),
        ({"fps": 2.5}, "fps must be an integer"),
        ({"frames": 8}, "unknown field(s) ['frames']"),
    ],
)
def test_bad_frames_and_fps_are_a_one_line_400(server, fields, message):
    for endpoint in ("generate", "generate.mp4"):
        body = {"prompt": "pizza falls", "steps": 2, **fields}
        r = httpx.post(f"{server}/api/{endpoint}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error and "\n" not in error


def test_each_endpoint_answers_its_own_media(server, pipe_app):
    r = httpx.post(f"{server}/api/generate.png", json={"prompt": "x", "steps": 1})
    assert r.status_code == 400
    assert r.json()["error"] == "this is a video model: POST /api/generate.mp4"
    with TestClient(pipe_app) as images:  # the bundled image model: PNGs exactly as before
        assert images.get("/api/health").json()["media"] == "image"
        png = images.post("/api/generate.png", json={"prompt": "pizza", "steps": 2})
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
        r = images.post("/api/generate.mp4", json={"prompt": "x", "steps": 1})
        assert r.status_code == 400
        assert r.json()["error"] == "this is an image model: POST /api/generate.png"
        for fields, message in (
            ({"num_frames": 8}, "num_frames needs a video model"),
            ({"fps": 8}, "fps is for video models"),
        ):
            r = images.post("/api/generate", json={"prompt": "x", "steps": 1, **fields})
            assert r.status_code == 400 and message in r.json()["error"]


@pytest.fixture(scope="module")
def pipe_app():
    import destatic

    return create_app(pipeline=destatic.load(), limits=LIMITS)


def test_video_tab_draws_image_to_video_from_an_upload(server, tmp_path):
    """The UI's ``video`` endpoint, as the browser calls it, with a first frame uploaded:
    the clip holds that frame and plays at the asked rate."""
    red = np.full((32, 32, 3), 255, np.uint8)
    red[8:24, 8:24] = (220, 30, 30)
    knobs = ["euler", "default", 4, 3.0, 1, 1, 32]
    with ui_client(server) as ui:
        outside = file_data(str(Path(__file__)))  # a file the UI must not read
        status, text = gradio_call(ui, "video", ["x", "", outside, 4, 8, *knobs])
        assert status == 403, text
        first = upload(ui, image_bytes(Image.fromarray(red)))
        status, text = gradio_call(ui, "video", ["red square moves up", "", first, 4, 8, *knobs])
        assert status == 200 and "event: complete" in text, text
        videos = [data for data in served_files(ui, text) if data[4:8] == b"ftyp"]
    assert len(videos) == 1
    own = os.path.realpath(os.environ["GRADIO_TEMP_DIR"])  # the server's private folder
    assert list(Path(own).glob("clip-*/clip.mp4"))  # written there, then cached there
    shown = re.findall(r'"path": ?"([^"]+\.mp4)"', text)
    assert shown and all(os.path.realpath(p).startswith(own + os.sep) for p in shown)
    clip = tmp_path / "ui.mp4"
    clip.write_bytes(videos[0])
    frames = read_video(clip)
    assert frames.shape == (4, 128, 128, 3) and seconds(clip) == pytest.approx(4 / 8)
    held = np.asarray(Image.fromarray(red).resize((128, 128), Image.NEAREST), int)
    assert np.abs(frames[0].astype(int) - held).mean() < 4  # frame 0 is the upload


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_video_tab_in_headless_chromium(server):
    """Type a prompt, set 6 frames at 12 fps, click Generate: the <video> loads and lasts
    6/12 s."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            page.locator("#video-prompt textarea").fill("rocket moves up")
            for name, value in (("frames", "6"), ("fps", "12")):
                box = page.locator(f"#video-{name} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.locator("#video-generate").click()
            video = page.locator("#video-output video")
            video.wait_for(timeout=60_000)
            page.wait_for_function(
                "document.querySelector('#video-output video').readyState >= 1", timeout=30_000
            )
            duration = video.evaluate("v => v.duration")
            assert duration == pytest.approx(6 / 12, abs=1 / 12)
            text = page.locator("#video-parameters textarea").input_value()
            assert text.startswith("rocket moves up\nSteps: 20") and "Frames: 6, FPS: 12" in text
        finally:
            browser.close()
