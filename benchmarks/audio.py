"""Seconds per clip and seconds of audio per second of compute of the audio pipelines: destatic
against diffusers on the same tiny random folders, seeds or initial latents, steps, guidance and
duration, and the bundled ``notes`` model alone (CPU, fp32, 2 threads unless ``--threads``).

    python benchmarks/audio.py            # each model's default steps, median of 3
    python benchmarks/audio.py --quick    # 3 steps, 0.1 s AudioLDM, batch 1 and 2, 1 run: a check

Cases (the tiny folders the tests build, from tests/):

* Stable Audio — ``StableAudioPipeline`` of tests/test_stable_audio_pipeline.py (T5, a 2-layer
  DiT with grouped-query attention, Oobleck, 1 s of stereo at 32 Hz, of which its decoder makes
  31 samples) with ``CosineDPMSolverMultistepScheduler`` (SDE DPM++ 2M, Brownian-tree noise)
  against the family's ``dpmpp_2m_sde``; both sides draw from the same seed (initial noise and
  Brownian noise: destatic's tree is diffusers'), guidance 7, 100 steps;
* AudioLDM — ``AudioLDMPipeline`` of tests/test_audioldm.py (CLAP, a 2-level U-Net on mel
  latents, ``SpeechT5HifiGan`` at 16 kHz) with DDIM against ``ddim`` on that scheduler's σ,
  from the same initial latents, guidance 2.5, 10 steps, 1 s of audio;
* notes — the bundled text → audio model (src/destatic/assets/notes: a DiT on log-mel frames,
  Griffin–Lim decode), destatic only (diffusers has no counterpart), at batch 1 and 8, its
  default 25 steps; while the asset is not installed, the random tiny model of
  tests/audio_fixtures.py stands in (the row says so).

Each (case, library) runs in a fresh Python process (benchmarks/sides.py) that loads the saved
folder, draws once (the warm-up, whose waveforms are compared: max |Δ| on [-1, 1]), then times
``--repeats`` more; ``--rounds`` such processes per side run in turn (A B A B …) and the fastest
is kept, so that a burst of load on the shared machine slows a round rather than one side.
"audio s/s" is the seconds of audio made per second of compute (batch × duration / seconds per
call); on destatic's side the decoder (``pipe.decode``: Oobleck, VAE + HiFi-GAN, or
Griffin–Lim) is timed inside each call on the sampled latents, and "network" is the rest (text
encoding and sampling). Peak memory is the process's peak resident set, in brackets less the
resident set before the first draw.

Results go to benchmarks/results/audio.md and .json (none with ``--quick`` unless
``--markdown`` says where).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.families import cpu_line
from benchmarks.generation import THREADS
from benchmarks.sides import (
    Draw,
    add_child_options,
    bench,
    max_difference,
    measure_sides,
    run_side,
    save_case,
    seeded,
)

RESULTS = Path(__file__).parent / "results" / "audio.md"
PROMPT = "a dog barking twice"
NOTES = [
    "acoustic grand piano, C4, forte",
    "violin, A4, piano",
    "trumpet, G3, forte",
    "flute, C5, forte",
    "acoustic guitar (nylon), E3, piano",
    "church organ, D4, forte",
    "cello, C3, forte",
    "clarinet, F4, piano",
]
# steps None: each model's default (Stable Audio 100, AudioLDM 10, notes 25)
FULL = {
    "only": None,
    "steps": None,
    "audioldm_seconds": 1.0,
    "batches": "1,8",
    "repeats": 3,
    "rounds": 2,
    "threads": THREADS,
}
QUICK = {
    "only": None,
    "steps": 3,
    "audioldm_seconds": 0.1,
    "batches": "1,2",
    "repeats": 1,
    "rounds": 1,
    "threads": THREADS,
}


# -- the folders and what each side is asked (built once, in the parent process) ----------------


def stable_audio_case(tmp: Path, settings: dict) -> dict:
    """The tiny StableAudioPipeline of tests/test_stable_audio_pipeline.py, its whole length
    (1 s), drawn from seed 0 on both sides (the SDE's Brownian noise included)."""
    from tests.test_stable_audio_pipeline import FRAMES, HOP, SAMPLE_RATE, _tiny_pipeline

    _tiny_pipeline().save_pretrained(tmp / "stable_audio", safe_serialization=True)
    seconds = FRAMES * HOP / SAMPLE_RATE
    steps = settings["steps"] or 100  # StableAudioPipeline's default
    return {
        "family": "Stable Audio",
        "diffusers": "StableAudioPipeline + CosineDPMSolverMultistep (SDE)",
        "pipeline": "StableAudioPipeline",
        "folder": str(tmp / "stable_audio"),
        "steps": steps,
        "batch": 1,
        "prompt": PROMPT,
        "seed": 0,
        "ours": {"seconds": seconds, "steps": steps, "guidance": 7.0, "seed": 0},
        "theirs": {"audio_end_in_s": seconds, "num_inference_steps": steps, "guidance_scale": 7.0},
    }


def audioldm_case(tmp: Path, settings: dict) -> dict:
    """The tiny AudioLDMPipeline of tests/test_audioldm.py (DDIM) and ``ddim`` on the σ of its
    timesteps, from the same initial latents (DDIM's state is x/√(1+σ²))."""
    import diffusers

    from tests.test_audioldm import SCHEDULER, UNET, VOCODER, build_audioldm

    folder = build_audioldm(Path(tempfile.mkdtemp(prefix="audioldm", dir=tmp)))[0]
    seconds, steps = settings["audioldm_seconds"], settings["steps"] or 10
    scheduler = diffusers.DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    alpha = scheduler.alphas_cumprod[scheduler.timesteps].to(torch.float64)
    sigmas = torch.cat([((1 - alpha) / alpha).sqrt(), torch.zeros(1, dtype=torch.float64)])
    start = float(sigmas[0])
    # AudioLDMPipeline's length: ⌊s / (h / sr)⌋ mel frames, up to a multiple of the VAE's 2
    frames = int(seconds / (math.prod(VOCODER["upsample_rates"]) / VOCODER["sampling_rate"]))
    z = torch.randn(1, UNET["in_channels"], -(-frames // 2), VOCODER["model_in_dim"] // 2)
    return {
        "family": "AudioLDM",
        "diffusers": "AudioLDMPipeline + DDIM",
        "pipeline": "AudioLDMPipeline",
        "folder": str(folder),
        "steps": steps,
        "batch": 1,
        "prompt": PROMPT,
        "tensors": {"noise": z, "latents": z * start / math.sqrt(1 + start**2), "sigmas": sigmas},
        "ours": {"seconds": seconds, "sampler": "ddim", "guidance": 2.5},
        "theirs": {
            "audio_length_in_s": seconds,
            "num_inference_steps": steps,
            "guidance_scale": 2.5,
        },
    }


CASES = {"stable_audio": stable_audio_case, "audioldm": audioldm_case}  # and notes, per batch


def notes_case(tmp: Path, settings: dict, batch: int) -> dict:
    """The bundled ``notes`` model at ``batch`` prompts (its default duration and steps; 3
    steps with ``--quick``), or the tiny random stand-in while it is not installed."""
    from destatic.bundled import BUNDLED

    if BUNDLED["notes"].present:
        folder, name = "notes", "notes (bundled)"
    else:
        from destatic.pipelines import save
        from tests.audio_fixtures import tiny_audio_pipeline

        folder, name = str(tmp / "notes_tiny"), "notes stand-in (tests/audio_fixtures.py, random)"
        if not Path(folder).exists():
            save(tiny_audio_pipeline(), folder)
    return {
        "family": name,
        "diffusers": None,
        "folder": folder,
        "steps": settings["steps"],
        "batch": batch,
        "prompt": [NOTES[i % len(NOTES)] for i in range(batch)],
        "ours": {"seed": 0, "steps": settings["steps"]},  # steps None: the model's default
    }


def cases(settings: dict) -> dict:
    """Case name → builder(tmp): those ``settings["only"]`` names (all when None), the notes
    model once per batch size."""
    only = settings["only"] or ["stable_audio", "audioldm", "notes"]
    made = {k: functools.partial(CASES[k], settings=settings) for k in only if k != "notes"}
    if "notes" in only:
        for batch in _batches(settings["batches"]):
            made[f"notes_b{batch}"] = functools.partial(notes_case, settings=settings, batch=batch)
    return made


def _batches(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


# -- one side in a fresh process ----------------------------------------------------------------


def _timed_decode(pipe, parts: dict[str, list[float]]):
    """``pipe.decode`` that appends its seconds to ``parts["decode"]``."""
    decode = pipe.decode

    def timed(latents: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        waveforms = decode(latents)
        parts.setdefault("decode", []).append(time.perf_counter() - t)
        return waveforms

    return timed


def _draw_call(case: dict, side: str, tensors: dict) -> Draw:
    """Drawing the case's waveforms on ``side``, its model loaded: (B, channels, samples) in
    [-1, 1] (AudioLDM's are mono, (B, samples), on both sides)."""
    if side == "destatic":
        import destatic

        pipe = destatic.load(case["folder"])
        parts: dict[str, list[float]] = {}
        pipe.decode = _timed_decode(pipe, parts)
        extra = {k: tensors[k] for k in ("noise", "sigmas") if k in tensors}
        kwargs = {**case["ours"], **extra}
        mono = case.get("pipeline") == "AudioLDMPipeline"
        steps = case["steps"] or pipe.sampling_defaults.get("steps")
        info = {"sample_rate": pipe.sample_rate, "steps": steps}
        return Draw(lambda: _waveforms(pipe.generate(case["prompt"], **kwargs), mono), parts, info)
    import diffusers

    pipe = getattr(diffusers, case["pipeline"]).from_pretrained(case["folder"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**case["theirs"], "output_type": "pt"}
    if "latents" in tensors:
        kwargs["latents"] = tensors["latents"]

    def run() -> np.ndarray:
        generator = seeded(case["seed"]) if "seed" in case else None
        return pipe(case["prompt"], generator=generator, **kwargs).audios.float().numpy()

    return Draw(run)


def _waveforms(audio: torch.Tensor, mono: bool) -> np.ndarray:
    return (audio[:, 0] if mono else audio).float().numpy()


# -- the parent: build, run every side, tabulate ------------------------------------------------


def measure(work: Path, settings: dict) -> list[dict]:
    """One row per case: each side in a fresh process, printed as it finishes."""
    rows = []
    for name, make in cases(settings).items():
        case = save_case(work, name, make(work))
        wanted = ["destatic"] if case["diffusers"] is None else ["destatic", "diffusers"]
        sides = measure_sides(__file__, work, name, wanted, settings)
        row = _row(work, name, case, sides)
        rows.append(row)
        print(table_line(row), flush=True)
    return rows


def _row(work: Path, name: str, case: dict, sides: dict[str, dict]) -> dict:
    """The table's row from both sides' JSON lines (s per clip, audio s/s, memory, Δ)."""
    ours = sides["destatic"]
    waveform = np.load(work / f"{name}-destatic.npy")
    seconds = waveform.shape[-1] / ours["info"]["sample_rate"]
    batch = case["batch"]
    row = {
        "case": case["family"],
        "diffusers": case["diffusers"],
        "seconds_of_audio": round(seconds, 4),
        "sample_rate": ours["info"]["sample_rate"],
        "batch": batch,
        "steps": ours["info"]["steps"],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for side, got in sides.items():
        row[f"{side}_s_per_clip"] = round(got["seconds"] / batch, 4)
        row[f"{side}_audio_s_per_s"] = round(batch * seconds / got["seconds"], 3)
        row[f"{side}_peak_mib"] = round(got["peak_mib"])
        row[f"{side}_sampling_mib"] = round(got["peak_mib"] - got["loaded_mib"])
    decode = ours["parts"].get("decode", 0.0)
    row["destatic_decode_s_per_clip"] = round(decode / batch, 4)
    row["destatic_network_s_per_clip"] = round((ours["seconds"] - decode) / batch, 4)
    if "diffusers" in sides:
        theirs = sides["diffusers"]
        row["ratio"] = round(theirs["seconds"] / ours["seconds"], 3)
        row["cpu_time_ratio"] = round(theirs["cpu_seconds"] / ours["cpu_seconds"], 3)
        row["max_abs_diff"] = float(f"{max_difference(work, name):.3g}")
    return row


HEADER = (
    "| case | diffusers side | audio per clip | batch | steps | destatic s/clip (network + decode) "
    "| diffusers s/clip | diffusers/destatic (CPU time) | destatic audio s/s | diffusers audio s/s "
    "| destatic peak MiB (− loaded) | diffusers peak MiB (− loaded) | max abs Δ | load |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_line(row: dict) -> str:
    def side(key: str, fmt: str) -> str:
        return "—" if key not in row else format(row[key], fmt)

    memory = {
        s: "—"
        if f"{s}_peak_mib" not in row
        else f"{row[f'{s}_peak_mib']} ({row[f'{s}_sampling_mib']})"
        for s in ("destatic", "diffusers")
    }
    ratio = "—" if "ratio" not in row else f"{row['ratio']:.2f}× ({row['cpu_time_ratio']:.2f}×)"
    return (
        f"| {row['case']} | {row['diffusers'] or '—'} "
        f"| {row['seconds_of_audio']:.3g} s at {row['sample_rate']:g} Hz "
        f"| {row['batch']} | {row['steps']} | {row['destatic_s_per_clip']:.4f} "
        f"({row['destatic_network_s_per_clip']:.4f} + {row['destatic_decode_s_per_clip']:.4f}) "
        f"| {side('diffusers_s_per_clip', '.4f')} | {ratio} "
        f"| {row['destatic_audio_s_per_s']:.3g} | {side('diffusers_audio_s_per_s', '.3g')} "
        f"| {memory['destatic']} | {memory['diffusers']} | {side('max_abs_diff', '.3g')} "
        f"| {row['load_average_1min']:.1f} |"
    )


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, batches 1,2, 1 run")
    parser.add_argument(
        "--only", help="cases, comma-separated: stable_audio, audioldm, notes (default all)"
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: each model's)")
    parser.add_argument("--audioldm-seconds", type=float, help="AudioLDM's duration (default 1)")
    parser.add_argument("--batches", help="notes batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--repeats", type=int, help="timed calls per side (default 3)")
    parser.add_argument(
        "--rounds", type=int, help="processes per side, in turn; the fastest kept (default 2)"
    )
    parser.add_argument("--threads", type=int, help=f"torch threads (default {THREADS})")
    parser.add_argument(
        "--markdown", type=Path, help=f"the table's file (default {RESULTS}; none when --quick)"
    )
    add_child_options(parser, None)
    args = parser.parse_args()
    if args.side is not None:  # a child process
        run_side(args.work, args.case, args.side, args.repeats, args.threads, _draw_call)
        return
    chosen = {k: getattr(args, k) for k in FULL if getattr(args, k) is not None}
    settings = {**(QUICK if args.quick else FULL), **chosen}
    try:
        batches = _batches(settings["batches"])
    except ValueError:
        batches = []
    if (
        not batches
        or min(*batches, settings["repeats"], settings["rounds"], settings["threads"]) < 1
    ):
        parser.error("--batches, --repeats, --rounds, --threads must be positive integers")
    if (settings["steps"] or 1) < 1 or not 0 < settings["audioldm_seconds"] <= 2:
        parser.error("--steps must be at least 1; --audioldm-seconds in (0, 2]")
    if settings["only"] is not None:
        settings["only"] = [k.strip() for k in settings["only"].split(",") if k.strip()]
        unknown = set(settings["only"]) - {*CASES, "notes"}
        if unknown or not settings["only"]:
            parser.error(f"--only: unknown case {', '.join(sorted(unknown)) or '(none given)'}")
    markdown = args.markdown or (None if args.quick else RESULTS)
    machine = (
        f"{cpu_line()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{settings['threads']} threads, fp32"
    )
    method = (
        f"Median of {settings['repeats']} calls after one warm-up call per process, each side "
        f"in a fresh process, {settings['rounds']} such processes per side in turn (A B A B …) "
        "and the fastest kept, as the machine is shared; s/clip is seconds per call over the "
        "batch, the ratio in brackets that of the processes' CPU time (all threads), audio s/s "
        "the seconds of audio made per second of compute; destatic's decoder is timed inside "
        "each call (network = the rest); peak memory is the process's peak resident set, in "
        "brackets less the resident set before the first call."
    )
    title = "audio pipelines against diffusers: seconds per clip, audio seconds per second"
    measured = functools.partial(measure, settings=settings)
    bench(title, machine, HEADER, table_line, measured, markdown, method, settings)


if __name__ == "__main__":
    main()
