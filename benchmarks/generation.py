"""End-to-end seconds per image: destatic's pipeline against diffusers' on the same weights,
sampler, steps, guidance and initial noise, in fp32 and in bf16 (CPU, 2 threads, interleaved).

    python benchmarks/generation.py            # about 4 minutes on 2 vCPUs
    python benchmarks/generation.py --quick --fast dpmpp_2m:8

Two models:

* the bundled emoji model (pixel-space U-Net, rectified flow, MiniLM): diffusers has no stock
  pipeline for it, so its side is the loop a diffusers user writes from its components —
  ``UNet2DConditionModel.from_pretrained``, ``FlowMatchEulerDiscreteScheduler`` and the same
  MiniLM encoder — against ``destatic.load()(…, sampler="euler")`` on the scheduler's grid;
* a tiny random Stable Diffusion pipeline (tests/tiny_sd.py) through
  ``StableDiffusionPipeline`` with ``DPMSolverMultistepScheduler`` against ``destatic.load`` with
  ``dpmpp_2m`` on that scheduler's grid: per-step overhead dominates there.

Sides: each library in fp32, and given bf16 — destatic's ``.to(dtype="bf16")`` (bf16 network,
channels_last convolutions on the CPU, fp32 sampler state) against diffusers' bf16 weights,
bf16 latents and channels_last (its documented speed advice). The bundled model also gets a
fewer-steps row (``--fast``): destatic bf16 with another sampler at fewer steps on the model's
own grid, whose quality BENCHMARKS.md shows to be equal (held-out FID and retrieval).

Each timed call is the whole job: prompt encoding, sampling, decoding and PIL conversion. Every
side's images are compared with diffusers' fp32 images (max and mean pixel difference, 0–255).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

import destatic
from destatic.pipelines.devices import DTYPES, cpu_description

THREADS = 2
PROMPT = "red heart"


def interleaved(fns: list[Callable[[], object]], warmup: int, reps: int) -> list[float]:
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def pixels(images) -> np.ndarray:
    """Images as float pixel values 0-255: uint8 arrays as they are, [0, 1] floats scaled and
    rounded as a PIL conversion would."""
    images = np.asarray(images)
    return images.astype(float) if images.dtype == np.uint8 else (images * 255).round()


def destatic_grid(scheduler) -> torch.Tensor:
    """A diffusers flow scheduler's σ_t (after set_timesteps) as destatic's σ = t/(1-t) grid."""
    s = scheduler.sigmas.to(torch.float64)
    grid = torch.cat([s[:-1] / (1 - s[:-1]), torch.zeros(1, dtype=torch.float64)])
    if s[0] == 1:
        grid[0] = math.inf
    return grid


class DiffusersLoop:
    """The bundled network driven by any diffusers scheduler, as a diffusers user writes it:
    ``UNet2DConditionModel`` and the MiniLM encoder from transformers in ``dtype`` (bf16 with
    channels_last), latents in ``dtype``, classifier-free guidance on one cond + uncond batch.
    :func:`emoji_sides` runs it with the model's FlowMatchEuler scheduler, time_to_quality.py
    with DPM-Solver++ and UniPC too."""

    def __init__(self, dtype: torch.dtype):
        from diffusers import UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        from destatic.models.text import _minilm_dir

        folder = destatic.DEFAULT_MODEL
        self.dtype = dtype
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        self.unet.eval()
        minilm = _minilm_dir()
        self.text = AutoModel.from_pretrained(minilm, local_files_only=True).eval().to(dtype)
        if dtype != torch.float32:  # what diffusers' docs advise for speed
            self.unet.to(memory_format=torch.channels_last)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
        self.max_length = destatic.load().text_encoder.max_length

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        noise: torch.Tensor,
        scheduler,
        steps: int,
        guidance: float,
        exact_t: bool = False,
    ) -> torch.Tensor:
        """Images [B, 3, 32, 32] in [0, 1] (float32) from unit ``noise``; ``exact_t`` feeds
        the network σ_t·1000 rather than the scheduler's (integer-rounded) timesteps."""
        batch = len(prompts)
        tokens = self.tokenizer(
            [*prompts, *[""] * batch],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ctx = self.text(**tokens).last_hidden_state
        scheduler.set_timesteps(steps)
        latents = noise.to(self.dtype)
        for i, t in enumerate(scheduler.timesteps):
            t_in = scheduler.sigmas[i] * scheduler.config.num_train_timesteps if exact_t else t
            out = self.unet(torch.cat([latents] * 2), t_in, encoder_hidden_states=ctx).sample
            cond, uncond = out.chunk(2)
            guided = uncond + guidance * (cond - uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)


def uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] → uint8 [B, H, W, 3], rounded as a saved PNG is."""
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def emoji_sides(batch: int, steps: int, fast: tuple[str, int]) -> dict[str, Callable]:
    """The bundled model's sides, each returning uint8 arrays: destatic in fp32 and bf16 on the
    scheduler's grid, destatic bf16 with the ``fast`` (sampler, steps) on its own grid, and the
    loop a diffusers user writes from the components, in fp32 and in bf16 + channels_last."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        destatic.DEFAULT_MODEL / "scheduler"
    )
    scheduler.set_timesteps(steps)
    sigmas = destatic_grid(scheduler)
    noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def ours(dtype: str, sampler: str = "euler", n: int = steps, grid=sigmas) -> Callable:
        pipe = destatic.load().to(dtype=dtype)
        options = {"sigmas": grid} if grid is not None else {}
        prompts = [PROMPT] * batch

        def run() -> np.ndarray:
            images = pipe(prompts, steps=n, sampler=sampler, guidance=3.0, noise=noise, **options)
            return np.stack([np.asarray(im) for im in images])

        return run

    def theirs(dtype: torch.dtype) -> Callable:
        loop = DiffusersLoop(dtype)
        return lambda: uint8(loop([PROMPT] * batch, noise, scheduler, steps, 3.0))

    sampler, n = fast
    return {
        "destatic fp32": ours("fp32"),
        "destatic bf16": ours("bf16"),
        f"destatic bf16, {sampler} {n} steps": ours("bf16", sampler, n, None),
        "diffusers fp32": theirs(torch.float32),
        "diffusers bf16": theirs(torch.bfloat16),
    }


def sd_sides(
    batch: int, steps: int, fast: tuple[str, int] | None = None, precisions=("fp32", "bf16")
) -> dict[str, Callable]:
    """A tiny random SD 1.x pipeline: destatic against StableDiffusionPipeline in each of
    ``precisions`` (diffusers' bf16 with channels_last); returns [0, 1] floats or uint8. Its
    random weights have no quality to hold, so it has no fewer-steps row (``fast`` is unused)."""
    import diffusers

    from tests import tiny_sd

    tmp = Path(tempfile.mkdtemp())
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    reference = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp / "pipe", safe_serialization=True)
    scheduler.set_timesteps(steps)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    start = float(sigmas[0])
    z = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def ours(dtype: str) -> Callable:
        pipe = destatic.load(tmp / "pipe").to(dtype=dtype)
        return lambda: np.stack([np.asarray(im) for im in draw(pipe)])

    def draw(pipe):
        return pipe(
            [PROMPT] * batch,
            steps=steps,
            sampler="dpmpp_2m",
            sigmas=sigmas,
            guidance=7.5,
            noise=z,
            width=16,
            height=16,
        )

    def theirs(dtype: torch.dtype) -> Callable:
        reference.to(torch.float32)  # the pipeline is built once; each side casts a copy
        pipe = copy.deepcopy(reference).to(dtype=dtype)
        if dtype != torch.float32:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        noise = (z * start / (1 + start**2) ** 0.5).to(dtype)  # VP state x/√(1+σ²)
        return lambda: run(pipe, noise)

    def run(pipe, noise) -> np.ndarray:
        return pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=7.5,
            latents=noise,
            height=16,
            width=16,
            output_type="np",
        ).images.astype(np.float32)

    sides = {f"destatic {p}": ours(p) for p in precisions}
    return sides | {f"diffusers {p}": theirs(DTYPES[p]) for p in precisions}


def sd_pair(batch: int, steps: int) -> tuple[Callable, Callable]:
    """(destatic, StableDiffusionPipeline) in fp32 on the tiny SD pipeline (for :func:`compare`;
    benchmarks/families.py's SD 1.x row)."""
    sides = sd_sides(batch, steps, precisions=("fp32",))
    return sides["destatic fp32"], sides["diffusers fp32"]


def compare(
    ours: Callable[[], object], theirs: Callable[[], object], batch: int, warmup: int, reps: int
) -> tuple[float, float, float]:
    """(destatic s/image, diffusers s/image, max pixel difference 0-255) of two calls that each
    return a batch of images (PIL-derived uint8 or [0, 1] floats); timed by :func:`interleaved`
    after one call of each for the images."""
    a, b = pixels(ours()), pixels(theirs())
    diff = float(np.abs(a - b.reshape(a.shape)).max())
    t_ours, t_theirs = interleaved([ours, theirs], warmup, reps)
    return t_ours / batch, t_theirs / batch, diff


def measure(sides: dict[str, Callable], batch: int, warmup: int, reps: int) -> list[tuple]:
    """(side, s/image, diffusers fp32 s/image ÷ this, max and mean pixel Δ (0-255) from diffusers
    fp32's image) of every side, timed by :func:`interleaved`."""
    reference = pixels(sides["diffusers fp32"]())
    rows = []
    times = interleaved(list(sides.values()), warmup, reps)
    base = times[list(sides).index("diffusers fp32")]
    for (name, fn), t in zip(sides.items(), times, strict=True):
        delta = np.abs(pixels(fn()).reshape(reference.shape) - reference)
        rows.append((name, t / batch, base / t, float(delta.max()), float(delta.mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--fast",
        default="dpmpp_2m:8",
        help="sampler:steps of the bundled model's fewer-steps row (default dpmpp_2m:8)",
    )
    args = parser.parse_args()
    sampler, n = args.fast.split(":")
    torch.set_num_threads(THREADS)
    reps, warmup = (2, 1) if args.quick else (5, 1)
    print(
        f"# generation, s/image; {cpu_description()}, torch {torch.__version__}, "
        f"median of {reps} interleaved runs\n"
    )
    print("| model | batch | side | s/image | diffusers fp32 ÷ side | max Δ | mean Δ |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, make in (
        ("bundled emoji (pixel U-Net, flow), 20 steps", emoji_sides),
        ("tiny SD 1.x (latent U-Net + VAE), 20 steps", sd_sides),
    ):
        for batch in (1, 8):
            sides = make(batch, 20, (sampler, int(n)))
            for side, t, ratio, top, mean in measure(sides, batch, warmup, reps):
                print(
                    f"| {name} | {batch} | {side} | {t:.4f} | {ratio:.2f}× | {top:.0f} "
                    f"| {mean:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
