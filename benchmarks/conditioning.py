"""Conditioned generation with the bundled models on held-out emoji: inpainting and Canny-edge
control, each compared with the real image it starts from.

    python benchmarks/conditioning.py          # about 6 minutes on 2 vCPUs (n = 64)

**Inpainting**: the centre 16×16 of each 32×32 image is repainted from its caption. Rows: the plain
default model with the kept region held on its noise path (``KnownRegion``, how any model inpaints),
the inpainting variant (configs/emoji_inpaint.toml: mask and masked image as extra input channels)
as diffusers' inpaint pipeline runs it (free to retouch the kept region), and the same variant with
the kept region held (what ``destatic generate --mask`` and the web UI do). Columns: mean squared
error to the real image inside the hole and outside it, and the seam — the mean absolute jump
between the rows/columns on either side of the hole's border (the real images' own jump is printed
beside it; lower is smoother).

**Control** (configs/emoji_control.toml): each image's Canny edges steer the default model
(caption given), against the same prompts and seeds without control. The score is the edge
F1 between the generated image's Canny edges and the control edges, with a one-pixel tolerance
(an edge pixel counts as matched when the other map has an edge within its 3×3 neighbourhood).
"""

from __future__ import annotations

import argparse
import time

import torch

import destatic
from destatic.data.edges import canny_edges
from destatic.metrics.edges import edge_f1
from destatic.metrics.sweep import reference_set
from destatic.models.registry import load_component

BORDERS = ((7, 8), (23, 24))  # pixel pairs across the edges of the 8:24 hole


def seam(images: torch.Tensor) -> float:
    jumps = [(images[..., a, 8:24] - images[..., b, 8:24]).abs().mean() for a, b in BORDERS]
    jumps += [(images[..., 8:24, a] - images[..., 8:24, b]).abs().mean() for a, b in BORDERS]
    return float(sum(jumps) / len(jumps))


def control_rows(ref, common: dict) -> None:
    pipe = destatic.load()
    net = load_component(destatic.DEFAULT_CONTROLNET)
    edges = canny_edges(ref.images)
    maps = torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255
    print("\n| control | edge F1 against the control edges | seconds |")
    print("|---|---:|---:|")
    for label, extra in (
        ("none (same prompts and seeds)", {}),
        ("bundled ControlNet, scale 1", {"controlnet": net, "control_image": maps}),
    ):
        start = time.perf_counter()
        out = pipe.generate(ref.prompts, **common, **extra)
        seconds = time.perf_counter() - start
        print(f"| {label} | {edge_f1(out, edges):.3f} | {seconds:.0f} |")
    real = torch.from_numpy(ref.images).permute(0, 3, 1, 2).float() / 255
    print(f"| (the real images themselves) | {edge_f1(real, edges):.3f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=64, help="held-out images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference_set("emoji", 32, "", n=args.n, seed=0)
    real = torch.from_numpy(ref.images).permute(0, 3, 1, 2).float() / 255
    mask = torch.zeros(len(ref.prompts), 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    hole = mask.bool().expand_as(real)
    plain, inpainter = destatic.load(), destatic.load(destatic.DEFAULT_INPAINT_MODEL)
    rows = [
        ("default model, kept region held", plain, {}),
        ("inpainting model (as diffusers' inpaint pipeline)", inpainter, {"keep_unmasked": False}),
        ("inpainting model, kept region held (CLI, web UI)", inpainter, {"keep_unmasked": True}),
    ]
    common = {"steps": args.steps, "sampler": "dpmpp_2m", "guidance": 3.0, "seed": 0}
    print(f"n = {len(ref.prompts)} held-out emoji, 16×16 hole, dpmpp_2m {args.steps} steps, cfg 3")
    print(f"real images' own seam: {seam(real):.4f}\n")
    print("| model | MSE in the hole | MSE outside | seam | seconds |")
    print("|---|---:|---:|---:|---:|")
    for label, pipe, extra in rows:
        start = time.perf_counter()
        out = pipe.generate(ref.prompts, image=real, mask=mask, **common, **extra)
        seconds = time.perf_counter() - start
        inside = float(((out - real)[hole] ** 2).mean())
        outside = float(((out - real)[~hole] ** 2).mean())
        print(f"| {label} | {inside:.4f} | {outside:.5f} | {seam(out):.4f} | {seconds:.0f} |")
    control_rows(ref, common)


if __name__ == "__main__":
    main()
