"""The HTTP API: JSON in, PNGs (base64, with their parameters in the PNG text chunks) out.

    GET  /api/health      {"status": "ok", "model": …, "default_size": …, "limits": {…}}
    GET  /api/samplers    {"samplers": […], "grids": […]}
    POST /api/generate    {"prompt": …, "steps": …, …, "image": base64 PNG?, "mask": …?}
                          → {"images": [base64 PNG…], "parameters": [{…}…], "warnings": […]}
    POST /api/generate.png  the same request → the first image as image/png

Bad requests answer 400 with {"error": "…"}; a full waiting line answers 503. (FastAPI comes
with gradio, the ``serve`` extra.)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from destatic.pipelines.metadata import png_info
from destatic.serve.service import Busy, GenerationService, Request, RequestError

__all__ = ["add_api_routes", "png_bytes"]


def png_bytes(image, params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params))
    return buffer.getvalue()


def _decode_image(name: str, text: Any):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str):
        raise RequestError(f"{name} must be a base64-encoded PNG or JPEG")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # a data URL
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} is not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"{name} is not a readable image") from None
    return image


def parse_request(body: Any) -> Request:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    body = dict(body)
    for name in ("image", "mask", "control_image"):
        if body.get(name) is not None:
            body[name] = _decode_image(name, body[name])
    try:
        return Request.from_dict(body)
    except TypeError as e:
        raise RequestError(str(e)) from None


def add_api_routes(app, service: GenerationService) -> None:
    """Register the routes above on a FastAPI ``app``."""
    from destatic.sampling import GRIDS, SAMPLERS

    async def body_of(http: HttpRequest) -> Any:
        try:
            return await http.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None

    @app.get("/api/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": service.model_name or "destatic default",
            "default_size": service.pipeline.default_size,
            "size_multiple": service.pipeline.size_multiple,
            "limits": dataclasses.asdict(service.limits),
        }

    @app.get("/api/samplers")
    def samplers() -> dict:
        return {"samplers": sorted(SAMPLERS), "grids": list(GRIDS)}

    async def run_request(http: HttpRequest):
        try:
            request = parse_request(await body_of(http))
            service.check(request)  # fail fast, before queueing
        except RequestError as e:
            return None, JSONResponse({"error": str(e)}, status_code=400)
        try:
            return await run_in_threadpool(service.run, request), None
        except RequestError as e:
            return None, JSONResponse({"error": str(e)}, status_code=400)
        except Busy as e:
            return None, JSONResponse({"error": str(e)}, status_code=503)

    @app.post("/api/generate")
    async def generate(http: HttpRequest):
        result, error = await run_request(http)
        if error is not None:
            return error
        images = [
            base64.b64encode(png_bytes(im, p)).decode("ascii")
            for im, p in zip(result.images, result.params, strict=True)
        ]
        params = [dataclasses.asdict(p) for p in result.params]
        return {"images": images, "parameters": params, "warnings": result.warnings}

    @app.post("/api/generate.png")
    async def generate_png(http: HttpRequest):
        result, error = await run_request(http)
        if error is not None:
            return error
        return Response(png_bytes(result.images[0], result.params[0]), media_type="image/png")
