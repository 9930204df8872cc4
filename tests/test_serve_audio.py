"""`destatic serve` on an audio model: the HTTP API answers WAVs of the asked length with the
request in their metadata (so `destatic generate --from` replays them), bad seconds and the
server's --max-seconds are one-line 400s, each endpoint answers its own media, and the Audio
tab plays its sound in headless Chromium."""

from __future__ import annotations

import base64
import io
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

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from destatic.cli import app as cli  # noqa: E402
from destatic.io.audio import read_audio, read_audio_request  # noqa: E402
from destatic.pipelines import save  # noqa: E402
from destatic.serve import Limits, create_app  # noqa: E402
from tests.audio_fixtures import RATE, tiny_audio_pipeline  # noqa: E402
from tests.serve_fixtures import free_port, gradio_call, served_files, ui_client  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the tiny model makes 0.256 s; the server allows 0.2 s
LIMITS = Limits(max_images=2, max_waiting=4, max_seconds=0.2)
SOUND = {"prompt": "a high tone", "steps": 2, "seed": 3, "seconds": 0.1, "seconds_start": 0.05}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio") / "model"
    save(tiny_audio_pipeline(), folder)
    return folder


@pytest.fixture(scope="module")
def server(model):
    """``create_app(model)`` on a free localhost port, in a background thread."""
    import uvicorn

    app = create_app(model, LIMITS)
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


def test_api_answers_a_wav_with_its_request_that_generate_from_replays(server, model, tmp_path):
    health = httpx.get(f"{server}/api/health").json()
    assert (health["media"], health["sample_rate"], health["model"]) == ("audio", RATE, str(model))
    assert health["limits"]["max_seconds"] == 0.2
    r = httpx.post(f"{server}/api/generate.wav", json=SOUND, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav" and r.content[:4] == b"RIFF"
    sound = tmp_path / "sound.wav"
    sound.write_bytes(r.content)
    wave, rate = read_audio(sound)
    assert rate == RATE and wave.shape == (1, 800)  # 0.1 s
    stored = read_audio_request(sound)
    assert (stored["prompt"], stored["seconds"], stored["seconds_start"]) == (
        "a high tone",
        0.1,
        0.05,
    )
    assert (stored["model"], stored["seed"], stored["steps"]) == (str(model), 3, 2)

    again = tmp_path / "again.wav"
    replay = ["generate", "--from", str(sound), "--dtype", "fp32", "-o", str(again)]
    result = CliRunner().invoke(cli, replay)  # the server runs in fp32 (create_app's default)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_audio(again)[0], wave)  # the same sound, sample for sample

    r = httpx.post(f"{server}/api/generate", json={**SOUND, "num_images": 2}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sample_rate"] == RATE and [p["seed"] for p in body["parameters"]] == [3, 4]
    import soundfile as sf

    second, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"][1])), dtype="float32")
    assert rate == RATE and second.shape == (800,)
    second_file = tmp_path / "second.wav"
    second_file.write_bytes(base64.b64decode(body["audio"][1]))
    assert read_audio_request(second_file)["seed"] == 4
    own = Path(os.environ["GRADIO_TEMP_DIR"])  # the API's WAVs are written there, then removed
    assert not list(own.glob("api-*"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seconds": 0.25}, "seconds = 0.25 is out of range: use 0 … 0.2"),
        ({"seconds": -1}, "seconds = -1 is out of range"),
        ({"seconds": 0}, "seconds > 0"),
        ({"seconds": "0.1"}, "seconds must be a finite number"),
        (
            {"seconds": None, "seconds_start": 0},
            "without seconds, this model makes 0.256 s (to its end at 0.256 s); the server's "
            "limit is 0.2 s: ask for seconds ≤ 0.2",
        ),
        ({"seconds_start": 0.2}, "this model makes at most 0.256 s of audio"),
        ({"seconds_start": -0.5}, "seconds_start = -0.5 is out of range"),
        ({"width": 32}, "width is for image and video models; this is an audio model"),
        ({"num_frames": 4}, "num_frames is for image and video models"),
        ({"fps": 8}, "fps is for video models; this model makes sounds"),
        ({"second": 1}, "unknown field(s) ['second']"),
    ],
)
def test_bad_seconds_are_a_one_line_400(server, fields, message):
    for endpoint in ("generate", "generate.wav"):
        body = {**SOUND, **fields}
        r = httpx.post(f"{server}/api/{endpoint}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error and "\n" not in error, error


@pytest.fixture(scope="module")
def image_app():
    import destatic

    return create_app(pipeline=destatic.load(), limits=LIMITS)


def test_each_endpoint_answers_its_own_media(server, image_app):
    for endpoint in ("generate.png", "generate.mp4"):
        r = httpx.post(f"{server}/api/{endpoint}", json={"prompt": "x", "steps": 1})
        assert r.status_code == 400
        assert r.json()["error"] == "this is an audio model: POST /api/generate.wav"
    with TestClient(image_app) as images:
        assert images.get("/api/health").json()["sample_rate"] is None
        r = images.post("/api/generate.wav", json={"prompt": "x", "steps": 1})
        assert r.status_code == 400
        assert r.json()["error"] == "this is an image model: POST /api/generate.png"
        for fields in ({"seconds": 1.0}, {"seconds_start": 0.5}):
            r = images.post("/api/generate", json={"prompt": "x", "steps": 1, **fields})
            assert r.status_code == 400
            assert r.json()["error"] == "seconds needs an audio model; this model draws images"


def test_audio_tab_answers_a_wav_of_the_asked_length(server):
    """The UI's ``audio`` endpoint, as the browser calls it: a WAV under the server's own
    folder, of the asked seconds, holding its request."""
    knobs = ["euler", "default", 2, 3.0, 5, 1]  # sampler, grid, steps, guidance, seed, count
    with ui_client(server) as ui:
        status, text = gradio_call(ui, "audio", ["a low tone", "", 0.15, *knobs])
        assert status == 200 and "event: complete" in text, text
        sounds = [data for data in served_files(ui, text) if data[:4] == b"RIFF"]
    assert len(sounds) == 1
    own = os.path.realpath(os.environ["GRADIO_TEMP_DIR"])  # the server's private folder
    assert list(Path(own).glob("sound-*/sound.wav"))
    shown = re.findall(r'"path": ?"([^"]+\.wav)"', text)
    assert shown and all(os.path.realpath(p).startswith(own + os.sep) for p in shown)
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(sounds[0]), dtype="float32")
    assert rate == RATE and wave.shape == (1200,)  # 0.15 s
    assert "Seconds: 0.15" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_audio_tab_in_headless_chromium(server):
    """Type a prompt, ask for 0.15 s, click Generate: the <audio> loads and lasts 0.15 s."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            page.locator("#audio-prompt textarea").fill("a high tone")
            box = page.locator("#audio-seconds input[type=number]")
            box.fill("0.15")
            box.press("Enter")
            page.locator("#audio-generate").click()
            audio = page.locator("#audio-output audio")
            audio.wait_for(state="attached", timeout=60_000)
            page.wait_for_function(
                "(document.querySelector('#audio-output audio') || {}).readyState >= 1",
                timeout=30_000,
            )
            duration = audio.evaluate("a => a.duration")
            assert duration == pytest.approx(0.15, abs=0.01)
            text = page.locator("#audio-parameters textarea").input_value()
            assert text.startswith("a high tone\nSteps: 25") and text.endswith("Seconds: 0.15")
        finally:
            browser.close()
