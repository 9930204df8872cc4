"""The HTTP API: JSON in, PNGs (base64, with their parameters in the PNG text chunks) out; for
a video model, H.264 MP4s with their parameters in the file's ``comment`` metadata; for an
audio model, WAVs with their parameters in the file's metadata (:mod:`destatic.serve.audio`).

    GET  /api/health      {"status": "ok", "model": …, "media": "image" | "video" | "audio",
                           "default_size": …, "num_frames": …, "sample_rate": …, "limits": {…}}
    GET  /api/samplers    {"samplers": […], "grids": […], "a1111": {label: sampler, …}}
    POST /api/generate    {"prompt": …, "steps": …, …, "image": base64 PNG?, "mask": …?}
                          → {"images": [base64 PNG…], "parameters": [{…}…], "warnings": […]}
                          a video model: {…, "num_frames": F?, "fps": 8?}
                          → {"videos": [base64 MP4…], "fps": …, "parameters": …, "warnings": …}
    POST /api/generate.png  the same request → the first image as image/png
                          an audio model: {…, "seconds": S?, "seconds_start": 0?}
                          → {"audio": [base64 WAV…], "sample_rate": …, "parameters": …, …}
    POST /api/generate.mp4  a video model: the same request → the first clip as video/mp4
    POST /api/generate.wav  an audio model: the same request → the first sound as audio/wav

A token model (autoregressive or MaskGIT, :mod:`destatic.pipelines.tokens`) takes
``temperature``, ``top_k``, ``top_p`` and ``beams`` beside the prompt, seed and guidance (its
``/api/health`` defaults list them); other models refuse them.

Bad requests answer 400 with {"error": "…"}; a full waiting line answers 503; the guards of
:mod:`destatic.serve.security` answer 401, 403, 411, 413 and 415 before a request gets here.
Bodies are parsed and images decoded off the event loop, images only once their header shows
they are within the limits (:mod:`destatic.serve.images`). (FastAPI comes with gradio, the
``serve`` extra.)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import tempfile
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from destatic.pipelines import GenerationRequest
from destatic.serve.audio import wav_bytes
from destatic.serve.images import load_image
from destatic.serve.service import (
    Busy,
    Generated,
    GenerationService,
    Limits,
    RequestError,
    request_from_json,
)
from destatic.serve.videos import mp4_bytes

__all__ = ["add_api_routes", "internal_error", "parse_request", "png_bytes"]

IMAGE_MODES = {"image": "RGB", "mask": "L", "control_image": "RGB"}
# the endpoint answering each kind of model (Family.media) with one file, and its name
ENDPOINTS = {
    "image": "/api/generate.png",
    "video": "/api/generate.mp4",
    "audio": "/api/generate.wav",
}
KINDS = {"image": "an image", "video": "a video", "audio": "an audio"}


def png_bytes(image, request: GenerationRequest) -> bytes:
    """``image`` as PNG bytes with ``request`` (the one that draws it) in its text chunks."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=request.png_info())
    return buffer.getvalue()


def _decode_image(name: str, text: Any, limits: Limits, mode: str):
    """A base64 (or data URL) image field, decoded once its size is known to be allowed."""
    if not isinstance(text, str):
        raise RequestError(f"{name} must be a base64-encoded PNG, JPEG or WebP image")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # a data URL
    if len(text) // 4 * 3 > limits.max_image_bytes:
        raise RequestError(f"{name} is over {limits.max_image_bytes:,} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} is not valid base64") from None
    return load_image(data, name, limits.max_side, limits.max_image_bytes, mode)


def parse_request(body: bytes, limits: Limits) -> tuple[GenerationRequest, Any]:
    """A JSON request body as a :class:`GenerationRequest`, its images decoded, and its ``fps``
    (how a clip plays, not part of the request; None if not given, checked by
    :meth:`GenerationService.check_fps`); blocking work (JSON, base64, pixels), so run it off
    the event loop."""
    try:
        fields = json.loads(body)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise RequestError("the request body must be a JSON object")
    for name, mode in IMAGE_MODES.items():
        if fields.get(name) is not None:
            fields[name] = _decode_image(name, fields[name], limits, mode)
    fps = fields.pop("fps", None)
    return request_from_json(fields), fps


def _encode(result: Generated, fps: int, folder: str) -> dict:
    """The JSON answer: base64 PNGs, for a video model base64 MP4s played at ``fps``, for an
    audio model base64 WAVs."""
    pairs = list(zip(result.images, result.requests, strict=True))
    params = [r.to_dict() for r in result.requests]
    if result.sounds:
        rate = result.sample_rate
        sounds = [base64.b64encode(wav_bytes(w, rate, r, folder)).decode("ascii") for w, r in pairs]
        return {
            "audio": sounds,
            "sample_rate": rate,
            "parameters": params,
            "warnings": result.warnings,
        }
    if result.clips:
        videos = [base64.b64encode(mp4_bytes(c, r, fps, folder)).decode("ascii") for c, r in pairs]
        return {"videos": videos, "fps": fps, "parameters": params, "warnings": result.warnings}
    images = [base64.b64encode(png_bytes(im, r)).decode("ascii") for im, r in pairs]
    return {"images": images, "parameters": params, "warnings": result.warnings}


async def internal_error(http: HttpRequest, error: Exception) -> JSONResponse:
    """The answer to a server bug (an exception nothing else handled): a one-line 500.
    Starlette re-raises the exception after it, so the server (uvicorn) logs the traceback."""
    return JSONResponse({"error": "internal server error (logged on the server)"}, 500)


def _wrong_media(service: GenerationService, media: str) -> JSONResponse | None:
    """A 400 naming the right endpoint when the endpoint for ``media`` ("image", "video",
    "audio") is called on a model that makes another."""
    if service.media == media:
        return None
    kind, right = KINDS[service.media], ENDPOINTS[service.media]
    return JSONResponse({"error": f"this is {kind} model: POST {right}"}, status_code=400)


def add_api_routes(app, service: GenerationService, folder: str | None = None) -> None:
    """Register the routes above on a FastAPI ``app``; MP4s are encoded in temporary files
    under ``folder`` (the server's own; default: the system's temporary folder)."""
    from destatic.sampling import GRIDS, SAMPLERS

    folder = folder or tempfile.gettempdir()

    @app.get("/api/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": service.model_name or "destatic default",
            "media": service.media,
            "num_frames": service.default_frames,
            "sample_rate": service.sample_rate,
            "default_size": service.pipeline.default_size,
            "size_multiple": service.pipeline.size_multiple,
            "defaults": service.defaults,
            "limits": dataclasses.asdict(service.limits),
        }

    @app.get("/api/samplers")
    def samplers() -> dict:
        from destatic.sampling.aliases import SAMPLER_LABELS

        labels = {k: v for k, v in SAMPLER_LABELS.items() if v in SAMPLERS}
        return {"samplers": sorted(SAMPLERS), "grids": list(GRIDS), "a1111": labels}

    async def run_request(http: HttpRequest) -> tuple[Generated, int] | JSONResponse:
        """(what the request draws, the fps its clips play at), or the error's answer."""
        try:
            request, fps = await run_in_threadpool(parse_request, await http.body(), service.limits)
            service.check(request)  # fail fast, before queueing
            fps = service.check_fps(fps)
            return await run_in_threadpool(service.run, request), fps
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Busy as e:
            return JSONResponse({"error": str(e)}, status_code=503)

    @app.post("/api/generate")
    async def generate(http: HttpRequest):
        answer = await run_request(http)
        if isinstance(answer, JSONResponse):
            return answer
        return JSONResponse(await run_in_threadpool(_encode, *answer, folder))

    @app.post("/api/generate.png")
    async def generate_png(http: HttpRequest):
        answer = _wrong_media(service, "image") or await run_request(http)
        if isinstance(answer, JSONResponse):
            return answer
        result = answer[0]
        png = await run_in_threadpool(png_bytes, result.images[0], result.requests[0])
        return Response(png, media_type="image/png")

    @app.post("/api/generate.mp4")
    async def generate_mp4(http: HttpRequest):
        answer = _wrong_media(service, "video") or await run_request(http)
        if isinstance(answer, JSONResponse):
            return answer
        result, fps = answer
        clip, request = result.images[0], result.requests[0]
        return Response(
            await run_in_threadpool(mp4_bytes, clip, request, fps, folder), media_type="video/mp4"
        )

    @app.post("/api/generate.wav")
    async def generate_wav(http: HttpRequest):
        answer = _wrong_media(service, "audio") or await run_request(http)
        if isinstance(answer, JSONResponse):
            return answer
        result = answer[0]
        wav = await run_in_threadpool(
            wav_bytes, result.images[0], result.sample_rate, result.requests[0], folder
        )
        return Response(wav, media_type="audio/wav")
