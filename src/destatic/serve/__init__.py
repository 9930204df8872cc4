"""``destatic serve``: the web UI (gradio) and the HTTP API on one local server.

    app = create_app()                  # the bundled model; create_app("path/to/model")
    serve(app, host="127.0.0.1", port=7860)

The UI lives at ``/``, the JSON API under ``/api`` (:mod:`destatic.serve.api`), and gradio's
own API under ``/gradio_api``. One generation runs at a time (``concurrency``); further
requests wait in a bounded queue and are refused once it is full.
"""

from __future__ import annotations

import os

from destatic.serve.service import GenerationService, Limits, Request, RequestError

__all__ = ["GenerationService", "Limits", "Request", "RequestError", "create_app", "serve"]


def create_app(
    model: str | os.PathLike | None = None,
    limits: Limits | None = None,
    *,
    pipeline=None,
    concurrency: int = 1,
    controlnet: str | os.PathLike | None = None,
):
    """A FastAPI app with the UI at ``/`` and the API at ``/api``; ``controlnet`` (a folder;
    default: the bundled emoji ControlNet when the model is the bundled one) adds control."""
    try:
        import gradio as gr
        from fastapi import FastAPI
    except ImportError as e:
        raise ImportError(
            "destatic serve needs the web extras: pip install 'destatic[serve]' (gradio)"
        ) from e

    import destatic
    from destatic.serve.api import add_api_routes
    from destatic.serve.ui import build_ui

    if pipeline is None:
        pipeline = destatic.load(model)
    limits = limits or Limits()
    net = None
    if (
        controlnet is None
        and model is None
        and (destatic.DEFAULT_CONTROLNET / "config.json").is_file()
    ):
        controlnet = destatic.DEFAULT_CONTROLNET
    if controlnet is not None:
        from destatic.checkpoints import load_component

        net = load_component(controlnet)
    inpainter, inpainter_name = None, ""
    if model is None and (destatic.DEFAULT_INPAINT_MODEL / "model_index.json").is_file():
        inpainter = destatic.load(destatic.DEFAULT_INPAINT_MODEL)
        inpainter_name = str(destatic.DEFAULT_INPAINT_MODEL)
    service = GenerationService(
        pipeline,
        limits,
        model_name=str(model) if model else "",
        controlnet=net,
        controlnet_name=str(controlnet or ""),
        inpainter=inpainter,
        inpainter_name=inpainter_name,
    )
    app = FastAPI(title="destatic")
    add_api_routes(app, service)
    ui = build_ui(service)
    ui.queue(max_size=limits.max_waiting, default_concurrency_limit=concurrency)
    app = gr.mount_gradio_app(app, ui, path="/")
    app.state.service = service
    return app


def serve(app, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
