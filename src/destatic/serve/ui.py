"""The web UI (gradio): text → image, image → image and inpainting with a mask painter; for a
video model, one Video tab (text → video, or image → video from a first frame) showing an MP4;
for an audio model, one Audio tab (text → audio of a chosen length) playing a WAV.

Thin: every tab builds a :class:`~destatic.pipelines.GenerationRequest` and hands it to the shared
:class:`~destatic.serve.service.GenerationService`; its errors become gradio error toasts.
Small models draw small images, so the gallery shows them enlarged (nearest neighbour, at
least 256 px) while the parameters box gives the A1111 text of each image.

Uploaded images reach the handlers as file paths and are decoded by
:func:`~destatic.serve.images.load_image` only once their header shows they are within the
limits; the mask painter's layers, which gradio decodes itself, are checked the same way first
(:func:`check_before_decoding`). Clips and sounds are written under the server's own folder
(:mod:`destatic.serve.videos`, :mod:`destatic.serve.audio`), from where gradio copies them to
its cache.
"""

from __future__ import annotations

import tempfile
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from destatic.pipelines import GenerationRequest
from destatic.serve.audio import write_wav
from destatic.serve.images import load_image, open_image
from destatic.serve.service import (
    DEFAULT_FPS,
    Busy,
    Generated,
    GenerationService,
    Limits,
    RequestError,
)
from destatic.serve.videos import write_mp4

__all__ = ["build_ui", "check_before_decoding"]

DISPLAY_SIDE = 256


def check_before_decoding(editor: gr.ImageEditor, limits: Limits) -> gr.ImageEditor:
    """``editor``, refusing an oversized background or layer before gradio decodes it (gradio
    decodes every one in full, in ``convert_and_format_image``). Wrapped on the instance: a
    subclass of a gradio component makes gradio write a ``.pyi`` file beside this module."""
    decode = editor.convert_and_format_image

    def checked(file, flatten_on_white: bool = False):
        if file is not None:
            source = file.path if isinstance(file, FileData) else bytes(file)
            try:
                open_image(source, "the image", limits.max_upload_side, limits.max_image_bytes)
            except RequestError as e:
                raise gr.Error(str(e)) from None
        return decode(file, flatten_on_white)

    editor.convert_and_format_image = checked
    return editor


def _enlarged(image):
    factor = max(1, DISPLAY_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), 0) if factor > 1 else image


def _mask_from_editor(value: dict[str, Any] | None, size: tuple[int, int]):
    """The painted strokes of an ImageEditor value as an "L" mask (white = repaint)."""
    from PIL import Image

    if not value or not value.get("layers"):
        return None
    mask = Image.new("L", size, 0)
    for layer in value["layers"]:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").resize(size, Image.NEAREST)
        mask.paste(255, mask=alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None


class _Tabs:
    """The parts every tab shares (prompt boxes, settings, gallery) and the handlers that turn
    a tab's inputs into a :class:`GenerationRequest` for the service."""

    def __init__(self, service: GenerationService, folder: str | None = None):
        self.service = service
        self.folder = folder or tempfile.gettempdir()  # where clips are written
        self.lim = service.limits
        self.side = service.pipeline.default_size
        self.multiple = service.pipeline.size_multiple

    # -- components ----------------------------------------------------------------------------
    def prompts(self, tab: str, value: str = "red heart"):
        prompt = gr.Textbox(label="Prompt", value=value, elem_id=f"{tab}-prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id=f"{tab}-negative")
        return prompt, negative

    def sampling_controls(self, clips: bool = False, sized: bool = True) -> list:
        """Sampler, grid, steps, guidance, seed, count and size, set to the model's defaults
        (a distilled model's sampler and steps); for ``clips`` (or sounds) the count is one,
        hidden; without ``sized`` (sounds) there is no size."""
        from destatic.sampling import GRIDS, SAMPLERS

        d, lim, tokens = self.service.defaults, self.lim, self.service.tokens
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                sampler = gr.Dropdown(
                    list(self.service.pipeline.decoders) if tokens else sorted(SAMPLERS),
                    value=d["sampler"],
                    label="Decoder" if tokens else "Sampler (or an A1111 name: DPM++ 2M Karras, …)",
                    allow_custom_value=not tokens,
                )
                grid = gr.Dropdown(
                    ["default", *GRIDS],
                    value="default",
                    label="σ grid",
                    allow_custom_value=True,
                    visible=not tokens,
                )
            with gr.Row():
                steps = self.steps_control(d["steps"])
                guidance = gr.Slider(0, 15, value=d["guidance"], step=0.5, label="Guidance")
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                count = gr.Slider(
                    1, lim.max_images, 1 if clips else 4, step=1, label="Images", visible=not clips
                )
                if not sized:
                    return [sampler, grid, steps, guidance, seed, count]
                if tokens:  # one size: the model's
                    return [sampler, grid, steps, guidance, seed, count, gr.State(None)]
                m = self.multiple
                size = gr.Slider(m, lim.max_side, value=self.side, step=m, label="Size (pixels)")
        return [sampler, grid, steps, guidance, seed, count, size]

    def steps_control(self, steps: int):
        """The steps slider; none for an autoregressive token model (it draws one code a
        step, all of them), MaskGIT's passes for a bidirectional one."""
        pipe = self.service.pipeline
        if self.service.tokens and not pipe.bidirectional:
            return gr.State(None)
        label = "Passes (MaskGIT)" if self.service.tokens else "Steps"
        return gr.Slider(1, self.lim.max_steps, value=steps, step=1, label=label)

    def decoding_controls(self) -> list:
        """A token model's decoding: temperature, top-k, top-p and (autoregressive) beams, set
        to the model's defaults."""
        d, pipe = self.service.defaults, self.service.pipeline
        with gr.Accordion("Decoding", open=True), gr.Row():
            temperature = gr.Slider(
                0,
                2,
                d["temperature"],
                step=0.05,
                label="Temperature (0: greedy)",
                elem_id="txt2img-temperature",
            )
            top_k = gr.Slider(
                0,
                int(pipe.tokenizer.num_codes),
                d["top_k"],
                step=1,
                label="Top-k (0: all)",
                elem_id="txt2img-top-k",
            )
            top_p = gr.Slider(
                0.01, 1, d["top_p"], step=0.01, label="Top-p (1: all)", elem_id="txt2img-top-p"
            )
            if pipe.bidirectional:
                return [temperature, top_k, top_p, gr.State(None)]
            beams = gr.Slider(
                1,
                self.lim.max_beams,
                d["beams"],
                step=1,
                label="Beams (> 1: beam search)",
                elem_id="txt2img-beams",
            )
        return [temperature, top_k, top_p, beams]

    def outputs(self, tab: str):
        gallery = gr.Gallery(
            label="Images", columns=4, height="auto", format="png", elem_id=f"{tab}-gallery"
        )
        text = gr.Textbox(label="Parameters", lines=3, elem_id=f"{tab}-parameters")
        return gallery, text

    @staticmethod
    def uploaded(label: str, elem_id: str):
        """An image input handing its handler the uploaded file's path, undecoded."""
        return gr.Image(type="filepath", image_mode=None, label=label, elem_id=elem_id)

    # -- handlers ------------------------------------------------------------------------------
    def draw(
        self, prompt, negative, sampler, grid, steps, guidance, seed, count, size, **extra
    ) -> Generated:
        """The request a tab describes (``size`` None: a sound's), drawn by the service; its
        errors as gradio errors and its warnings as gradio warnings."""
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative or "",
            sampler=sampler,
            grid=None if grid == "default" else grid,
            steps=None if steps is None else int(steps),
            guidance=float(guidance),
            seed=int(seed or 0),
            num_images=int(count),
            width=None if size is None else int(size),
            height=None if size is None else int(size),
            **extra,
        )
        try:
            result = self.service.run(request)
        except (RequestError, Busy) as e:
            raise gr.Error(str(e)) from None
        for note in result.warnings:
            gr.Warning(note)
        return result

    def run(self, *knobs, **extra):
        """:meth:`draw` for the gallery: (enlarged images, A1111 texts)."""
        result = self.draw(*knobs, **extra)
        text = "\n\n".join(r.a1111() for r in result.requests)
        return [_enlarged(im) for im in result.images], text

    def fit(self, image, size: int):
        """An uploaded image (a file, or the editor's decoded background), resized to the chosen
        square size (Lanczos)."""
        from PIL import Image

        if image is None:
            raise gr.Error("upload an image first")
        if isinstance(image, str):
            lim = self.lim
            try:
                image = load_image(
                    image, "the image", lim.max_upload_side, lim.max_image_bytes, "RGB"
                )
            except RequestError as e:
                raise gr.Error(str(e)) from None
        return image.convert("RGB").resize((size, size), Image.LANCZOS)

    # -- tabs ----------------------------------------------------------------------------------
    def text_to_image(self) -> None:
        prompt, negative = self.prompts("txt2img")
        button = gr.Button("Generate", variant="primary", elem_id="txt2img-generate")
        decoding = self.decoding_controls() if self.service.tokens else []
        knobs = self.sampling_controls()
        gallery, text = self.outputs("txt2img")
        if not decoding:
            button.click(self.run, [prompt, negative, *knobs], [gallery, text], api_name="txt2img")
            return

        def txt2img(prompt, negative, temperature, top_k, top_p, beams, *knobs):
            extra = {
                "temperature": float(temperature),
                "top_k": int(top_k),
                "top_p": float(top_p),
                "beams": None if beams is None else int(beams),
            }
            return self.run(prompt, negative, *knobs, **extra)

        inputs = [prompt, negative, *decoding, *knobs]
        button.click(txt2img, inputs, [gallery, text], api_name="txt2img")

    def image_to_image(self) -> None:
        prompt, negative = self.prompts("img2img")
        source = self.uploaded("Input image", "img2img-input")
        strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
        button = gr.Button("Generate", variant="primary", elem_id="img2img-generate")
        knobs = self.sampling_controls()
        gallery, text = self.outputs("img2img")

        def img2img(prompt, negative, image, strength, *knobs):
            extra = {"image": self.fit(image, int(knobs[-1])), "strength": float(strength)}
            return self.run(prompt, negative, *knobs, **extra)

        inputs = [prompt, negative, source, strength, *knobs]
        button.click(img2img, inputs, [gallery, text], api_name="img2img")

    def inpainting(self) -> None:
        prompt, negative = self.prompts("inpaint")
        editor = gr.ImageEditor(
            type="pil",
            label="Image: paint over what to redraw",
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
            elem_id="inpaint-editor",
        )
        check_before_decoding(editor, self.lim)
        button = gr.Button("Generate", variant="primary", elem_id="inpaint-generate")
        knobs = self.sampling_controls()
        gallery, text = self.outputs("inpaint")

        def inpaint(prompt, negative, value, *knobs):
            size = int(knobs[-1])
            image = self.fit((value or {}).get("background"), size)
            mask = _mask_from_editor(value, (size, size))
            if mask is None:
                raise gr.Error("paint the region to redraw first")
            return self.run(prompt, negative, *knobs, image=image, mask=mask)

        inputs = [prompt, negative, editor, *knobs]
        button.click(inpaint, inputs, [gallery, text], api_name="inpaint")

    def control(self) -> None:
        prompt, negative = self.prompts("control")
        with gr.Row():
            reference = self.uploaded("Control image", "control-input")
            traced = gr.Image(type="pil", label="What the ControlNet sees", interactive=False)
        canny = gr.Checkbox(True, label="Trace Canny edges of the control image")
        with gr.Row():
            weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control weight")
            start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (share of steps)")
            end = gr.Slider(0, 1, value=1.0, step=0.05, label="End (share of steps)")
        button = gr.Button("Generate", variant="primary", elem_id="control-generate")
        knobs = self.sampling_controls()
        gallery, text = self.outputs("control")

        def controlled(prompt, negative, image, canny, weight, start, end, *knobs):
            extra = {
                "control_image": self.fit(image, int(knobs[-1])),
                "control_canny": bool(canny),
                "control_scale": float(weight),
                "control_start": float(start),
                "control_end": float(end),
            }
            images, text = self.run(prompt, negative, *knobs, **extra)
            seen = self.service.control_map(extra["control_image"], extra["control_canny"])
            return images, text, _enlarged(seen)

        inputs = [prompt, negative, reference, canny, weight, start, end, *knobs]
        button.click(controlled, inputs, [gallery, text, traced], api_name="control")

    def video(self) -> None:
        """Text → video, or image → video holding an uploaded first frame; an MP4 out."""
        prompt, negative = self.prompts("video")
        first = self.uploaded("First frame (optional: image → video)", "video-input")
        with gr.Row():
            most = self.lim.max_frames
            frames = gr.Slider(
                1,
                most,
                min(self.service.default_frames, most),
                step=1,
                label="Frames",
                elem_id="video-frames",
            )
            fps = gr.Slider(
                1,
                self.lim.max_fps,
                DEFAULT_FPS,
                step=1,
                label="Frames per second",
                elem_id="video-fps",
            )
        button = gr.Button("Generate", variant="primary", elem_id="video-generate")
        knobs = self.sampling_controls(clips=True)
        clip = gr.Video(label="Video", autoplay=True, loop=True, elem_id="video-output")
        text = gr.Textbox(label="Parameters", lines=3, elem_id="video-parameters")

        def video(prompt, negative, image, frames, fps, *knobs):
            try:
                fps = self.service.check_fps(int(fps))
            except RequestError as e:
                raise gr.Error(str(e)) from None
            extra = {"num_frames": int(frames)}
            if image is not None:
                extra["image"] = self.fit(image, int(knobs[-1]))
            result = self.draw(prompt, negative, *knobs, **extra)
            request = result.requests[0]
            path = write_mp4(result.images[0], request, fps, self.folder)
            return str(path), f"{request.a1111()}, Frames: {int(frames)}, FPS: {fps}"

        inputs = [prompt, negative, first, frames, fps, *knobs]
        button.click(video, inputs, [clip, text], api_name="video")

    def audio(self) -> None:
        """Text → audio: one sound of the chosen length, as a WAV the browser plays."""
        prompt, negative = self.prompts("audio", "acoustic grand piano, C4")
        longest = min(self.service.pipeline.max_seconds, self.lim.max_seconds)
        seconds = gr.Slider(
            0.01, longest, longest, step=0.01, label="Seconds", elem_id="audio-seconds"
        )
        button = gr.Button("Generate", variant="primary", elem_id="audio-generate")
        knobs = self.sampling_controls(clips=True, sized=False)
        sound = gr.Audio(
            label="Audio",
            type="filepath",
            format="wav",
            elem_id="audio-output",
            waveform_options=gr.WaveformOptions(show_recording_waveform=False),  # <audio controls>
        )
        text = gr.Textbox(label="Parameters", lines=3, elem_id="audio-parameters")

        def audio(prompt, negative, seconds, *knobs):
            result = self.draw(prompt, negative, *knobs, None, seconds=float(seconds))
            request = result.requests[0]
            path = write_wav(result.images[0], result.sample_rate, request, self.folder)
            return str(path), f"{request.a1111()}, Seconds: {float(seconds):g}"

        inputs = [prompt, negative, seconds, *knobs]
        button.click(audio, inputs, [sound, text], api_name="audio")


def _title(service: GenerationService, tabs: _Tabs) -> str:
    """The page's heading: the model, and its size (an audio model: its rate and length)."""
    name = service.model_name or "the bundled emoji model"
    if service.audio:
        longest = service.pipeline.max_seconds
        return f"### destatic — {name} ({service.sample_rate} Hz, up to {longest:.3g} s)"
    return f"### destatic — {name} ({tabs.side}×{tabs.side}; sizes in multiples of {tabs.multiple})"


def build_ui(service: GenerationService, folder: str | None = None):
    """A ``gradio.Blocks`` app on ``service`` (queue not yet configured); clips and sounds are
    written under ``folder`` (the server's own; default: the system's temporary folder)."""
    tabs = _Tabs(service, folder)
    with gr.Blocks(title="destatic") as ui:
        gr.Markdown(_title(service, tabs))
        if service.audio:
            with gr.Tab("Audio"):
                tabs.audio()
            return ui
        if service.video:
            with gr.Tab("Video"):
                tabs.video()
            return ui
        with gr.Tab("Text → image"):
            tabs.text_to_image()
        if service.tokens:  # no σ to start from an image or to steer: text → image only
            return ui
        with gr.Tab("Image → image"):
            tabs.image_to_image()
        with gr.Tab("Inpainting"):
            tabs.inpainting()
        if service.controlnet is not None:
            with gr.Tab("Control"):
                tabs.control()
    return ui
