"""What stands between the network and ``destatic serve``: who may call it, from which pages,
with how large a body, and which files a client may name.

* :class:`Guard`, an ASGI middleware in front of the API and the UI alike, refuses before the
  app reads anything: bodies over the limit (413) or of unknown length (411); requests from
  other sites' pages (403: a page elsewhere must not make its visitor's browser run
  generations, unless ``--cors`` names it); API calls without the credentials of
  ``--auth``/``--token`` (401) or not sent as JSON (415); and gradio calls whose file arguments
  are not uploads to this server (403).
* :func:`private_upload_dir` gives gradio an upload folder of this server's own, and
  :func:`mark_launched` switches on gradio's own check of file arguments, which a mounted
  app never runs (``gr.mount_gradio_app`` leaves ``blocks.has_launched`` false, and
  ``gradio.processing_utils._check_allowed`` returns early unless it is true: any
  ``{"path": "/etc/shadow"}`` was copied to the cache and served back).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Access",
    "Guard",
    "exposure_warning",
    "is_loopback",
    "mark_launched",
    "private_upload_dir",
    "remove_at_shutdown",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Access:
    """Who may use the server: ``auth`` (user, password) logs in to the UI and opens the API by
    HTTP basic auth; ``token`` opens the API as ``Authorization: Bearer TOKEN``; ``cors`` lists
    the other sites (origins, e.g. ``https://app.example``) whose pages may call it."""

    auth: tuple[str, str] | None = None
    token: str | None = None
    cors: tuple[str, ...] = ()

    @property
    def open(self) -> bool:
        """Whether the API needs no credentials."""
        return self.auth is None and self.token is None

    def admits(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries this server's token or credentials."""
        if self.open:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token is not None:
            return _same(value, self.token)
        if scheme == "basic" and self.auth is not None:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _same(user, self.auth[0]) & _same(password, self.auth[1])
        return False

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` header of a 401."""
        return 'Basic realm="destatic"' if self.auth is not None else "Bearer"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, access: Access) -> str | None:
    """A one-line warning when ``host`` exposes the server without credentials."""
    if is_loopback(host):
        return None
    if access.open:
        return (
            f"warning: serving on {host} with neither --auth nor --token: anyone who can reach "
            "this address can use the UI and the API"
        )
    if access.auth is None:
        return f"warning: serving on {host}: --token guards the API only; the UI needs --auth"
    return None


def private_upload_dir() -> tuple[str, bool]:
    """Gradio's upload folder (``GRADIO_TEMP_DIR``), made private to this process unless the
    user chose one, so the only files a client can name are the ones uploaded to this server:
    (the folder, whether it was made here). Call it before building any gradio component:
    they read it when created."""
    folder = os.environ.get("GRADIO_TEMP_DIR")
    if folder:
        return os.path.realpath(folder), False
    folder = os.path.realpath(tempfile.mkdtemp(prefix="destatic-uploads-"))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # if no server ever ran
    return folder, True


def remove_at_shutdown(app, folder: str) -> None:
    """Remove ``folder`` (made by :func:`private_upload_dir`) when ``app`` shuts down: uvicorn
    re-raises SIGTERM after its shutdown, so ``atexit`` alone would leave it behind."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            async with inner(app) as state:
                yield state
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if os.environ.get("GRADIO_TEMP_DIR") == folder:
                del os.environ["GRADIO_TEMP_DIR"]  # the next app in this process makes its own

    app.router.lifespan_context = lifespan


def mark_launched(blocks) -> None:
    """Mark a mounted gradio app launched, as ``Blocks.launch`` does: this switches on
    gradio's check that file arguments are uploads (else any server path is copied to the
    cache and served back)."""
    blocks.has_launched = True


def _file_paths(value: Any) -> Iterator[str]:
    """Every ``"path"`` of a gradio FileData in a JSON value (iteratively: any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str):
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _inside(path: str, folder: str) -> bool:
    if "://" in path:
        return False  # a URL: the server would fetch it
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


class Refusal(Exception):
    """A request the guard answers itself: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Guard:
    """ASGI middleware refusing what the module docstring lists, with ``{"error": …}``."""

    def __init__(self, app, access: Access, max_body_bytes: int, upload_dir: str):
        self.app, self.access = app, access
        self.max_body_bytes, self.upload_dir = max_body_bytes, os.path.realpath(upload_dir)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        headers = Headers(scope=scope)
        try:
            self.check_headers(scope, headers)
            if self.names_files(scope, headers):
                body = await _read_body(receive)
                self.check_files(body)
                receive = _replay(body, receive)
        except Refusal as e:
            response = JSONResponse({"error": e.message}, e.status, headers=e.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check_headers(self, scope: Scope, headers) -> None:
        """Body size, origin, and for the API credentials and content type."""
        if "transfer-encoding" in headers and "content-length" not in headers:
            raise Refusal(411, "send the request body with a Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            raise Refusal(413, f"the request body is over {self.max_body_bytes:,} bytes")
        origin = headers.get("origin")
        if origin is not None and not self.same_site(origin, headers.get("host", "")):
            raise Refusal(
                403, f"requests from pages of {origin} are refused (destatic serve --cors ORIGIN)"
            )
        path = scope["path"]
        if path != "/api" and not path.startswith("/api/"):
            return
        if not self.access.admits(headers.get("authorization")):
            raise Refusal(
                401, "this API needs credentials", {"WWW-Authenticate": self.access.challenge()}
            )
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and content_type != "application/json":
            raise Refusal(415, "send the request body as Content-Type: application/json")

    def same_site(self, origin: str, host: str) -> bool:
        """Whether a page of ``origin`` may call: this server's own pages and ``--cors``."""
        return origin in self.access.cors or urlsplit(origin).netloc.lower() == host.lower()

    @staticmethod
    def names_files(scope: Scope, headers) -> bool:
        """Whether the request is a gradio call, whose JSON arguments may name files."""
        content_type = headers.get("content-type", "").lower()
        return (
            scope["method"] == "POST"
            and scope["path"].startswith("/gradio_api/")
            and not content_type.startswith(FORM_TYPES)
        )

    def check_files(self, body: bytes) -> None:
        """Refuse a gradio call naming a file that is not an upload to this server."""
        try:
            value = json.loads(body)
        except RecursionError:
            raise Refusal(400, "the request body is nested too deeply") from None
        except ValueError:
            return  # not JSON: gradio refuses it itself
        for path in _file_paths(value):
            if not _inside(path, self.upload_dir):
                raise Refusal(403, "file arguments must be files uploaded to this server")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first hands out the body already read."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed
