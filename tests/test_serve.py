"""`destatic serve`: the request checks, the HTTP API under a burst of bad and concurrent
requests, and the web UI driven end to end in headless Chromium."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

import destatic

gradio = pytest.importorskip("gradio", reason="the web UI needs gradio (pip install gradio)")
httpx = pytest.importorskip("httpx")

from destatic.pipelines import GenerationRequest as Request  # noqa: E402
from destatic.serve import GenerationService, Limits, RequestError, create_app  # noqa: E402
from destatic.serve.service import Busy  # noqa: E402
from tests.serve_fixtures import free_port  # noqa: E402

JSON = {"content-type": "application/json"}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def pipe():
    return destatic.load()


@pytest.fixture(scope="module")
def controlnet_folder(pipe, tmp_path_factory):
    """A ControlNet for the bundled model, nudged off its zero init so control matters."""
    import torch

    from destatic.models.controlnet import ControlNet
    from destatic.models.registry import save_component

    net = ControlNet.from_unet(pipe.network, conditioning_embedding_out_channels=(16,))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("cn") / "cn"
    save_component(net, folder, class_name="ControlNetModel", config=net.config.to_dict())
    return folder


@pytest.fixture(scope="module")
def server(pipe, controlnet_folder):
    """The app on a free localhost port, in a background thread."""
    import uvicorn

    limits = Limits(max_side=64, max_images=4, max_waiting=4)
    app = create_app(pipeline=pipe, limits=limits, controlnet=controlnet_folder)
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


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
        ({"grid": "nope"}, "unknown grid 'nope'"),
        ({"steps": 0}, "steps = 0 is out of range"),
        ({"steps": 101}, "steps = 101 is out of range"),
        ({"num_images": 9}, "num_images = 9 is out of range"),
        ({"width": 1024}, "width = 1024 is out of range"),
        ({"steps": "ten"}, "steps must be an integer"),
        ({"prompt": "x" * 3000}, "limited to 2000 characters"),
        ({"strength": 0.5}, "strength needs an image"),
        ({"sampler": []}, "unknown sampler of type list"),
        ({"grid": {}}, "unknown grid of type dict"),
        ({"prompt": 5}, "prompt must be text"),
        ({"negative_prompt": "a\ud800"}, "negative_prompt is not valid Unicode"),
        ({"control_canny": "yes"}, "control_canny must be true or false"),
        ({"control_scale": None}, "control_scale must be a number"),
        ({"image": "in.png"}, "image must be an image"),
    ],
)
def test_service_checks_requests(pipe, fields, message):
    service = GenerationService(pipe)
    with pytest.raises(RequestError, match=message):
        service.run(Request(**{"prompt": "pizza", **fields}))


def test_service_checks_images_and_masks(pipe):
    service = GenerationService(pipe, Limits(max_side=64))
    image = Image.new("RGB", (32, 32))
    with pytest.raises(RequestError, match="the mask is 16×16 but the image is 32×32"):
        service.check(Request("x", image=image, mask=Image.new("L", (16, 16))))
    with pytest.raises(RequestError, match="limit is 64"):
        service.check(Request("x", image=Image.new("RGB", (128, 128))))
    with pytest.raises(RequestError, match="a mask needs an image"):
        service.check(Request("x", mask=Image.new("L", (32, 32))))
    with pytest.raises(RequestError, match="unknown field"):
        Request.from_dict({"prompt": "x", "colour": "red"})


def test_size_multiple_of_a_latent_model(sd_folder):  # noqa: F811
    service = GenerationService(destatic.load(sd_folder[0]))
    with pytest.raises(RequestError, match="multiple of 2"):
        service.check(Request("x", width=15))
    with pytest.raises(RequestError, match="multiples of 2"):
        service.check(Request("x", image=Image.new("RGB", (15, 16))))


def test_long_prompts_are_truncated_with_a_warning(pipe):
    result = GenerationService(pipe).run(Request(" ".join(["red heart"] * 40), steps=1))
    assert len(result.images) == 1
    assert any("truncated" in w for w in result.warnings)


def test_a_full_queue_is_refused(pipe):
    service = GenerationService(pipe, Limits(max_waiting=0))
    assert service._slots.acquire(blocking=False)  # one request running, none may wait
    with pytest.raises(Busy, match="busy"):
        service.run(Request("x", steps=1))
    service._slots.release()
    assert len(service.run(Request("x", steps=1)).images) == 1


def test_http_api_generates_pngs_with_parameters(server):
    health = httpx.get(f"{server}/api/health").json()
    assert health["status"] == "ok" and health["default_size"] == 32
    assert "euler" in httpx.get(f"{server}/api/samplers").json()["samplers"]
    assert httpx.get(f"{server}/api/samplers").json()["a1111"]["Euler a"] == "euler_ancestral"
    r = httpx.post(
        f"{server}/api/generate",
        json={"prompt": "red heart", "steps": 3, "num_images": 2, "seed": 5},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["parameters"][1]["seed"] == 6
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (32, 32) and "Seed: 5" in image.text["parameters"]
    png = httpx.post(f"{server}/api/generate.png", json={"prompt": "pizza", "steps": 2})
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    labelled = {"prompt": "pizza", "steps": 2, "sampler": "Euler a", "grid": "Normal"}
    r = httpx.post(f"{server}/api/generate", json=labelled, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.json()["parameters"][0]["sampler"], r.json()["parameters"][0]["grid"]) == (
        "euler_ancestral",
        "normal",
    )

    rng = np.random.default_rng(0)
    source = png_b64(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    r = httpx.post(
        f"{server}/api/generate",
        json={"prompt": "sun", "steps": 3, "image": source, "mask": png_b64(mask)},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_http_api_with_control(server):
    rng = np.random.default_rng(1)
    ref = png_b64(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    body = {"prompt": "sun", "steps": 3, "seed": 1}
    plain = httpx.post(f"{server}/api/generate", json=body, timeout=60).json()
    r = httpx.post(
        f"{server}/api/generate",
        json={**body, "control_image": ref, "control_canny": True, "control_end": 0.7},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"][0] != plain["images"][0]
    assert r.json()["parameters"][0]["control_canny"] is True
    small = png_b64(np.zeros((16, 16, 3), np.uint8))
    bad = httpx.post(f"{server}/api/generate", json={**body, "control_image": small})
    assert bad.status_code == 400 and "control image is 16×16" in bad.json()["error"]


def test_server_survives_a_burst_of_bad_and_concurrent_requests(server):
    bad = [
        b"not json",
        b"[1, 2]",
        b'{"prompt": "x", "sampler": "nope"}',
        b'{"prompt": "x", "width": 100000}',
        b'{"prompt": "x", "image": "%%%"}',
        b'{"prompt": "x", "image": "aGVsbG8="}',  # base64 of "hello": not an image
        b'{"prompt": "x", "image": "'
        + png_b64(np.zeros((32, 32, 3), np.uint8)).encode()
        + b'", "mask": "'
        + png_b64(np.zeros((16, 16), np.uint8)).encode()
        + b'"}',
        b'{"steps": 3}',
    ]
    good = b'{"prompt": "cat face", "steps": 4, "num_images": 4}'

    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{server}/api/generate", content=body, headers=JSON, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, bad * 3 + [good] * 8))
    for body, r in zip(bad * 3, answers, strict=False):
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]
    codes = [r.status_code for r in answers[len(bad) * 3 :]]
    assert set(codes) <= {200, 503} and 200 in codes  # the queue holds 4: the rest are told
    final = post(b'{"prompt": "rocket", "steps": 2}')
    assert final.status_code == 200 and len(final.json()["images"]) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_web_ui_in_headless_chromium(server):
    """Type a prompt, click Generate, get PNGs back, in a real browser."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            page.locator("#txt2img-prompt textarea").fill("red heart")
            page.locator("#txt2img-generate").click()
            image = page.locator("#txt2img-gallery img").first
            image.wait_for(timeout=60_000)
            src = image.get_attribute("src")
            data = page.request.get(src if src.startswith("http") else server + src).body()
            assert data[:4] == b"\x89PNG"
            assert Image.open(io.BytesIO(data)).size == (256, 256)  # enlarged for display
            text = page.locator("#txt2img-parameters textarea").input_value()
            assert text.startswith("red heart\nSteps: 8")
        finally:
            browser.close()


def test_mask_painter_strokes_become_the_mask():
    from destatic.serve.ui import _mask_from_editor

    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 32, 64))  # the left half painted
    mask = _mask_from_editor({"background": None, "layers": [layer]}, (32, 32))
    a = np.asarray(mask)
    assert a[:, :16].min() == 255 and a[:, 16:].max() == 0
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert _mask_from_editor({"layers": [empty]}, (32, 32)) is None
    assert _mask_from_editor(None, (32, 32)) is None


def test_cli_serve_reports_a_bad_model(tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "error:" in result.output


from tests.test_pipeline import sd_folder  # noqa: E402, F401
