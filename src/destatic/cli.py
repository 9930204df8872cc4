"""The ``destatic`` command line (thin: parsing and printing only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn

import typer

if TYPE_CHECKING:
    from destatic.pipelines import GenerationRequest

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="destatic: diffusion models in one σ-space core.",
)


def _numbers(text: str, kind: type = int, minimum: float = 1, maximum: float = math.inf) -> list:
    """Comma-separated finite numbers of ``kind``, each in [``minimum``, ``maximum``]."""
    what = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {what}, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(f"expected finite {what}, got {text!r}")
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"expected {what} ≥ {minimum:g}, got {text!r}")
    if max(values) > maximum:
        raise typer.BadParameter(f"expected {what} ≤ {maximum:g}, got {text!r}")
    return values


def _check_file_output(path: Path, what: str) -> None:
    """``path`` can be written as a file: not a folder, in a writable folder."""
    from destatic.pipelines.output import OutputError, check_writable

    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    check_writable(path.parent, what)


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
    budgets = _numbers(nfe, maximum=MAX_STEPS)
    try:
        if json_out is not None:
            _check_file_output(json_out, "--json")
        rows = run_lab(_numbers(dims), sampler or None, budgets, grid, samples, seed, progress=True)
    except ValueError as err:
        _fail(err)
    typer.echo(format_table(rows))
    if json_out is not None:
        try:
            json_out.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        except OSError as err:
            from destatic.pipelines.output import describe_os_error

            _fail(f"could not write {json_out} ({describe_os_error(err)}); the table is above")
        typer.echo(f"wrote {json_out}")


@app.command()
def samplers() -> None:
    """List the samplers and grids."""
    from destatic.sampling import GRIDS, SAMPLER_INFO
    from destatic.sampling.aliases import SAMPLER_LABELS, SCHEDULE_LABELS

    labels: dict[str, list[str]] = {}
    for label, name in SAMPLER_LABELS.items():
        labels.setdefault(name, []).append(label)
    for name, info in sorted(SAMPLER_INFO.items()):
        kind = "stochastic" if info.stochastic else "deterministic"
        a1111 = f"  A1111: {', '.join(labels[name])}" if name in labels else ""
        typer.echo(f"{name:20s} order {info.order}  {info.evals_per_step} eval/step  {kind}{a1111}")
    typer.echo("grids: " + ", ".join(GRIDS))
    typer.echo(
        "A1111 labels (any case) may end in a schedule type: "
        + ", ".join(label for label in SCHEDULE_LABELS if label != "Automatic")
        + " (e.g. 'DPM++ 2M Karras')"
    )


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


MODEL_HELP = (
    "Pipeline folder, a bundled one by name (emoji, emoji_inpaint, emoji_lcm, emoji_video, "
    "notes), a repo id in "
    "the local Hugging Face cache (org/name; never downloaded) or a single-file SD 1.x "
    ".safetensors checkpoint."
)
ModelPath = Annotated[Path | None, typer.Option(help=MODEL_HELP)]


def _preview_writer(folder: Path | None, todo: list):
    """A ``preview(i, images)`` callback writing labelled sheets to ``folder`` (or None)."""
    if folder is None:
        return None
    from destatic.data.sheets import save_grid

    folder.mkdir(parents=True, exist_ok=True)
    labels = [p.prompt for p in todo]

    def write(i: int, images) -> None:
        if images.ndim == 5:  # a video model's clips: frames side by side
            from destatic.pipelines.output import film_strips

            images = film_strips(images)
        save_grid(images.float().cpu(), labels, folder / f"step-{i:03d}.png")

    return write


def _lora_option(text: str) -> tuple[str, float]:
    """``path`` or ``path:scale`` (the scale is what follows the last colon, if a number; a
    non-finite one, or no path, is a ValueError)."""
    if not text.strip():
        raise ValueError("--lora needs a LoRA file or folder")
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text}: the scale must be a finite number")
        return path, scale
    return text, 1.0


MAX_STEPS = 10_000  # sampler steps (and lab / eval budgets): beyond, a run only burns time
MAX_SIDE = 4096  # generate --size: larger images do not fit in memory (the Python API may try)
MAX_GUIDANCE = 1000.0  # guidance scales: far beyond any useful one, and float32 overflows later
# generate options that do nothing without another one
NEEDS = {
    "strength": "image",
    "mask": "image",
    "canny": "control",
    "control_scale": "control",
    "control_start": "control",
    "control_end": "control",
    "variation_seed": "variation_strength",
    "hires_strength": "hires",
}
# generate options that --from replaces by the PNG's stored parameters
FROM_REPLACES = (
    "model",
    "model_config",
    "tokenizer",
    "vae",
    "motion_adapter",
    "negative",
    "steps",
    "sampler",
    "grid",
    "guidance",
    "seed",
    "size",
    "width",
    "height",
    "prompts_file",
    "image",
    "strength",
    "mask",
    "controlnet",
    "control",
    "canny",
    "control_scale",
    "control_start",
    "control_end",
    "lora",
    "hires",
    "hires_strength",
    "seconds",
    "seconds_start",
    "temperature",
    "top_k",
    "top_p",
    "beams",
)
# generate options an audio model has no use for, and those only an audio model has
NOT_FOR_AUDIO = (
    "size",
    "width",
    "height",
    "upscale",
    "sheet",
    "preview",
    "frames",
    "fps",
    "image",
    "mask",
    "controlnet",
    "control",
    "hires",
    "vae_tiling",
)
AUDIO_ONLY = ("seconds", "seconds_start", "spectrogram")
# generate options a token model has no use for (no σ, no latents to steer)
NOT_FOR_TOKENS = (
    "grid",
    "image",
    "mask",
    "controlnet",
    "control",
    "lora",
    "hires",
    "variation_seed",
    "variation_strength",
    "vae_tiling",
    "frames",
    "preview",
)


def _fail(err: object) -> NoReturn:
    """Print ``error: …`` on one line to stderr and exit with status 2."""
    text = " ".join(str(err).split())
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(2)


def _finite(value: float | None) -> float | None:
    """Option callback: refuse inf and NaN (typer's ``min``/``max`` let them through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _positive(value: float | None) -> float | None:
    """Option callback: a finite number above 0 (or unset)."""
    if _finite(value) is not None and value <= 0:
        raise typer.BadParameter(f"must be above 0, got {value:g}")
    return value


def _given(ctx: typer.Context) -> list[str]:
    """The parameters set on the command line (not left at their defaults), in order."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return [
        name for name, source in sources.items() if getattr(source, "name", "") == "COMMANDLINE"
    ]


def _flag(ctx: typer.Context, name: str) -> str:
    """How parameter ``name`` is spelled on the command line (its longest option)."""
    for param in ctx.command.params:
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return name


def _check_combinations(ctx: typer.Context) -> None:
    """Refuse generate options that would be silently ignored: prompts with ``--from`` and any
    option its stored parameters replace, an option that needs another (``--strength`` without
    ``--image``), and ``--size`` with ``--image`` (the image sets the size)."""
    given = _given(ctx)
    if "from_" in given:
        if ctx.params.get("prompt"):
            raise ValueError("give either prompts or --from, not both")
        a1111 = "model" in given and not _has_destatic_chunk(ctx.params["from_"])
        sources = ("model", "model_config", "tokenizer", "vae", "motion_adapter")
        allowed = sources if a1111 else ()
        replaced = [
            _flag(ctx, name) for name in given if name in FROM_REPLACES and name not in allowed
        ]
        if replaced:
            raise ValueError(
                f"--from regenerates with the PNG's stored parameters, so {', '.join(replaced)} "
                "would be ignored; drop it, or generate from a prompt instead"
            )
        if "num_images" in given and "variation_strength" not in given:
            raise ValueError("--from with -n needs --variation-strength (one variation per image)")
    for name, needed in NEEDS.items():
        if name in given and needed not in given:
            raise ValueError(f"{_flag(ctx, name)} needs {_flag(ctx, needed)}")
    sides = [_flag(ctx, name) for name in ("size", "width", "height") if name in given]
    if sides and "image" in given:
        raise ValueError(f"--image sets the size; drop {sides[0]} (or resize the input image)")
    if "size" in given and len(sides) > 1:
        raise ValueError(f"give --size or --width/--height, not both ({', '.join(sides)})")
    if "hires" in given and ("image" in given or "control" in given):
        raise ValueError("--hires is for text → image; drop --image/--control or --hires")


def _has_destatic_chunk(path: Path) -> bool:
    """Whether the PNG holds destatic's request (else A1111's text, which names no model
    folder: --model then says which model draws it)."""
    from destatic.io import audio, video
    from destatic.pipelines.inputs import open_image
    from destatic.pipelines.request import CHUNK

    if path.suffix.lower() in {*video.READ_SUFFIXES, *audio.READ_SUFFIXES}:
        return True  # only destatic stores a request in a video or a sound
    return CHUNK in open_image(path, "RGB").info


def _check_side(size: int | None, multiple: int, flag: str = "--size") -> None:
    """``--size`` (or ``flag``) is a positive multiple of the model's ``size_multiple``, else
    a ValueError that suggests the nearest valid side."""
    if size is not None and (size < multiple or size % multiple):
        nearest = max(multiple, round(size / multiple) * multiple)
        raise ValueError(
            f"{flag} {size} must be a positive multiple of {multiple} for this model "
            f"(e.g. {flag} {nearest})"
        )


def _read_prompts(path: Path | None) -> list[str]:
    """The prompts of ``--prompts-file``: one a line, blank lines and ``#`` comments skipped."""
    if path is None:
        return []
    from destatic.pipelines.output import describe_os_error

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--prompts-file {path}: {describe_os_error(err)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _slug(prompt: str) -> str:
    """A file-name-safe form of a prompt (at most 60 characters)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"


def _output_paths(out: Path, todo: list) -> list[Path]:
    """Where each image of ``todo`` goes, decided before any sampling: ``out`` itself when it
    is a .png and there is one image; else ``NNN-prompt-seedS.png`` in the folder ``out``."""
    from destatic.io.audio import WRITE_SUFFIXES as AUDIO_SUFFIXES
    from destatic.io.video import WRITE_SUFFIXES
    from destatic.pipelines.output import OutputError

    if out.suffix.lower() in AUDIO_SUFFIXES and not out.is_dir():
        return _numbered(out, len(todo))
    if out.suffix.lower() in {".png", *WRITE_SUFFIXES} and not out.is_dir():
        if len(todo) > 1:
            raise OutputError(
                f"-o {out} names one {'PNG' if out.suffix.lower() == '.png' else 'video'} "
                f"but this call makes {len(todo)} images; "
                f"give a folder instead (e.g. -o {out.with_suffix('')})"
            )
        return [out]
    return [out / f"{i:03d}-{_slug(p.prompt)}-seed{p.seed}.png" for i, p in enumerate(todo)]


def _numbered(path: Path, count: int) -> list[Path]:
    """``path`` itself for one file; ``name-0.ext``, ``name-1.ext``, … for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _media_paths(paths: list[Path], out: Path, media: str) -> list[Path]:
    """``paths`` for what the model makes (``Family.media``): in a folder, a video model's
    clips are ``.mp4`` and an audio model's sounds ``.wav``; a file named by ``-o`` must be of
    the model's kind (one line otherwise)."""
    from destatic.io.audio import WRITE_SUFFIXES as AUDIO_SUFFIXES
    from destatic.io.video import WRITE_SUFFIXES

    suffix = out.suffix.lower()
    if out.is_dir() or suffix not in {".png", *WRITE_SUFFIXES, *AUDIO_SUFFIXES}:  # a folder
        folder_suffix = {"video": ".mp4", "audio": ".wav"}.get(media)
        return [p.with_suffix(folder_suffix) for p in paths] if folder_suffix else paths
    if media == "video" and suffix not in {*WRITE_SUFFIXES, ".png"}:
        kinds = ", ".join(sorted(WRITE_SUFFIXES))
        raise ValueError(
            f"-o {out}: this is a video model; name a {kinds} file, a .png (one PNG a frame: "
            "name-000.png, …) or a folder"
        )
    if media == "audio" and suffix not in AUDIO_SUFFIXES:
        raise ValueError(
            f"-o {out}: this is an audio model; name a .wav or .flac file or a folder "
            f"(--spectrogram {out.with_suffix('.png').name} also draws each sound's spectrogram)"
        )
    if media == "image" and suffix != ".png":
        raise ValueError(f"-o {out}: this model draws images; name a .png file or a folder")
    return paths


def _check_media(ctx: typer.Context, media: str) -> None:
    """Refuse options that would do nothing for what the model makes: an image model's sizes,
    sheets and inputs for an audio model, and the seconds and spectrograms of an audio model
    for the others."""
    given = _given(ctx)
    if media == "audio":
        wrong = [_flag(ctx, name) for name in given if name in NOT_FOR_AUDIO]
        if wrong:
            raise ValueError(
                f"{wrong[0]} is for image and video models; this is an audio model "
                "(--seconds sets how long each sound lasts, --spectrogram draws it)"
            )
        return
    wrong = [_flag(ctx, name) for name in given if name in AUDIO_ONLY]
    if wrong:
        made = "clips" if media == "video" else "images"
        raise ValueError(f"{wrong[0]} needs an audio model; this model draws {made}")


def _check_tokens(ctx: typer.Context, pipe) -> None:
    """Refuse options a token model cannot use, and a sampler that is no token decoder, in one
    line saying what it takes."""
    from destatic.pipelines.tokens import TAKES, TokenPipeline

    if not isinstance(pipe, TokenPipeline):
        return
    given = _given(ctx)
    wrong = [_flag(ctx, name) for name in given if name in NOT_FOR_TOKENS]
    sampler = ctx.params["sampler"]
    if sampler is not None and sampler not in pipe.decoders:
        wrong.insert(0, f"--sampler {sampler}")
    if wrong:
        decoders = ", ".join(pipe.decoders)
        raise ValueError(f"{wrong[0]} is not for token models; {TAKES} (--sampler {decoders})")


def _check_outputs(
    paths: list[Path], sheet: Path | None, preview: Path | None, spectrogram: Path | None = None
) -> None:
    """Every output folder exists (created if needed) and takes a file: a read-only or full
    disk fails here, before the model is loaded, not after sampling."""
    from destatic.pipelines.output import check_writable

    check_writable(paths[0].parent, "-o")
    if sheet is not None:
        _check_file_output(sheet, "--sheet")
    if spectrogram is not None:
        if spectrogram.suffix.lower() != ".png":
            raise ValueError(f"--spectrogram {spectrogram}: name a .png file")
        _check_file_output(spectrogram, "--spectrogram")
    if preview is not None:
        check_writable(preview, "--preview")


class _Sound(NamedTuple):
    """One sound an audio model made: (channels, samples) float32 in [-1, 1], and its rate."""

    waveform: Any
    sample_rate: int


def _write_one(path: Path, image, request, upscale: int, fps: int) -> None:
    """One image as a PNG, one clip (a list of frames) as a video or, for a .png path, as
    numbered PNG frames, or one sound as a WAV or FLAC, with its request."""
    import numpy as np

    from destatic.io.video import write_video
    from destatic.pipelines.output import write_png_atomic

    if isinstance(image, _Sound):
        from destatic.io.audio import write_audio

        write_audio(path, image.waveform, image.sample_rate, request.to_dict())
        return
    frames = image if isinstance(image, list) else [image]
    if upscale > 1:
        frames = [f.resize((f.width * upscale, f.height * upscale), 0) for f in frames]
    if not isinstance(image, list):
        write_png_atomic(path, frames[0], request.png_info())
        return
    if path.suffix.lower() == ".png":  # a clip as an image sequence: name-000.png, …
        for t, frame in enumerate(frames):
            write_png_atomic(path.with_name(f"{path.stem}-{t:03d}.png"), frame, request.png_info())
        return
    clip = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    write_video(path, clip, fps, comment=request.to_json())


def _write_images(images: list, todo: list, paths: list[Path], upscale: int, fps: int) -> None:
    """Write each image (or clip) atomically with the request that draws it and print its
    path. A failed write (full or read-only disk) leaves no partial file and raises an
    OutputError naming the images already written."""
    from destatic.pipelines.output import OutputError, describe_os_error

    written: list[Path] = []
    for image, request, path in zip(images, todo, paths, strict=True):
        try:
            _write_one(path, image, request, upscale, fps)
        except OSError as err:
            kept = (
                f"kept {len(written)} of {len(paths)} images: {', '.join(map(str, written))}"
                if written
                else f"none of the {len(paths)} images was written"
            )
            raise OutputError(
                f"could not write {path} ({describe_os_error(err)}); {kept}; "
                "free space or choose another -o, then rerun"
            ) from None
        written.append(path)
        if isinstance(image, list) and path.suffix.lower() == ".png":
            typer.echo(f"wrote {path.with_name(path.stem + '-000.png')} … ({len(image)} frames)")
        else:
            typer.echo(f"wrote {path}")


def _write_sheet(images: list, todo: list, sheet: Path, fps: int) -> None:
    """All images as one labelled sheet: a PNG (a clip as its frames side by side, one a row)
    or, for clips and a video suffix, an animated grid; a failed write is an OutputError."""
    import numpy as np
    import torch

    from destatic.data.sheets import grid_image, save_grid
    from destatic.io.video import WRITE_SUFFIXES, write_video
    from destatic.pipelines.output import OutputError, describe_os_error

    def tensor(arrays: list) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    labels = [p.prompt for p in todo]
    clips = isinstance(images[0], list)
    frames = [[np.asarray(f.convert("RGB")) for f in (im if clips else [im])] for im in images]
    try:
        if clips and sheet.suffix.lower() in WRITE_SUFFIXES:
            columns = min(4, len(images))
            grids = [
                np.asarray(grid_image(tensor([c[t] for c in frames]), labels, columns))
                for t in range(len(frames[0]))
            ]
            write_video(sheet, np.stack(grids), fps)
        else:
            strips = tensor([np.concatenate(c, 1) for c in frames])
            save_grid(strips, labels, sheet, columns=1 if clips else min(8, len(images)))
    except OSError as err:
        raise OutputError(
            f"could not write --sheet {sheet} ({describe_os_error(err)}); the images are written"
        ) from None
    typer.echo(f"wrote {sheet}")


def _write_spectrograms(sounds: list[_Sound], todo: list, path: Path) -> None:
    """Each sound's spectrogram as a PNG (``path``, or ``name-0.png``, … for several) holding
    the sound's request, so ``--from`` on it makes the sound again; a failed write is an
    OutputError."""
    from destatic.io.audio import spectrogram_image
    from destatic.pipelines.output import OutputError, describe_os_error, write_png_atomic

    for sound, request, target in zip(sounds, todo, _numbered(path, len(sounds)), strict=True):
        image = spectrogram_image(sound.waveform, sound.sample_rate)
        try:
            write_png_atomic(target, image, request.png_info())
        except OSError as err:
            raise OutputError(
                f"could not write --spectrogram {target} ({describe_os_error(err)}); "
                "the sounds are written"
            ) from None
        typer.echo(f"wrote {target}")


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether a RuntimeError from torch is a failed allocation."""
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _sources(o: dict) -> dict[str, str]:
    """The model and what a single file is built with, as the request records them."""
    names = {"model": "model", "config": "model_config", "tokenizer": "tokenizer", "vae": "vae"}
    names["motion_adapter"] = "motion_adapter"
    return {field: _path(o[option]) or "" for field, option in names.items()}


def _request_from_options(o: dict) -> GenerationRequest:
    """The request that ``destatic generate PROMPT… [options]`` describes (unset sampling
    options stay unset: the model's defaults fill them)."""
    from destatic.pipelines import GenerationRequest

    prompts = [*(o["prompt"] or []), *_read_prompts(o["prompts_file"])]
    if not prompts:
        raise ValueError("give at least one prompt (or --prompts-file, or --from image.png)")
    return GenerationRequest(
        prompt=prompts,
        negative_prompt=o["negative"],
        steps=o["steps"],
        sampler=o["sampler"],
        grid=o["grid"],
        guidance=o["guidance"],
        seed=o["seed"],
        num_images=o["num_images"],
        width=o["width"] or o["size"],
        height=o["height"] or o["size"],
        **_sources(o),
        image=_path(o["image"]),
        strength=o["strength"],
        mask=_path(o["mask"]),
        keep_unmasked=o["mask"] is not None,  # the kept pixels come back as they were
        variation_seed=o["variation_seed"],
        variation_strength=o["variation_strength"],
        seconds=o["seconds"],
        seconds_start=o["seconds_start"],
        controlnet=_path(o["controlnet"]),
        control_image=_path(o["control"]),
        control_canny=o["canny"],
        control_scale=o["control_scale"],
        control_start=o["control_start"],
        control_end=o["control_end"],
        loras=[list(_lora_option(text)) for text in o["lora"] or []],
        hires_scale=o["hires"] or 1.0,
        hires_strength=o["hires_strength"],
        vae_tiling=o["vae_tiling"],
        temperature=o["temperature"],
        top_k=o["top_k"],
        top_p=o["top_p"],
        beams=o["beams"],
        num_frames=o["frames"],
    )


def _request_from_file(o: dict) -> GenerationRequest:
    """The request stored in the ``--from`` PNG (or video, or sound); with
    ``--variation-strength``, ``-n`` variations of it, one per variation seed (the stored seed
    + 1, … or ``--variation-seed``)."""
    import dataclasses

    from destatic.pipelines import GenerationRequest

    stored = GenerationRequest.from_file(o["from_"])
    if o["model"] is not None:  # an A1111 PNG (_check_combinations refuses it otherwise)
        stored = dataclasses.replace(stored, **_sources(o))
    stored.check_sources(o["from_"])
    stored = dataclasses.replace(stored, vae_tiling=stored.vae_tiling or o["vae_tiling"])
    if not o["variation_strength"]:
        return stored
    n, first = o["num_images"], o["variation_seed"]
    return dataclasses.replace(
        stored,
        num_images=n,
        seed=[stored.seeds[0]] * n,
        variation_seed=stored.seeds[0] + 1 if first is None else first,
        variation_strength=o["variation_strength"],
    )


def _draw(ctx: typer.Context, out: Path, sheet: Path | None, preview: Path | None):
    """Build, route and resolve the request; check the outputs; sample. Returns the images
    (clips, or an audio model's sounds), the request of each and their paths."""
    from destatic.pipelines import load, to_pil
    from destatic.pipelines.devices import pick_device

    _check_combinations(ctx)
    o = ctx.params
    device, dtype = pick_device(o["device"], o["dtype"])
    request = _request_from_file(o) if o["from_"] is not None else _request_from_options(o)
    request = request.with_companions()
    if (request.controlnet is None) != (request.control_image is None):
        raise ValueError("--controlnet and --control go together")
    todo = [request.for_image(i) for i in range(len(request.prompts))]
    paths = _output_paths(out, todo)
    _check_outputs(paths, sheet, preview, o["spectrogram"])
    pipe = load(request.model or None, **request.load_options()).to(device, dtype)
    _check_media(ctx, pipe.family.media)
    _check_tokens(ctx, pipe)
    paths = _media_paths(paths, out, pipe.family.media)
    for name in ("size", "width", "height"):
        if o[name] is not None:
            _check_side(o[name], pipe.size_multiple, _flag(ctx, name))
    request = request.resolved(pipe)
    live = {"progress": o["progress"], "preview": _preview_writer(preview, todo)}
    media = pipe.run(request, **live)
    if pipe.family.media == "audio":  # waveforms (B, C, samples)
        sounds = [_Sound(w.float().cpu().numpy(), pipe.sample_rate) for w in media]
        return sounds, [request.for_image(i) for i in range(len(sounds))], paths
    # images: one PIL image each; clips: a list of frames each
    images = [to_pil(c.transpose(0, 1)) for c in media] if media.ndim == 5 else to_pil(media)
    first = [im[0] if isinstance(im, list) else im for im in images]
    todo = request.for_images([im.size for im in first], pipe.default_size)
    return images, todo, paths


# generate's options, each declared once
Prompts = Annotated[list[str] | None, typer.Argument(help="One or more prompts.")]
OutPath = Annotated[
    Path,
    typer.Option(
        "-o",
        "--out",
        help="A folder (created if needed; NNN-prompt-seedS.png per image), or a .png file "
        "when the call makes one image; an audio model's a .wav or .flac file (name-0.wav, … "
        "for several sounds).",
    ),
]
Steps = Annotated[
    int | None, typer.Option(min=1, max=MAX_STEPS, help="Sampler steps (default: the model's).")
]
SamplerName = Annotated[
    str | None, typer.Option(help="Sampler (destatic samplers lists them; default: the model's).")
]
GridName = Annotated[
    str | None,
    typer.Option(help="σ grid (default: the model's; karras, or sgm_uniform for flow models)."),
]
Guidance = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=MAX_GUIDANCE,
        callback=_finite,
        help="Classifier-free guidance scale (default: the model's).",
    ),
]
Seed = Annotated[
    int, typer.Option(min=0, max=2**63 - 1, help="Seed of the first image; the next count up.")
]
Count = Annotated[int, typer.Option("-n", "--num-images", min=1, help="Images per prompt.")]
Side = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=MAX_SIDE,
        help="Image side in pixels, a multiple of the model's (default: the model's).",
    ),
]
Width = Annotated[
    int | None, typer.Option(min=1, max=MAX_SIDE, help="Image width (instead of --size).")
]
Height = Annotated[
    int | None, typer.Option(min=1, max=MAX_SIDE, help="Image height (instead of --size).")
]
PromptsFile = Annotated[
    Path | None,
    typer.Option(help="Also read prompts from this file: one a line; blank and # lines skipped."),
]
Hires = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        max=8.0,
        callback=_finite,
        help="Hires fix: enlarge each image by this factor (Lanczos), then redraw it image → "
        "image at --hires-strength.",
    ),
]
HiresStrength = Annotated[
    float, typer.Option(min=0.01, max=1.0, help="Hires fix: share of the steps redrawn.")
]
VaeTiling = Annotated[
    bool, typer.Option(help="Run the VAE in overlapping 512-pixel tiles (large images).")
]
DeviceName = Annotated[
    str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
]
VaePath = Annotated[
    Path | None,
    typer.Option(
        help="Another autoencoder: a vae/ folder or a .safetensors file (LDM names, e.g. "
        "vae-ft-mse-840000-ema-pruned.safetensors, or diffusers' names)."
    ),
]
MotionAdapterPath = Annotated[
    Path | None,
    typer.Option(
        help="AnimateDiff: a diffusers MotionAdapter folder whose motion modules animate the SD "
        "1.x --model; it then draws clips (-o clip.mp4, --frames, 16 by default).",
    ),
]
TokenizerPath = Annotated[
    Path | None,
    typer.Option(help="Tokenizer folder for a single-file --model (CLIP vocab.json + merges.txt)."),
]
ModelConfig = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Diffusers folder (or cached repo id) whose configs and tokenizer a single-file "
        "--model uses instead of the shipped SD 1.x ones.",
    ),
]
DtypeName = Annotated[
    str,
    typer.Option(
        help="auto (fp16/bf16 on CUDA; bf16 on a CPU with AMX or AVX-512-BF16; else fp32), "
        "fp32, fp16, bf16 or fp64. Half precision rounds only the network; sampling is fp32."
    ),
]
Upscale = Annotated[int, typer.Option(min=1, max=16, help="Also enlarge the PNG (nearest).")]
SheetPath = Annotated[
    Path | None,
    typer.Option(
        help="Also write all images as one labelled PNG sheet (video: film strips, or an "
        "animated grid as .gif, .webp or .mp4)."
    ),
]
FromPng = Annotated[
    Path | None,
    typer.Option(
        "--from",
        help="Regenerate a PNG from its stored request (destatic's, or A1111's parameters "
        "text: then --model names the model).",
    ),
]
ImagePath = Annotated[
    Path | None, typer.Option(help="Image → image: the input image (sets the size).")
]
Strength = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Image → image: share of the steps run on the input."),
]
MaskPath = Annotated[Path | None, typer.Option(help="Inpainting: white = repaint, black = keep.")]
VariationSeed = Annotated[
    int | None,
    typer.Option(help="Variations: blend in this seed's noise (the next images count up)."),
]
VariationStrength = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Variations: how much of the variation seed's noise."),
]
ControlNetPath = Annotated[
    Path | None, typer.Option(help="Structural control: a ControlNet folder.")
]
ControlPath = Annotated[Path | None, typer.Option(help="Its control image (an edge map, …).")]
Canny = Annotated[bool, typer.Option(help="Trace Canny edges of --control first.")]
ControlScale = Annotated[
    float, typer.Option(min=0.0, callback=_finite, help="Weight of the ControlNet.")
]
ControlStart = Annotated[float, typer.Option(min=0.0, max=1.0, help="First share of steps.")]
ControlEnd = Annotated[float, typer.Option(min=0.0, max=1.0, help="Last share of steps.")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar over the steps.")]
Frames = Annotated[
    int | None,
    typer.Option(min=1, max=256, help="Frames per clip, for video models (default: the model's)."),
]
Fps = Annotated[int, typer.Option(min=1, max=120, help="Frames per second of written videos.")]
Seconds = Annotated[
    float | None,
    typer.Option(
        callback=_positive,
        help="Audio models: how long each sound lasts (default: the model's).",
    ),
]
SecondsStart = Annotated[
    float,
    typer.Option(
        min=0.0,
        callback=_finite,
        help="Audio models: where the sound starts in the model's time (timing conditioning).",
    ),
]
SpectrogramPath = Annotated[
    Path | None,
    typer.Option(
        help="Audio models: also write each sound's spectrogram as this PNG (name-0.png, … for "
        "several), holding the request as the sound does."
    ),
]
PreviewDir = Annotated[
    Path | None,
    typer.Option(help="Write a sheet of the decoded estimate x̂0 after every step to this folder."),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=100.0,
        callback=_finite,
        help="Token models: sampling temperature of the codes (0: greedy; default: the model's).",
    ),
]
TopK = Annotated[
    int | None,
    typer.Option(min=0, help="Token models: sample among the k likeliest codes (0: all)."),
]
TopP = Annotated[
    float | None,
    typer.Option(
        callback=_positive,
        max=1.0,
        help="Token models: sample among the likeliest codes holding this share of the "
        "probability (nucleus; 1: all).",
    ),
]
Beams = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=64,
        help="Autoregressive token models: beam search with this many beams (1: sampling).",
    ),
]
Loras = Annotated[
    list[str] | None,
    typer.Option(
        help="A LoRA file or folder with an optional :scale (default 1), e.g. "
        "style.safetensors:0.8 (repeatable: the adapters add up).",
    ),
]


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Prompts = None,
    model: ModelPath = None,
    out: OutPath = Path("out"),
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    steps: Steps = None,
    sampler: SamplerName = None,
    grid: GridName = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    num_images: Count = 1,
    size: Side = None,
    width: Width = None,
    height: Height = None,
    prompts_file: PromptsFile = None,
    upscale: Upscale = 1,
    sheet: SheetPath = None,
    from_: FromPng = None,
    image: ImagePath = None,
    strength: Strength = 1.0,
    mask: MaskPath = None,
    variation_seed: VariationSeed = None,
    variation_strength: VariationStrength = 0.0,
    controlnet: ControlNetPath = None,
    control: ControlPath = None,
    canny: Canny = False,
    control_scale: ControlScale = 1.0,
    control_start: ControlStart = 0.0,
    control_end: ControlEnd = 1.0,
    progress: Progress = True,
    preview: PreviewDir = None,
    lora: Loras = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    beams: Beams = None,
    hires: Hires = None,
    hires_strength: HiresStrength = 0.7,
    vae_tiling: VaeTiling = False,
    frames: Frames = None,
    fps: Fps = 8,
    seconds: Seconds = None,
    seconds_start: SecondsStart = 0.0,
    spectrogram: SpectrogramPath = None,
    vae: VaePath = None,
    motion_adapter: MotionAdapterPath = None,
    tokenizer: TokenizerPath = None,
    model_config: ModelConfig = None,
    device: DeviceName = "auto",
    dtype: DtypeName = "auto",
) -> None:
    """Text → image (or image → image, inpainting, control) with any sampler; writes one PNG
    per image, with the request that draws it in the PNG's text chunks (A1111's "parameters"
    and a "destatic" JSON that --from reads back). A video model writes clips, an audio model
    WAV or FLAC sounds (the request in their metadata, for --from too)."""
    from destatic.sampling import NonFiniteError

    try:
        images, todo, paths = _draw(ctx, out, sheet, preview)
    except (ValueError, ImportError, NonFiniteError) as err:  # CheckpointError is a ValueError
        _fail(err)
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        _fail(f"out of memory ({str(err)[:80]}…); lower -n or --size")
    except OSError as err:  # e.g. a --preview sheet on a disk that filled up while sampling
        from destatic.pipelines.output import describe_os_error

        _fail(f"{err.filename or 'a file'}: {describe_os_error(err)}; fix that, then rerun")
    try:
        _write_images(images, todo, paths, upscale, fps)
        if sheet is not None:
            _write_sheet(images, todo, sheet, fps)
        if spectrogram is not None:
            _write_spectrograms(images, todo, spectrogram)
    except ValueError as err:
        _fail(err)


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
    from destatic.io import CheckpointError, read_json
    from destatic.metrics.audio import (
        is_audio_evaluator_folder,
        load_audio_classifier,
        save_audio_evaluator,
    )
    from destatic.metrics.evaluator import (
        is_evaluator_folder,
        load_image_text_model,
        save_evaluator,
    )
    from destatic.models.registry import load_component, save_component
    from destatic.pipelines import save
    from destatic.pipelines.output import describe_os_error

    try:
        _check_export_dest(source, dest)
        dtype = torch.float16 if half else None
        if is_evaluator_folder(source):
            save_evaluator(load_image_text_model(source), dest, dtype=dtype)
        elif is_audio_evaluator_folder(source):
            save_audio_evaluator(load_audio_classifier(source), dest, dtype=dtype)
        elif (source / "config.json").is_file() and not (source / "model_index.json").is_file():
            component = load_component(source)  # a ControlNet, a VAE, a U-Net, …
            name = read_json(source / "config.json")["_class_name"]
            save_component(
                component, dest, class_name=name, config=component.config.to_dict(), dtype=dtype
            )
        else:
            save(destatic.load(source), dest, half=half)
    except (CheckpointError, ValueError) as err:
        _fail(err)
    except OSError as err:
        _fail(
            f"could not write {dest} ({describe_os_error(err)}); it may be incomplete: delete "
            "it, free space or choose another destination, then rerun"
        )
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    typer.echo(f"wrote {dest} ({size / 1e6:.1f} MB)")


def _check_export_dest(source: Path, dest: Path) -> None:
    """``dest`` is a writable folder other than ``source`` (exporting a folder onto itself
    would overwrite the weights it is reading, as fp16 by default)."""
    from destatic.pipelines.output import check_writable

    if dest.exists() and dest.resolve() == source.resolve():
        raise ValueError(f"{dest} is the source folder; export to another folder")
    check_writable(dest, "destination")


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
    from destatic.io import CheckpointError
    from destatic.training import ConfigError, TrainingError, load_config
    from destatic.training import train as run

    try:
        cfg = load_config(config, dict(_override(s) for s in set_ or []))
        folder = run(cfg, resume=resume)
    except (ConfigError, CheckpointError, TrainingError, OSError) as err:  # OSError: one line too
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"model: {folder}")


EVAL_METRICS = ("retrieval", "clip", "fid", "kid", "pr")


def _eval_video(pipe, scorer, n: int, seed: int, batch: int, out: Path, baseline: str) -> None:
    """``destatic eval`` on a video model: the held-out motion table (destatic.metrics.video)
    as results.md and results.json in ``out``."""
    import json

    import destatic
    from destatic.metrics.video import evaluate_video, video_table

    image_pipe = destatic.load(baseline).to(pipe.device, pipe.dtype) if baseline else None
    rows = evaluate_video(pipe, scorer, n=n, seed=seed, batch_size=batch, image_pipe=image_pipe)
    table = video_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    rows_json = [r.as_dict() for r in rows]
    (out / "results.json").write_text(json.dumps(rows_json, indent=2), encoding="utf-8")
    typer.echo(table)
    typer.echo(f"wrote {out / 'results.md'}, {out / 'results.json'}")


def _eval_audio(pipe, evaluator: Path | None, n: int, seed: int, batch: int, out: Path) -> None:
    """``destatic eval`` on an audio model: the pitch / label / FAD table of held-out and train
    compositions (destatic.metrics.audio) as results.md and results.json, and the spectrograms
    of generated vs real held-out sounds as spectrograms.png, in ``out``."""
    from destatic.io import write_atomic
    from destatic.metrics.audio import audio_table, evaluate_audio, load_audio_evaluator

    scorer = load_audio_evaluator(evaluator)
    rows, sheet = evaluate_audio(pipe, scorer, n=n, seed=seed, batch_size=batch)
    table = audio_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    rows_json = [r.as_dict() for r in rows]
    (out / "results.json").write_text(json.dumps(rows_json, indent=2), encoding="utf-8")
    write_atomic(out / "spectrograms.png", lambda f: sheet.save(f, format="PNG"))
    typer.echo(table)
    typer.echo(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'spectrograms.png'}")


def _token_settings(pipe, counts: list[int], guidance: float, scales: list[float]):
    """A token model's sweep settings: the steps sweep of a MaskGIT model is its passes; an
    autoregressive model is drawn by sampling (temperature 1), greedily and by beam search
    (4 beams) at ``guidance``; the guidance sweep uses the model's default decoder."""
    from destatic.metrics.sweep import Setting

    defaults = pipe.sampling_defaults
    n, decoder = defaults["steps"], defaults["sampler"]
    if decoder == "maskgit":
        steps = [Setting("maskgit", k, guidance) for k in counts if k <= pipe.num_tokens]
        return steps, [Setting("maskgit", n, g) for g in scales]
    steps = [
        Setting("autoregressive", n, guidance, None, (("temperature", t),)) for t in (1.0, 0.0)
    ]
    steps.append(Setting("beam", n, guidance, None, (("beams", 4),)))
    return steps, [Setting("autoregressive", n, g) for g in scales]


def _check_eval_choices(metrics: list[str]) -> None:
    """Known metrics (at least one), checked before any model is loaded."""
    choices = f"choose from {', '.join(EVAL_METRICS)}"
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; {choices}")
    if not metrics:
        raise ValueError(f"--metrics names no metric; {choices}")


def _eval_settings(samplers: str, steps: list[int], scales: list[float], grid: str | None):
    """Every comma-separated sampler (destatic's names or A1111 labels such as "DPM++ 2M
    Karras", whose schedule sets the grid) × steps × guidance scale, as sweep settings."""
    from destatic.metrics.sweep import Setting
    from destatic.sampling.aliases import resolve_sampler

    names = [resolve_sampler(name.strip(), grid) for name in samplers.split(",") if name.strip()]
    return [Setting(s, k, g, sg) for s, sg in names for k in steps for g in scales]


@app.command("eval")
def eval_(
    model: Path = typer.Argument(None, help="Pipeline folder (default: the bundled model)."),
    data: str = typer.Option("emoji", help="Dataset whose held-out split is the reference."),
    data_path: str = typer.Option("", help="The image folder when --data folder."),
    samplers: str = typer.Option("euler,dpmpp_2m,heun", help="Comma-separated samplers."),
    steps: str = typer.Option("1,2,4,8,16,32", help="Comma-separated step counts."),
    grid: str = typer.Option(None, help="σ grid (default: the model's)."),
    guidance: float = typer.Option(
        3.0, min=0.0, max=MAX_GUIDANCE, callback=_finite, help="Guidance scale of the steps sweep."
    ),
    guidance_sweep: str = typer.Option(
        "1,1.5,2,3,4.5,6", help="Guidance scales of the guidance sweep ('' = none)."
    ),
    guidance_sampler: str = typer.Option("dpmpp_2m", help="Sampler of the guidance sweep."),
    guidance_steps: int = typer.Option(16, min=1, max=MAX_STEPS, help="Guidance sweep steps."),
    metrics: str = typer.Option(
        "retrieval,clip,fid,kid,pr", help="retrieval, clip (evaluator); fid, kid, pr (Inception)."
    ),
    evaluator: Path = typer.Option(None, help="Evaluator folder (default: the bundled one)."),
    n: int = typer.Option(0, min=0, help="Held-out prompts to use (0 = all)."),
    size: int = typer.Option(
        0, min=0, max=1024, help="Score at size²: drawn images Lanczos-resized (0 = model's)."
    ),
    seed: int = typer.Option(
        0, min=0, max=2**63 - 1, help="Seed of the first image; the next ones count up."
    ),
    batch_size: int = typer.Option(64, min=1, help="Images generated per batch."),
    out: Path = typer.Option(Path("runs/eval"), "-o", "--out", help="Report folder."),
    baseline: str = typer.Option(
        "emoji", help="Video models: the image model drawing each frame alone ('' = none)."
    ),
    device: DeviceName = "auto",
    dtype: DtypeName = "auto",
) -> None:
    """Quality against steps per sampler and against guidance, on the held-out prompts: a table,
    results.json and plots (quality_vs_nfe.png, quality_vs_guidance.png) in --out, with the
    network GFLOP per image. A token model sweeps its decoders instead of samplers (MaskGIT:
    --steps are its passes; autoregressive: sampling, greedy and 4-beam search)."""
    import destatic
    from destatic.io import CheckpointError
    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import MissingInceptionError
    from destatic.metrics.sweep import reference_set
    from destatic.pipelines.devices import pick_device
    from destatic.pipelines.output import check_writable
    from destatic.sampling import NonFiniteError

    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    try:
        _check_eval_choices(wanted)
        counts = _numbers(steps, maximum=MAX_STEPS)
        step_settings = _eval_settings(samplers, counts, [guidance], grid)
        sweep = guidance_sweep.strip()
        scales = _numbers(sweep, float, 0, MAX_GUIDANCE) if sweep else []
        guide_settings = _eval_settings(guidance_sampler, [guidance_steps], scales, grid)
        check_writable(out, "-o")
        pipe = destatic.load(model).to(*pick_device(device, dtype))
        if pipe.family.media == "video":
            return _eval_video(pipe, load_evaluator(evaluator), n, seed, batch_size, out, baseline)
        if pipe.family.media == "audio":
            return _eval_audio(pipe, evaluator, n, seed, batch_size, out)
        if pipe.family.name == "destatic-tokens":
            step_settings, guide_settings = _token_settings(pipe, counts, guidance, scales)
        reference = reference_set(data, size or pipe.default_size, data_path, n=n, seed=seed)
        scorer = load_evaluator(evaluator) if {"retrieval", "clip"} & set(wanted) else None
        common = dict(evaluator=scorer, metrics=wanted, seed=seed, batch_size=batch_size)
        real, by_steps, by_guidance = _sweeps(
            pipe, step_settings, guide_settings, reference, common
        )
    except (CheckpointError, ValueError, OSError, MissingInceptionError, NonFiniteError) as err:
        _fail(err)
    meta = {
        "model": str(model or destatic.DEFAULT_MODEL),
        "data": data,
        "n": len(reference.prompts),
        "seed": seed,
        "size": reference.images.shape[1],
        "evaluator": str(evaluator or destatic.DEFAULT_EVALUATOR) if scorer else None,
    }
    _write_eval_report(real, by_steps, by_guidance, out, meta)


def _sweeps(pipe, step_settings, guide_settings, reference, common: dict):
    """The real-data row and the rows of both sweeps (with GFLOP per image); the Inception
    network is loaded when a distribution metric is asked for."""
    from destatic.metrics.inception import InceptionFeatures
    from destatic.metrics.sweep import evaluate

    wanted = common["metrics"]
    inception = InceptionFeatures() if {"fid", "kid", "pr"} & set(wanted) else None
    # the reference has the asked size (--size): images drawn at another are resized to it
    common = {**common, "inception": inception, "flops": True, "resize": True}
    real, by_steps = evaluate(pipe, step_settings, reference, **common)
    if not guide_settings:
        return real, by_steps, []
    return real, by_steps, evaluate(pipe, guide_settings, reference, **common)[1]


def _write_eval_report(real, by_steps, by_guidance, out: Path, meta: dict) -> None:
    """The sweep's report (results.md, results.json, plots) in ``out``, echoed."""
    from destatic.metrics.sweep import write_report
    from destatic.pipelines.output import describe_os_error

    title = f"{Path(meta['model']).name} on {meta['data']} held-out (n = {meta['n']})"
    try:
        written = write_report(real, by_steps, by_guidance, out, title=title, meta=meta)
    except OSError as err:
        _fail(f"could not write the report to {out} ({describe_os_error(err)}); rerun")
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
    max_frames: int = typer.Option(64, min=1, help="Most frames per clip (video models)."),
    max_seconds: float = typer.Option(
        30.0, callback=_positive, help="Longest sound in seconds (audio models)."
    ),
    queue: int = typer.Option(16, min=0, help="Requests that may wait behind the running one."),
    controlnet: Path = typer.Option(
        None, help="A ControlNet folder for the Control tab (default: the bundled one)."
    ),
    auth: str = typer.Option(
        None, help="USER:PASSWORD: a login for the UI, HTTP basic auth for the API."
    ),
    token: str = typer.Option(
        None, envvar="DESTATIC_TOKEN", help="Require 'Authorization: Bearer TOKEN' on the API."
    ),
    cors: list[str] = typer.Option(
        None, help="Another site (e.g. https://app.example) whose pages may call the API."
    ),
    device: DeviceName = "auto",
    dtype: DtypeName = "auto",
) -> None:
    """Web UI (text → image, image → image, inpainting; a video model's Video tab, an audio
    model's Audio tab) and HTTP API on one local server."""
    from destatic.io import CheckpointError
    from destatic.pipelines.devices import pick_device
    from destatic.serve import Access, Limits, create_app
    from destatic.serve import serve as run_server
    from destatic.serve.security import exposure_warning

    if auth is not None and ":" not in auth:
        raise typer.BadParameter("expected USER:PASSWORD", param_hint="--auth")
    access = Access(
        auth=tuple(auth.split(":", 1)) if auth else None,
        token=token or None,
        cors=tuple(cors or ()),
    )
    limits = Limits(
        max_side=max_side,
        max_images=max_images,
        max_steps=max_steps,
        max_frames=max_frames,
        max_seconds=max_seconds,
        max_waiting=queue,
    )
    try:
        where, precision = pick_device(device, dtype)
        app_ = create_app(
            model, limits, controlnet=controlnet, access=access, device=where, dtype=precision
        )
    except (CheckpointError, ValueError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if warning := exposure_warning(host, access):
        typer.echo(warning, err=True)
    typer.echo(f"destatic: UI at http://{host}:{port}/  API at http://{host}:{port}/api/health")
    run_server(app_, host=host, port=port)


if __name__ == "__main__":
    app()
