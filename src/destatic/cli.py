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
