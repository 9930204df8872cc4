"""`destatic serve` against a hostile client, on one real server process on loopback: no
server file comes back, no request shape answers 500, no decompression bomb stalls the server,
no other site's page can start a generation, and --auth/--token/--cors do what they say.

The server runs with a login, a token and one allowed site; the file and bomb tests go through
them (a logged-in user must not read server files either). The probes are
tests/serve_fixtures.py's, shared with benchmarks/reliability_serve.py."""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install gradio)")
httpx = pytest.importorskip("httpx")

from tests.serve_fixtures import (  # noqa: E402
    EVIL_ORIGIN,
    JSON,
    RssSampler,
    Secrets,
    api_client,
    bomb_burst,
    event_error,
    file_data,
    gradio_call,
    malformed_requests,
    noise_png,
    png_bomb,
    serve_process,
    served_files,
    ui_arguments,
    ui_client,
    upload,
)

GOOD = b'{"prompt": "red heart", "steps": 1}'
TXT2IMG = ["red heart", "", "euler", "default", 1, 3.0, 0, 1, 32]
FRIEND = "https://friend.example"
USER, PASSWORD, TOKEN = "ann", "s3cret", "t0ken-123"
ENDPOINTS = ("control", "img2img", "inpaint")
MALFORMED = malformed_requests()
MB = 2**20


@pytest.fixture(scope="module")
def live():
    """`destatic serve` on loopback with a login, an API token and one other site allowed."""
    args = ("--auth", f"{USER}:{PASSWORD}", "--token", TOKEN, "--cors", FRIEND)
    with serve_process("--max-side", "64", *args) as server:
        yield server


@pytest.fixture(scope="module")
def api(live):
    """The API, with the token."""
    with api_client(live.url, TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def ui(live):
    """The UI's endpoints, logged in."""
    with ui_client(live.url, (USER, PASSWORD)) as client:
        yield client


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Secrets:
    return Secrets.write(tmp_path_factory.mktemp("secrets"))


# -- 1. files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", ["text", "png"])
def test_ui_endpoints_refuse_server_files(ui, secrets, endpoint, kind):
    path = str(getattr(secrets, kind))
    status, text = gradio_call(ui, endpoint, ui_arguments(endpoint, file_data(path)))
    assert not secrets.leaked(ui, text), text
    assert status == 403 and "uploaded to this server" in json.loads(text)["error"]


@pytest.mark.parametrize("path", ["http://example.com/a.png", "../../../etc/passwd", "/etc/passwd"])
def test_ui_endpoints_refuse_urls_and_other_paths(ui, path):
    status, text = gradio_call(ui, "img2img", ui_arguments("img2img", file_data(path)))
    assert status == 403, text


def test_file_route_serves_no_server_file(ui, secrets):
    r = ui.get(f"/gradio_api/file={secrets.text}")
    assert r.status_code == 403 and secrets.marker not in r.content


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_ui_endpoints_take_fresh_uploads(ui, endpoint):
    image = upload(ui, noise_png(40))  # any size: the UI resizes it
    status, text = gradio_call(ui, endpoint, ui_arguments(endpoint, image))
    assert status == 200 and "event: complete" in text, text
    assert all(body[:4] in (b"\x89PNG", b"RIFF") for body in served_files(ui, text))


# -- 2. decompression bombs and big bodies --------------------------------------------------------
def test_bombs_do_not_stall_the_api(live, api):
    burst = bomb_burst(api, live.process.pid)
    assert burst.codes == [400] * 16
    assert burst.health_max < 2.0, burst  # was 13–25 s
    assert burst.rss_peak - burst.rss_before < 200 * MB, burst


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_ui_refuses_a_bomb_before_decoding_it(live, ui, endpoint):
    image = upload(ui, png_bomb(12000))
    with RssSampler(live.process.pid) as rss:
        _, text = gradio_call(ui, endpoint, ui_arguments(endpoint, image))
    assert "12000×12000; the limit is 4096" in (event_error(text) or ""), text
    assert rss.peak - rss.before < 200 * MB


def test_bodies_are_limited(api, ui):
    huge = api.post("/api/generate", content=b" " * (17 * MB), headers=JSON)
    assert huge.status_code == 413 and "over" in huge.json()["error"]
    chunked = api.post("/api/generate", content=iter([GOOD]), headers=JSON)
    assert chunked.status_code == 411
    big_upload = ui.post("/gradio_api/upload", files={"files": ("a.png", bytes(17 * MB))})
    assert big_upload.status_code == 413


# -- 3. malformed requests -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(MALFORMED))
def test_malformed_requests_answer_400(api, shape):
    r = api.post("/api/generate", content=MALFORMED[shape], headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error


def test_gradio_calls_refuse_deep_json(ui):
    body = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert ui.post("/gradio_api/call/txt2img", content=body, headers=JSON).status_code == 400


# -- 4. other sites' pages -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"origin": EVIL_ORIGIN, "content-type": "text/plain"}, 403),  # a form or no-cors fetch
        ({"origin": EVIL_ORIGIN, **JSON}, 403),
        ({"origin": "null", **JSON}, 403),  # a sandboxed frame, a file:// page
        ({"content-type": "text/plain"}, 415),
        ({"origin": "{url}", **JSON}, 200),  # the UI's own page
    ],
)
def test_only_the_servers_own_pages_may_post(live, api, headers, status):
    headers = {k: v.format(url=live.url) for k, v in headers.items()}
    r = api.post("/api/generate", content=GOOD, headers=headers)
    assert r.status_code == status, r.text


def test_other_sites_cannot_call_the_ui(ui):
    status, _ = gradio_call(ui, "txt2img", TXT2IMG, headers={"origin": EVIL_ORIGIN})
    assert status == 403


def test_cors_allows_the_named_site(api):
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    ok = api.options("/api/generate", headers={"origin": FRIEND, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == FRIEND
    bad = api.options("/api/generate", headers={"origin": EVIL_ORIGIN, **preflight})
    assert bad.status_code >= 400 and "access-control-allow-origin" not in bad.headers
    r = api.post("/api/generate", content=GOOD, headers={"origin": FRIEND, **JSON})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == FRIEND


# -- 5. credentials ------------------------------------------------------------------------------
def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        (basic(USER, "wrong"), 401),
        ("Basic %%%", 401),
        (f"Bearer {TOKEN}", 200),
        (basic(USER, PASSWORD), 200),
    ],
)
def test_api_needs_the_token_or_the_login(live, authorization, status):
    headers = {**JSON, **({"authorization": authorization} if authorization else {})}
    r = httpx.post(f"{live.url}/api/generate", content=GOOD, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert httpx.get(f"{live.url}/api/health", headers=headers).status_code == status
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Basic")


def test_ui_needs_the_login(live):
    with ui_client(live.url) as stranger:
        assert gradio_call(stranger, "txt2img", TXT2IMG)[0] == 401
        assert stranger.post("/gradio_api/upload", files={"files": ("a.png", b"x")}).is_error
    with ui_client(live.url, (USER, PASSWORD)) as user:
        status, text = gradio_call(user, "txt2img", TXT2IMG)
        assert status == 200 and "event: complete" in text


@pytest.fixture
def cli_serve(monkeypatch):
    """``destatic serve ARGS`` through the CLI, building and running no server: (output,
    the keyword arguments create_app got)."""
    from typer.testing import CliRunner

    import destatic.serve
    from destatic.cli import app

    seen = {}
    monkeypatch.setattr(destatic.serve, "create_app", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(destatic.serve, "serve", lambda *a, **k: None)

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, dict]:
        result = CliRunner().invoke(
            app, ["serve", *args], env={"DESTATIC_TOKEN": "", **(env or {})}
        )
        return result.exit_code, result.output, seen

    return run


@pytest.mark.parametrize(
    ("args", "warns"),
    [
        ([], None),
        (["--host", "::1"], None),
        (["--host", "0.0.0.0"], "with neither --auth nor --token"),
        (["--host", "0.0.0.0", "--token", "t"], "the UI needs --auth"),
        (["--host", "0.0.0.0", "--auth", "a:b"], None),
    ],
)
def test_cli_warns_when_exposed_without_credentials(cli_serve, args, warns):
    code, output, _ = cli_serve(*args)
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning")]
    assert len(warnings) == (warns is not None)
    assert warns is None or warns in warnings[0]


def test_cli_takes_credentials(cli_serve):
    _, _, seen = cli_serve("--auth", "ann:a:b", "--cors", FRIEND, env={"DESTATIC_TOKEN": "env"})
    access = seen["access"]
    assert access.auth == ("ann", "a:b") and access.token == "env" and access.cors == (FRIEND,)
    code, output, _ = cli_serve("--auth", "no-colon")
    assert code == 2 and "USER:PASSWORD" in output
