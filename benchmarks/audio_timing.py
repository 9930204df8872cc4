"""Does the bundled ``notes`` model follow its timing conditioning? For each asked duration it
draws the first ``--n`` held-out notes at full length (one pass of the stages, before the
pipeline cuts to the span) and reports how long they are audible: until the sound stays 40 dB
under its peak (:func:`destatic.training.tasks.audio.audible_seconds`, the measure the model
was trained on).

    python benchmarks/audio_timing.py            # --n 16, guidance: the model's default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))


def main() -> None:
    import destatic
    from destatic.data.notes import load_notes
    from destatic.pipelines import GenerationRequest
    from destatic.training.tasks.audio import audible_seconds

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seconds", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    pipe = destatic.load("notes")
    rate = pipe.sample_rate
    held = load_notes(rate, progress=False).heldout()
    captions = held.captions[: args.n]
    real = audible_seconds(held.audio[: args.n], rate)
    print(f"real notes of these captions: audible {real.mean():.3f} s on average")
    print("| asked (s) | audible, mean (s) | audible, median (s) |")
    print("|---:|---:|---:|")
    with torch.no_grad():
        for seconds in args.seconds:
            request = GenerationRequest(prompt=captions, seconds=seconds, seed=0).resolved(pipe)
            # the stages without the final cut: the whole length the network made
            full = pipe._draw(request, None, None, callback=None, progress=False, preview=None)
            heard = audible_seconds(full[:, 0].numpy(), rate)
            print(f"| {seconds:g} | {heard.mean():.3f} | {np.median(heard):.3f} |")


if __name__ == "__main__":
    main()
