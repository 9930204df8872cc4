"""Security probe of a live ``destatic serve``: what a hostile client gets back.

* **file read**: the UI's image endpoints called with a gradio FileData naming a server file
  (a secret text file and a secret PNG written for the probe), a URL, and ``/gradio_api/file=``
  asked for the file directly; "leaked" when the secret's bytes (or its pixels, shown back as
  the Control tab's preview) come back in an answer or in a file it links to;
* **malformed**: the ten request shapes that used to answer 500 (must be 400);
* **bombs**: 16 concurrent 0.4 MB PNGs declaring 12000×12000, while ``/api/health`` is timed
  and the server's RSS sampled;
* **cross-origin / size**: a cross-site ``text/plain`` POST, a cross-site JSON POST, a gradio
  call from another origin, the same POST from the server's own origin, an oversized and a
  chunked body.

    python benchmarks/reliability_serve.py                      # starts its own server
    python benchmarks/reliability_serve.py --url http://127.0.0.1:7860 --pid 1234 \\
        [--token TOKEN] [--auth USER:PASSWORD]                  # a running one

Exits 1 when any answer differs from the expected one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.serve_fixtures import (
    EVIL_ORIGIN,
    JSON,
    Secrets,
    api_client,
    bomb_burst,
    file_data,
    gradio_call,
    malformed_requests,
    serve_process,
    ui_arguments,
    ui_client,
)

MB = 2**20
GOOD = b'{"prompt": "red heart", "steps": 1}'
TXT2IMG = ["red heart", "", "euler", "default", 1, 3.0, 0, 1, 32]


@dataclass
class Row:
    probe: str
    request: str
    status: int | str
    expected: str  # e.g. "400" or "4xx", compared with the status unless ``passed`` is given
    note: str = ""
    passed: bool | None = None

    @property
    def ok(self) -> bool:
        if self.passed is not None:
            return self.passed
        code = str(self.status)
        return code == self.expected or (self.expected == "4xx" and code.startswith("4"))


def file_read_rows(ui: httpx.Client, folder: Path) -> list[Row]:
    secrets = Secrets.write(folder)
    rows = []
    for endpoint in ("control", "img2img", "inpaint"):
        for path in (secrets.text, secrets.png):
            status, answer = gradio_call(ui, endpoint, ui_arguments(endpoint, file_data(str(path))))
            leaked = secrets.leaked(ui, answer)
            note = "secret came back" if leaked else "nothing came back"
            request = f"{endpoint}(path={path.name})"
            rows.append(Row("file read", request, "LEAKED" if leaked else status, "4xx", note))
    url_arg = ui_arguments("img2img", file_data("http://example.com/a.png"))
    status = gradio_call(ui, "img2img", url_arg)[0]
    rows.append(Row("file read", "img2img(path=http URL)", status, "4xx"))
    direct = ui.get(f"/gradio_api/file={secrets.text}")
    leaked = secrets.marker in direct.content
    request = "GET /gradio_api/file=secret.txt"
    rows.append(Row("file read", request, "LEAKED" if leaked else direct.status_code, "4xx"))
    return rows


def malformed_rows(api: httpx.Client) -> list[Row]:
    rows = []
    for name, body in malformed_requests().items():
        try:
            r = api.post("/api/generate", content=body, headers=JSON)
        except httpx.TransportError as e:  # the server dropped the connection
            rows.append(Row("malformed", name, type(e).__name__, "400"))
            continue
        json_answer = r.headers.get("content-type") == "application/json"
        error = r.json().get("error", "") if json_answer else r.text
        rows.append(Row("malformed", name, r.status_code, "400", str(error)[:60]))
    return rows


def bomb_rows(api: httpx.Client, pid: int | None) -> list[Row]:
    burst = bomb_burst(api, pid)
    worst = max(burst.codes, key=lambda c: (c != 400, c))
    rss = "RSS n/a (no --pid)"
    if pid is not None:
        rss = f"RSS {burst.rss_before / MB:.0f} MB before, peak {burst.rss_peak / MB:.0f} MB"
    health = f"{burst.health_max:.2f} s"
    polls = f"{burst.health_polls} polls, {rss}"
    return [
        Row("bombs", burst.what, worst, "400", f"all answered in {burst.wall:.1f} s"),
        Row("bombs", "GET /api/health meanwhile", health, "< 1 s", polls, burst.health_max < 1),
    ]


def origin_rows(api: httpx.Client, ui: httpx.Client) -> list[Row]:
    own = str(api.base_url).rstrip("/")
    cases = [
        ("cross-site text/plain POST", {"origin": EVIL_ORIGIN, "content-type": "text/plain"}),
        ("cross-site JSON POST", {"origin": EVIL_ORIGIN, **JSON}),
        ("text/plain POST, no Origin", {"content-type": "text/plain"}),
        ("same-origin JSON POST", {"origin": own, **JSON}),
    ]
    rows = []
    for name, headers in cases:
        status = api.post("/api/generate", content=GOOD, headers=headers).status_code
        rows.append(Row("origin", name, status, "200" if "same" in name else "4xx"))
    status = gradio_call(ui, "txt2img", TXT2IMG, headers={"origin": EVIL_ORIGIN})[0]
    rows.append(Row("origin", "cross-site gradio call", status, "4xx"))
    huge = api.post("/api/generate", content=b" " * (64 * MB), headers=JSON)
    rows.append(Row("size", "64 MB body", huge.status_code, "413"))
    chunked = api.post("/api/generate", content=iter([GOOD]), headers=JSON)
    rows.append(Row("size", "chunked body (no length)", chunked.status_code, "411"))
    return rows


def table(rows: list[Row]) -> str:
    head = ("probe", "request", "status", "expected", "", "note")
    lines = [
        (r.probe, r.request, str(r.status), r.expected, "ok" if r.ok else "FAIL", r.note)
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join(fmt.format(*x).rstrip() for x in [head, *lines])


def probe(url: str, pid: int | None, token: str | None, auth: tuple[str, str] | None) -> list[Row]:
    """Every probe against the server at ``url``, with its credentials if it needs them."""
    with api_client(url, token) as api, ui_client(url, auth) as ui:
        with tempfile.TemporaryDirectory() as folder:
            rows = file_read_rows(ui, Path(folder))
        return rows + malformed_rows(api) + bomb_rows(api, pid) + origin_rows(api, ui)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start `destatic serve`)")
    parser.add_argument("--pid", type=int, help="its process id, for the RSS column")
    parser.add_argument("--token", help="its --token")
    parser.add_argument("--auth", help="its --auth USER:PASSWORD")
    args = parser.parse_args()
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.url:
        rows = probe(args.url.rstrip("/"), args.pid, args.token, auth)
    else:
        with serve_process("--max-side", "64") as server:
            rows = probe(server.url, server.process.pid, None, None)
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
