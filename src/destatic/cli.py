"""The ``destatic`` command line (thin: parsing and printing only)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="destatic: diffusion models in one σ-space core.",
)


def _numbers(text: str, kind: type = int, minimum: float = 1) -> list:
    """Comma-separated numbers of ``kind``, each at least ``minimum``."""
    what = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {what}, got {text!r}") from None
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"expected {what} ≥ {minimum:g}, got {text!r}")
    return values


@app.command()
def lab(
    dims: str = typer.Option("2,16", help="Dimensions of the Gaussian-mixture problems."),
    nfe: str = typer.Option("4,8,16,32", help="Model-evaluation budgets."),
    sampler: list[str] = typer.Option(None, help="Samplers to run (repeatable; default: all)."),
    grid: str = typer.Option("karras", help="σ grid (karras, exponential, normal, ays, …)."),
    samples: int = typer.Option(4096, min=16, help="Shared noises per problem."),
    seed: int = typer.Option(0, help="Seed of the mixture, the noise and every draw."),
    json_out: Path = typer.Option(None, "--json", help="Also write the rows as JSON here."),
) -> None:
    """Every sampler × NFE on an exact-score Gaussian mixture: RMS to the exact ODE solution
    and sliced W2 to true samples (SD 1.x noise schedule)."""
    import torch

    from destatic.lab import format_table, run_lab
    from destatic.sampling import GRIDS

    torch.set_num_threads(1)  # [4096, ≤16] tensors: threads only add synchronisation

    if grid not in GRIDS:
        raise typer.BadParameter(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    try:
        rows = run_lab(
            _numbers(dims), sampler or None, _numbers(nfe), grid, samples, seed, progress=True
        )
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        typer.echo(f"wrote {json_out}")


@app.command()
def samplers() -> None:
    """List the samplers and grids."""
    from destatic.sampling import GRIDS, SAMPLER_INFO

    for name, info in sorted(SAMPLER_INFO.items()):
        kind = "stochastic" if info.stochastic else "deterministic"
        typer.echo(f"{name:20s} order {info.order}  {info.evals_per_step} eval/step  {kind}")
    typer.echo("grids: " + ", ".join(GRIDS))


data_app = typer.Typer(no_args_is_help=True, help="Build the training datasets (cached locally).")
app.add_typer(data_app, name="data")


def _build_data(build, cache_paths, size: int, out: Path | None, summary) -> None:
    """Run ``build(size, out=out, progress=True)``; print ``summary(ds)`` and the files."""
    try:
        ds = build(size, out=out, progress=True)
    except (FileNotFoundError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    npz_path, json_path = cache_paths(size, out)
    typer.echo(
        f"images {len(ds)}  train {len(ds.train())}  held-out {len(ds.heldout())}  "
        + summary(ds, json_path)
    )
    typer.echo(f"wrote {npz_path}")
    typer.echo(f"wrote {json_path}")


@data_app.command("emoji")
def data_emoji(
    size: int = typer.Option(64, min=1, help="Image side in pixels."),
    out: Path = typer.Option(
        None, help="Output folder (default: $DESTATIC_CACHE/emoji or ~/.cache/destatic/emoji)."
    ),
) -> None:
    """Render Noto Color Emoji (Debian fonts-noto-color-emoji + unicode-data) to a captioned
    uint8 dataset: emoji_{size}.npz + emoji_{size}.json."""
    from destatic.data import emoji

    def summary(ds, json_path: Path) -> str:
        return f"(+{sum(len(a) for a in ds.alt_captions)} alternative captions)"

    _build_data(emoji.build_emoji, emoji.cache_paths, size, out, summary)


@data_app.command("clipart")
def data_clipart(
    size: int = typer.Option(64, min=1, help="Image side in pixels."),
    out: Path = typer.Option(
        None,
        help="Output folder (default: $DESTATIC_CACHE/clipart or ~/.cache/destatic/clipart).",
    ),
) -> None:
    """Convert Open Clip Art (Debian openclipart-png + openclipart-svg) to a captioned uint8
    dataset: clipart_{size}.npz + clipart_{size}.json."""
    from destatic.data import clipart

    def summary(ds, json_path: Path) -> str:
        skipped = json.loads(json_path.read_text(encoding="utf-8"))["skipped"]
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        return (
            f"distinct captions {len(set(ds.captions))}  "
            f"skipped {sum(skipped.values())} ({reasons or 'none'})"
        )

    _build_data(clipart.build_clipart, clipart.cache_paths, size, out, summary)


MODEL_HELP = "Pipeline folder, or a bundled one by name (emoji, emoji_inpaint, emoji_lcm)."
INPUT_KEYS = (
    "variation_seed",
    "variation_strength",
    "image",
    "strength",
    "mask",
    "keep_unmasked",
    "controlnet",
    "control_image",
    "control_scale",
    "control_start",
    "control_end",
)


def _preview_writer(folder: Path | None, todo: list):
    """A ``preview(i, images)`` callback writing labelled sheets to ``folder`` (or None)."""
    if folder is None:
        return None
    from destatic.training.monitor import save_grid

    folder.mkdir(parents=True, exist_ok=True)
    labels = [p.prompt for p in todo]

    def write(i: int, images) -> None:
        save_grid(images.float().cpu(), labels, folder / f"step-{i:03d}.png")

    return write


def _lora_option(text: str) -> tuple[str, float]:
    """``path`` or ``path:scale`` (the scale is what follows the last colon, if a number)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


@app.command()
def generate(
    prompt: list[str] = typer.Argument(None, help="One or more prompts."),
    model: Path = typer.Option(None, help=MODEL_HELP),
    out: Path = typer.Option(Path("out"), "-o", "--out", help="A .png file, or a folder."),
    negative: str = typer.Option("", help="Negative prompt."),
    steps: int = typer.Option(None, min=1, help="Sampler steps (default: the model's, or 20)."),
    sampler: str = typer.Option(
        None, help="Sampler (destatic samplers lists them; default: the model's, or dpmpp_2m)."
    ),
    grid: str = typer.Option(
        None, help="σ grid (default: the model's; karras, or sgm_uniform for flow models)."
    ),
    guidance: float = typer.Option(
        None, min=0.0, help="Classifier-free guidance scale (default: the model's, or 3)."
    ),
    seed: int = typer.Option(0, help="Seed of the first image; the next ones count up."),
    num_images: int = typer.Option(1, "-n", "--num-images", min=1, help="Images per prompt."),
    size: int = typer.Option(None, help="Image side in pixels (default: the model's)."),
    upscale: int = typer.Option(1, min=1, max=16, help="Also enlarge the PNG (nearest)."),
    sheet: Path = typer.Option(None, help="Also write all images as one labelled PNG sheet."),
    from_: Path = typer.Option(
        None, "--from", help="Regenerate a PNG written by destatic from its stored parameters."
    ),
    image: Path = typer.Option(None, help="Image → image: the input image (sets the size)."),
    strength: float = typer.Option(
        1.0, min=0.0, max=1.0, help="Image → image: share of the steps run on the input."
    ),
    mask: Path = typer.Option(None, help="Inpainting: white = repaint, black = keep."),
    variation_seed: int = typer.Option(
        None, help="Variations: blend in this seed's noise (the next images count up)."
    ),
    variation_strength: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Variations: how much of the variation seed's noise."
    ),
    controlnet: Path = typer.Option(None, help="Structural control: a ControlNet folder."),
    control: Path = typer.Option(None, help="Its control image (an edge map, …)."),
    canny: bool = typer.Option(False, help="Trace Canny edges of --control first."),
    control_scale: float = typer.Option(1.0, min=0.0, help="Weight of the ControlNet."),
    control_start: float = typer.Option(0.0, min=0.0, max=1.0, help="First share of steps."),
    control_end: float = typer.Option(1.0, min=0.0, max=1.0, help="Last share of steps."),
    progress: bool = typer.Option(True, help="Show a progress bar over the steps."),
    preview: Path = typer.Option(
        None, help="Write a sheet of the decoded estimate x̂0 after every step to this folder."
    ),
    lora: list[str] = typer.Option(
        None,
        help="A LoRA file or folder with an optional :scale (default 1), e.g. "
        "style.safetensors:0.8 (repeatable: the adapters add up).",
    ),
) -> None:
    """Text → image (or image → image, inpainting) with any sampler; writes one PNG per image,
    with its generation parameters in the PNG's text chunks (A1111's "parameters" and a
    "destatic" JSON)."""
    import dataclasses
    import re

    import destatic
    from destatic.checkpoints import CheckpointError
    from destatic.pipelines.metadata import GenerationParams, png_info, read_params

    try:
        if from_ is not None:
            if prompt:
                raise ValueError("give either prompts or --from, not both")
            stored = read_params(from_)
            model = Path(stored.model) if stored.model else None
            todo = [stored]
            if variation_strength:  # variations of the stored image: one per variation seed
                first = stored.seed + 1 if variation_seed is None else variation_seed
                todo = [
                    dataclasses.replace(
                        stored, variation_seed=first + k, variation_strength=variation_strength
                    )
                    for k in range(num_images)
                ]
        elif not prompt:
            raise ValueError("give at least one prompt (or --from image.png)")
        else:
            model_name = str(model) if model is not None else ""
            todo = [
                GenerationParams(
                    prompt=text,
                    negative_prompt=negative,
                    steps=steps,
                    sampler=sampler,
                    grid=grid,
                    guidance=guidance,
                    seed=seed + i,
                    width=size,
                    height=size,
                    model=model_name,
                    image=str(image) if image else "",
                    strength=strength,
                    mask=str(mask) if mask else "",
                    variation_seed=None if variation_seed is None else variation_seed + i,
                    variation_strength=variation_strength,
                    controlnet=str(controlnet) if controlnet else "",
                    control_image=str(control) if control else "",
                    control_canny=canny,
                    control_scale=control_scale,
                    control_start=control_start,
                    control_end=control_end,
                    loras=[list(_lora_option(text)) for text in lora or []],
                )
                for i, text in enumerate(p for p in prompt for _ in range(num_images))
            ]
            if mask is not None and image is None:
                raise ValueError("--mask needs --image")
            bundled_inpainter = destatic.DEFAULT_INPAINT_MODEL / "model_index.json"
            if mask is not None and model is None and bundled_inpainter.is_file():
                model = destatic.DEFAULT_INPAINT_MODEL  # the bundled inpainting variant
                for p in todo:
                    p.model = str(model)
            if control is not None and controlnet is None and model is None:
                if (destatic.DEFAULT_CONTROLNET / "config.json").is_file():
                    controlnet = destatic.DEFAULT_CONTROLNET  # the bundled model's ControlNet
                    for p in todo:
                        p.controlnet = str(controlnet)
            if (controlnet is None) != (control is None):
                raise ValueError("--controlnet and --control go together")
            inputs = todo[0].generate_kwargs()
            inputs = {k: v for k, v in inputs.items() if k in INPUT_KEYS}
        pipe = destatic.load(model)
        for path, scale in todo[0].loras:  # the same adapters for every image of a call
            pipe.load_lora(path, scale=float(scale))
        if from_ is None:  # unset options: the model's defaults (a distilled model's sampler)
            if guidance is None:
                guidance = pipe.defaults.get("guidance", 3.0)
            chosen = pipe.settings(steps, sampler, None, guidance)
            steps, sampler, guidance = chosen["steps"], chosen["sampler"], chosen["guidance"]
            for p in todo:
                p.steps, p.sampler, p.guidance = steps, sampler, guidance
        live = {"progress": progress, "preview": _preview_writer(preview, todo)}
        if from_ is not None:
            kwargs = {**todo[0].generate_kwargs(), **live}
            if len(todo) > 1:
                kwargs["seed"] = [p.seed for p in todo]
                kwargs["variation_seed"] = [p.variation_seed for p in todo]
            images = pipe([stored.prompt] * len(todo), **kwargs)
        else:
            images = pipe(
                prompt,
                negative_prompt=negative or None,
                steps=steps,
                sampler=sampler,
                grid=grid,
                guidance=guidance,
                seed=seed,
                num_images=num_images,
                width=size,
                height=size,
                **inputs,
                **live,
            )
    except (CheckpointError, ValueError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    single = out.suffix.lower() == ".png" and len(images) == 1
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    for i, (image, params) in enumerate(zip(images, todo, strict=True)):
        params.width, params.height = image.width, image.height
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), 0)
        slug = re.sub(r"[^a-z0-9]+", "-", params.prompt.lower()).strip("-")[:60] or "image"
        path = out if single else out / f"{i:03d}-{slug}-seed{params.seed}.png"
        image.save(path, pnginfo=png_info(params))
        typer.echo(f"wrote {path}")
    if sheet is not None:
        import numpy as np
        import torch

        from destatic.training.monitor import save_grid

        arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
        tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
        save_grid(tensor, [p.prompt for p in todo], sheet, columns=min(8, len(images)))
        typer.echo(f"wrote {sheet}")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A pipeline folder (e.g. runs/emoji/model)."),
    dest: Path = typer.Argument(..., help="Where to write it."),
    half: bool = typer.Option(True, help="Store weights as fp16 (they load back as fp32)."),
) -> None:
    """Copy a pipeline or component folder (ControlNet, VAE, evaluator, …) in the diffusers
    layout, optionally as fp16 safetensors."""
    import torch

    import destatic
    from destatic.checkpoints import CheckpointError, load_component, read_json, save_component
    from destatic.metrics.evaluator import (
        is_evaluator_folder,
        load_image_text_model,
        save_evaluator,
    )
    from destatic.pipelines import save

    try:
        dtype = torch.float16 if half else None
        if is_evaluator_folder(source):
            save_evaluator(load_image_text_model(source), dest, dtype=dtype)
        elif (source / "config.json").is_file() and not (source / "model_index.json").is_file():
            component = load_component(source)  # a ControlNet, a VAE, a U-Net, …
            name = read_json(source / "config.json")["_class_name"]
            save_component(
                component, dest, class_name=name, config=component.config.to_dict(), dtype=dtype
            )
        else:
            save(destatic.load(source), dest, half=half)
    except (CheckpointError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    typer.echo(f"wrote {dest} ({size / 1e6:.1f} MB)")


def _override(text: str) -> tuple[str, object]:
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise typer.BadParameter(f"--set takes table.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: a string
    return key.strip(), parsed


@app.command()
def train(
    config: Path = typer.Argument(..., help="TOML training config (see configs/)."),
    set_: list[str] = typer.Option(
        None, "--set", help="Override a config value: table.key=value (repeatable)."
    ),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in output.dir."),
) -> None:
    """Train (or resume) a model: checkpoints, metrics, loss curve, sample grids and the
    exported pipeline go to output.dir. Several processes: torchrun --nproc_per_node N -m
    destatic.cli train CONFIG."""
    from destatic.checkpoints import CheckpointError
    from destatic.training import ConfigError, TrainingError, load_config
    from destatic.training import train as run

    try:
        cfg = load_config(config, dict(_override(s) for s in set_ or []))
        folder = run(cfg, resume=resume)
    except (ConfigError, CheckpointError, TrainingError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"model: {folder}")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(None, help="Pipeline folder (default: the bundled model)."),
    data: str = typer.Option("emoji", help="Dataset whose held-out split is the reference."),
    data_path: str = typer.Option("", help="The image folder when --data folder."),
    samplers: str = typer.Option("euler,dpmpp_2m,heun", help="Comma-separated samplers."),
    steps: str = typer.Option("1,2,4,8,16,32", help="Comma-separated step counts."),
    grid: str = typer.Option(None, help="σ grid (default: the model's)."),
    guidance: float = typer.Option(3.0, min=0.0, help="Guidance scale of the steps sweep."),
    guidance_sweep: str = typer.Option(
        "1,1.5,2,3,4.5,6", help="Guidance scales of the guidance sweep ('' = none)."
    ),
    guidance_sampler: str = typer.Option("dpmpp_2m", help="Sampler of the guidance sweep."),
    guidance_steps: int = typer.Option(16, min=1, help="Steps of the guidance sweep."),
    metrics: str = typer.Option(
        "retrieval,clip,fid,kid,pr", help="retrieval, clip (evaluator); fid, kid, pr (Inception)."
    ),
    evaluator: Path = typer.Option(None, help="Evaluator folder (default: the bundled one)."),
    n: int = typer.Option(0, min=0, help="Held-out prompts to use (0 = all)."),
    seed: int = typer.Option(0, help="Seed of the first image; the next ones count up."),
    batch_size: int = typer.Option(64, min=1, help="Images generated per batch."),
    out: Path = typer.Option(Path("runs/eval"), "-o", "--out", help="Report folder."),
) -> None:
    """Quality against steps per sampler and against guidance, on the held-out prompts: a table,
    results.json and plots (quality_vs_nfe.png, quality_vs_guidance.png) in --out."""
    import destatic
    from destatic.checkpoints import CheckpointError
    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import InceptionFeatures, MissingInceptionError
    from destatic.metrics.sweep import Setting, evaluate, reference_set, write_report
    from destatic.sampling import sampler_info

    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    try:
        names = [s.strip() for s in samplers.split(",") if s.strip()]
        for name in [*names, guidance_sampler]:
            sampler_info(name)
        step_settings = [Setting(s, k, guidance, grid) for s in names for k in _numbers(steps)]
        scales = _numbers(guidance_sweep, float, 0) if guidance_sweep.strip() else []
        guide_settings = [Setting(guidance_sampler, guidance_steps, g, grid) for g in scales]
        pipe = destatic.load(model)
        reference = reference_set(data, pipe.default_size, data_path, n=n, seed=seed)
        scorer = None
        if {"retrieval", "clip"} & set(wanted):
            scorer = load_evaluator(evaluator)
        inception = InceptionFeatures() if {"fid", "kid", "pr"} & set(wanted) else None
        common = dict(evaluator=scorer, inception=inception, metrics=wanted, seed=seed)
        real, by_steps = evaluate(pipe, step_settings, reference, **common, batch_size=batch_size)
        _, by_guidance = (
            evaluate(pipe, guide_settings, reference, **common, batch_size=batch_size)
            if guide_settings
            else (real, [])
        )
    except (CheckpointError, ValueError, FileNotFoundError, MissingInceptionError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    meta = {
        "model": str(model or destatic.DEFAULT_MODEL),
        "data": data,
        "n": len(reference.prompts),
        "seed": seed,
        "evaluator": str(evaluator or destatic.DEFAULT_EVALUATOR) if scorer else None,
    }
    title = f"{Path(meta['model']).name} on {data} held-out (n = {meta['n']})"
    written = write_report(real, by_steps, by_guidance, out, title=title, meta=meta)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Path = typer.Option(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (localhost by default)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port."),
    max_side: int = typer.Option(512, min=8, help="Largest image side a request may ask for."),
    max_images: int = typer.Option(8, min=1, help="Most images per request."),
    max_steps: int = typer.Option(100, min=1, help="Most sampler steps per request."),
    queue: int = typer.Option(16, min=0, help="Requests that may wait behind the running one."),
    controlnet: Path = typer.Option(
        None, help="A ControlNet folder for the Control tab (default: the bundled one)."
    ),
) -> None:
    """Web UI (text → image, image → image, inpainting) and HTTP API on one local server."""
    from destatic.checkpoints import CheckpointError
    from destatic.serve import Limits, create_app
    from destatic.serve import serve as run_server

    limits = Limits(
        max_side=max_side, max_images=max_images, max_steps=max_steps, max_waiting=queue
    )
    try:
        app_ = create_app(model, limits, controlnet=controlnet)
    except (CheckpointError, ValueError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"destatic: UI at http://{host}:{port}/  API at http://{host}:{port}/api/health")
    run_server(app_, host=host, port=port)


if __name__ == "__main__":
    app()
