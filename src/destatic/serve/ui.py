"""The web UI (gradio): text → image, image → image and inpainting with a mask painter.

Thin: every tab builds a :class:`~destatic.serve.service.Request` and hands it to the shared
:class:`~destatic.serve.service.GenerationService`; its errors become gradio error toasts.
Small models draw small images, so the gallery shows them enlarged (nearest neighbour, at
least 256 px) while the parameters box gives the A1111 text of each image.
"""

from __future__ import annotations

from typing import Any

from destatic.serve.service import Busy, GenerationService, Request, RequestError

__all__ = ["build_ui"]

DISPLAY_SIDE = 256


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


def build_ui(service: GenerationService):
    """A ``gradio.Blocks`` app on ``service`` (queue not yet configured)."""
    import gradio as gr

    from destatic.sampling import GRIDS, SAMPLERS

    pipe = service.pipeline
    lim = service.limits
    side = pipe.default_size
    multiple = pipe.size_multiple

    def run(request: Request):
        try:
            result = service.run(request)
        except (RequestError, Busy) as e:
            raise gr.Error(str(e)) from None
        for note in result.warnings:
            gr.Warning(note)
        text = "\n\n".join(p.a1111() for p in result.params)
        return [_enlarged(im) for im in result.images], text

    def settings():
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                sampler = gr.Dropdown(sorted(SAMPLERS), value="dpmpp_2m", label="Sampler")
                grid = gr.Dropdown(["default", *GRIDS], value="default", label="σ grid")
            with gr.Row():
                steps = gr.Slider(1, lim.max_steps, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 15, value=3.0, step=0.5, label="Guidance")
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                count = gr.Slider(1, lim.max_images, value=4, step=1, label="Images")
                size = gr.Slider(
                    multiple, lim.max_side, value=side, step=multiple, label="Size (pixels)"
                )
        return [sampler, grid, steps, guidance, seed, count, size]

    def request(prompt, negative, sampler, grid, steps, guidance, seed, count, size, **extra):
        return Request(
            prompt=prompt,
            negative_prompt=negative or "",
            sampler=sampler,
            grid=None if grid == "default" else grid,
            steps=int(steps),
            guidance=float(guidance),
            seed=int(seed or 0),
            num_images=int(count),
            width=int(size),
            height=int(size),
            **extra,
        )

    def outputs(tab: str):
        gallery = gr.Gallery(
            label="Images", columns=4, height="auto", format="png", elem_id=f"{tab}-gallery"
        )
        text = gr.Textbox(label="Parameters", lines=3, elem_id=f"{tab}-parameters")
        return gallery, text

    def prompts(tab: str):
        prompt = gr.Textbox(label="Prompt", value="red heart", elem_id=f"{tab}-prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id=f"{tab}-negative")
        return prompt, negative

    def fit(image, size: int):
        """An uploaded image, resized to the chosen square size (Lanczos)."""
        from PIL import Image

        if image is None:
            raise gr.Error("upload an image first")
        return image.convert("RGB").resize((size, size), Image.LANCZOS)

    with gr.Blocks(title="destatic") as ui:
        gr.Markdown(
            f"### destatic — {service.model_name or 'the bundled emoji model'} "
            f"({side}×{side}; sizes in multiples of {multiple})"
        )
        with gr.Tab("Text → image"):
            prompt, negative = prompts("txt2img")
            button = gr.Button("Generate", variant="primary", elem_id="txt2img-generate")
            knobs = settings()
            gallery, text = outputs("txt2img")
            button.click(
                lambda *a: run(request(*a)),
                [prompt, negative, *knobs],
                [gallery, text],
                api_name="txt2img",
            )
        with gr.Tab("Image → image"):
            prompt2, negative2 = prompts("img2img")
            source = gr.Image(type="pil", label="Input image", elem_id="img2img-input")
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
            button2 = gr.Button("Generate", variant="primary", elem_id="img2img-generate")
            knobs2 = settings()
            gallery2, text2 = outputs("img2img")

            def img2img(prompt, negative, image, strength, *knobs):
                size = int(knobs[-1])
                extra = {"image": fit(image, size), "strength": float(strength)}
                return run(request(prompt, negative, *knobs, **extra))

            button2.click(
                img2img,
                [prompt2, negative2, source, strength, *knobs2],
                [gallery2, text2],
                api_name="img2img",
            )
        with gr.Tab("Inpainting"):
            prompt3, negative3 = prompts("inpaint")
            editor = gr.ImageEditor(
                type="pil",
                label="Image: paint over what to redraw",
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                elem_id="inpaint-editor",
            )
            button3 = gr.Button("Generate", variant="primary", elem_id="inpaint-generate")
            knobs3 = settings()
            gallery3, text3 = outputs("inpaint")

            def inpaint(prompt, negative, value, *knobs):
                size = int(knobs[-1])
                background = (value or {}).get("background")
                image = fit(background, size)
                mask = _mask_from_editor(value, (size, size))
                if mask is None:
                    raise gr.Error("paint the region to redraw first")
                extra = {"image": image, "mask": mask}
                return run(request(prompt, negative, *knobs, **extra))

            button3.click(
                inpaint,
                [prompt3, negative3, editor, *knobs3],
                [gallery3, text3],
                api_name="inpaint",
            )
        if service.controlnet is not None:
            with gr.Tab("Control"):
                prompt4, negative4 = prompts("control")
                with gr.Row():
                    reference = gr.Image(type="pil", label="Control image", elem_id="control-input")
                    traced = gr.Image(
                        type="pil", label="What the ControlNet sees", interactive=False
                    )
                canny = gr.Checkbox(True, label="Trace Canny edges of the control image")
                with gr.Row():
                    weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control weight")
                    start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (share of steps)")
                    end = gr.Slider(0, 1, value=1.0, step=0.05, label="End (share of steps)")
                button4 = gr.Button("Generate", variant="primary", elem_id="control-generate")
                knobs4 = settings()
                gallery4, text4 = outputs("control")

                def controlled(prompt, negative, image, canny, weight, start, end, *knobs):
                    size = int(knobs[-1])
                    extra = {
                        "control_image": fit(image, size),
                        "control_canny": bool(canny),
                        "control_scale": float(weight),
                        "control_start": float(start),
                        "control_end": float(end),
                    }
                    images, text = run(request(prompt, negative, *knobs, **extra))
                    seen = service.control_map(extra["control_image"], extra["control_canny"])
                    return images, text, _enlarged(seen)

                button4.click(
                    controlled,
                    [prompt4, negative4, reference, canny, weight, start, end, *knobs4],
                    [gallery4, text4, traced],
                    api_name="control",
                )
    return ui
