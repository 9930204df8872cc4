"""End-to-end seconds per image: destatic's pipeline against diffusers' on the same weights,
sampler, steps, guidance and initial noise (CPU, fp32, 2 threads, interleaved runs).

    python benchmarks/generation.py            # about 3 minutes on 2 vCPUs
    python benchmarks/generation.py --quick

Two models:

* the bundled emoji model (pixel-space U-Net, rectified flow, MiniLM): diffusers has no stock
  pipeline for it, so its side is the loop a diffusers user writes from its components —
  ``UNet2DConditionModel.from_pretrained``, ``FlowMatchEulerDiscreteScheduler`` and the same
  MiniLM encoder — against ``destatic.load()(…, sampler="euler")`` on the scheduler's grid;
* a tiny random Stable Diffusion pipeline (tests/tiny_sd.py) through
  ``StableDiffusionPipeline`` with ``DPMSolverMultistepScheduler`` against ``destatic.load`` with
  ``dpmpp_2m`` on that scheduler's grid: per-step overhead dominates there.

Each timed call is the whole job: prompt encoding, sampling, decoding and PIL conversion. The
images are compared too (max abs difference), so the rows time the same computation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

import destatic

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


def emoji_pair(batch: int, steps: int):
    """(ours, diffusers-components loop) for the bundled model; both return uint8 arrays."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from destatic.models.text import _minilm_dir

    pipe = destatic.load()
    folder = destatic.DEFAULT_MODEL
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    text = AutoModel.from_pretrained(_minilm_dir(), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    max_length = pipe.text_encoder.max_length
    scheduler.set_timesteps(steps)
    sigmas = torch.cat([scheduler.sigmas[:-1] / (1 - scheduler.sigmas[:-1]), torch.zeros(1)])
    sigmas[0] = float("inf") if scheduler.sigmas[0] == 1 else sigmas[0]
    noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def ours() -> np.ndarray:
        images = pipe(
            [PROMPT] * batch, steps=steps, sampler="euler", sigmas=sigmas, guidance=3.0, noise=noise
        )
        return np.stack([np.asarray(im) for im in images])

    @torch.no_grad()
    def theirs() -> np.ndarray:
        tokens = tokenizer(
            [PROMPT] * batch + [""] * batch,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )
        ctx = text(**tokens).last_hidden_state
        scheduler.set_timesteps(steps)
        latents = noise.clone()
        for t in scheduler.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ctx).sample
            cond, uncond = out.chunk(2)
            latents = scheduler.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
        images = (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (images * 255).round().to(torch.uint8).numpy()

    return ours, theirs


def sd_pair(batch: int, steps: int):
    """(ours, StableDiffusionPipeline) on a tiny random SD 1.x pipeline."""
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
    pipe = destatic.load(tmp / "pipe")
    scheduler.set_timesteps(steps)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    start = float(sigmas[0])
    z = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def ours() -> np.ndarray:
        images = pipe(
            [PROMPT] * batch,
            steps=steps,
            sampler="dpmpp_2m",
            sigmas=sigmas,
            guidance=7.5,
            noise=z,
            width=16,
            height=16,
        )
        return np.stack([np.asarray(im) for im in images])

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=7.5,
            latents=z * start / (1 + start**2) ** 0.5,  # VP state x/√(1+σ²)
            height=16,
            width=16,
            output_type="np",
        ).images

    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    reps, warmup = (2, 1) if args.quick else (5, 1)
    print(
        f"# generation, s/image; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {THREADS} threads, median of {reps} interleaved runs\n"
    )
    print(
        "| model | steps | batch | destatic s/image | diffusers s/image | ratio | max Δ (0-255) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, make in (
        ("bundled emoji (pixel U-Net, flow)", emoji_pair),
        ("tiny SD 1.x (latent U-Net + VAE)", sd_pair),
    ):
        for batch in (1, 8):
            steps = 20
            ours, theirs = make(batch, steps)
            t_ours, t_theirs, diff = compare(ours, theirs, batch, warmup, reps)
            print(
                f"| {name} | {steps} | {batch} | {t_ours:.4f} | {t_theirs:.4f} "
                f"| {t_theirs / t_ours:.2f}× | {diff:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
