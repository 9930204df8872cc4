"""Guidance scale against what the notes evaluator measures: the bundled ``notes`` model on every
held-out note (78: instrument × pitch pairs never trained on), seeds 0…, the model's default
sampler and steps, one row per scale — pitch in tune (pYIN ±50 cents), instrument named by the
bundled evaluator, FAD against the real recordings of the same 78 notes (the same reference
for every row).

    python benchmarks/audio_guidance.py               # scales 1.5 2 3 4.5 (about 3 minutes)
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
    from destatic.metrics.audio import audio_table, load_audio_evaluator, score_sounds

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.5])
    args = parser.parse_args()
    pipe = destatic.load("notes")
    rate = pipe.sample_rate
    held = load_notes(rate, progress=False).heldout()
    evaluator = load_audio_evaluator()
    reference = evaluator.predict(held.audio, rate).embedding
    rows = []
    with torch.no_grad():
        for scale in args.scales:
            sounds = []
            for i in range(0, len(held), 16):
                part = held.captions[i : i + 16]
                seeds = list(range(i, i + len(part)))
                sounds.append(pipe.generate(part, guidance=scale, seed=seeds)[:, 0].numpy())
            waves = np.concatenate(sounds)
            name = f"guidance {scale:g}"
            rows.append(
                score_sounds(
                    name, "heldout", waves, rate, held.label, held.pitch, reference, evaluator
                )
            )
    print(audio_table(rows))


if __name__ == "__main__":
    main()
