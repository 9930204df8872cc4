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


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"expected positive integers, got {text!r}")
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
        rows = run_lab(_ints(dims), sampler or None, _ints(nfe), grid, samples, seed, progress=True)
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


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="One or more prompts."),
    model: Path = typer.Option(None, help="Pipeline folder (default: the bundled emoji model)."),
    out: Path = typer.Option(Path("out"), "-o", "--out", help="A .png file, or a folder."),
    negative: str = typer.Option("", help="Negative prompt."),
    steps: int = typer.Option(20, min=1, help="Sampler steps."),
    sampler: str = typer.Option("dpmpp_2m", help="Sampler (destatic samplers lists them)."),
    grid: str = typer.Option(None, help="σ grid (default: karras, or normal for flow models)."),
    guidance: float = typer.Option(3.0, min=0.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Seed of the first image; the next ones count up."),
    num_images: int = typer.Option(1, "-n", "--num-images", min=1, help="Images per prompt."),
    size: int = typer.Option(None, help="Image side in pixels (default: the model's)."),
    upscale: int = typer.Option(1, min=1, max=16, help="Also enlarge the PNG (nearest)."),
    sheet: Path = typer.Option(None, help="Also write all images as one labelled PNG sheet."),
) -> None:
    """Text → image with any sampler; writes one PNG per image."""
    import re

    import destatic
    from destatic.checkpoints import CheckpointError

    try:
        pipe = destatic.load(model)
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
        )
    except (CheckpointError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    names = [p for p in prompt for _ in range(num_images)]
    single = out.suffix.lower() == ".png" and len(images) == 1
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(zip(images, names, strict=True)):
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), 0)
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"
        path = out if single else out / f"{i:03d}-{slug}-seed{seed + i}.png"
        image.save(path)
        typer.echo(f"wrote {path}")
    if sheet is not None:
        import numpy as np
        import torch

        from destatic.training.monitor import save_grid

        arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
        tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
        save_grid(tensor, names, sheet, columns=min(8, len(images)))
        typer.echo(f"wrote {sheet}")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A pipeline folder (e.g. runs/emoji/model)."),
    dest: Path = typer.Argument(..., help="Where to write it."),
    half: bool = typer.Option(True, help="Store weights as fp16 (they load back as fp32)."),
) -> None:
    """Copy a pipeline folder in the diffusers layout, optionally as fp16 safetensors."""
    import destatic
    from destatic.checkpoints import CheckpointError
    from destatic.pipelines import save

    try:
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


if __name__ == "__main__":
    app()
