"""``destatic serve``: the web UI (gradio) and the HTTP API on one local server.

    app = create_app()                  # the bundled model; create_app("path/to/model")
    serve(app, host="127.0.0.1", port=7860)

The UI lives at ``/``, the JSON API under ``/api`` (:mod:`destatic.serve.api`), and gradio's
own API under ``/gradio_api``. A video model (``Family.media == "video"``, e.g. the bundled
``emoji_video``) gets a Video tab and MP4 answers (:mod:`destatic.serve.videos`) instead of the
image tabs and PNGs; an audio model (``"audio"``, e.g. the bundled ``notes``) an Audio tab and
WAV answers (:mod:`destatic.serve.audio`). One generation runs at a time (``concurrency``);
further requests wait in a bounded queue and are refused once it is full. ``access``
(:class:`~destatic.serve.security.Access`) adds a login, an API token and other sites allowed
to call; whatever it says, :mod:`destatic.serve.security` guards both (body size, origin, file
arguments).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from destatic.serve.security import Access
from destatic.serve.service import GenerationService, Limits, RequestError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Access",
    "GenerationService",
    "Limits",
    "RequestError",
    "create_app",
    "serve",
]


def create_app(
    model: str | os.PathLike | None = None,
    limits: Limits | None = None,
    *,
    pipeline=None,
    concurrency: int = 1,
    controlnet: str | os.PathLike | None = None,
    access: Access | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """A FastAPI app with the UI at ``/`` and the API at ``/api``; ``controlnet`` (a folder;
    default: the bundled emoji ControlNet when the model is the bundled one) adds control;
    ``device`` and ``dtype`` (names as ``--device``/``--dtype``, e.g. ``"auto"``) move the
    pipelines (None: as loaded)."""
    try:
        import gradio as gr
        from fastapi import FastAPI
    except ImportError as e:
        raise ImportError(
            "destatic serve needs the web extras: pip install 'destatic[serve]' (gradio)"
        ) from e

    from destatic.serve.api import add_api_routes
    from destatic.serve.security import private_upload_dir, remove_at_shutdown
    from destatic.serve.ui import build_ui

    upload_dir, made_here = private_upload_dir()  # before any gradio component exists
    access = access or Access()
    service = _service(model, limits or Limits(), pipeline, controlnet, (device, dtype))
    limits = service.limits
    app = FastAPI(title="destatic")
    add_api_routes(app, service, upload_dir)
    ui = build_ui(service, upload_dir)
    ui.queue(max_size=limits.max_waiting, default_concurrency_limit=concurrency)
    app = gr.mount_gradio_app(
        app,
        ui,
        path="/",
        auth=access.auth,
        show_error=False,  # gradio's own errors name server paths; ours are gr.Error
        max_file_size=limits.max_image_bytes,
    )
    _guard(app, ui, access, limits, upload_dir)
    if made_here:
        remove_at_shutdown(app, upload_dir)
    app.state.service = service
    return app


def _service(model, limits: Limits, pipeline, controlnet, where=(None, None)) -> GenerationService:
    """The service on ``model`` (or ``pipeline``) with its companions: the bundled default
    model gets its inpainting variant for masked requests and its ControlNet
    (:func:`destatic.bundled.companions`); ``controlnet`` names another. A video or audio
    model has none. ``where`` is the (device, dtype) of every pipeline (None: as loaded)."""
    from destatic.bundled import companions
    from destatic.models.registry import load_component
    from destatic.pipelines import load

    found = companions(model)
    if pipeline is None:
        pipeline = load(model)
    media = pipeline.family.media
    if media not in ("image", "video", "audio"):
        raise ValueError(
            f"the server makes images, videos and sounds, and {model} is a {media} model; "
            f"use destatic generate PROMPT --model {model}"
        )
    if media != "image" and controlnet is not None:
        kind = "an audio" if media == "audio" else "a video"
        raise ValueError(f"--controlnet is for image models; {model} is {kind} model")
    controlnet = controlnet or found.get("control")
    inpainter = found.get("inpaint")
    inpainter = None if inpainter is None else load(inpainter)
    for pipe in (pipeline, inpainter):
        if pipe is not None and where != (None, None):
            pipe.to(*where)
    return GenerationService(
        pipeline,
        limits,
        model_name=str(model) if model else "",
        controlnet=None if controlnet is None else load_component(controlnet),
        controlnet_name=str(controlnet or ""),
        inpainter=inpainter,
        inpainter_name=str(found.get("inpaint") or ""),
    )


def _guard(app, ui, access: Access, limits: Limits, upload_dir: str) -> None:
    """Put :mod:`destatic.serve.security` in front of everything, CORS outermost (it answers
    the preflights of ``access.cors``), and answer server bugs with a logged 500."""
    from fastapi.middleware.cors import CORSMiddleware

    from destatic.serve.api import internal_error
    from destatic.serve.security import Guard, mark_launched

    mark_launched(ui)
    app.add_middleware(
        Guard, access=access, max_body_bytes=limits.max_body_bytes, upload_dir=upload_dir
    )
    if access.cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(access.cors),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_exception_handler(Exception, internal_error)


def serve(app, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
