"""The README's audio examples: the bundled ``notes`` model on instrument × pitch pairs it never
heard (the held-out split of :func:`destatic.data.notes.load_notes`), beside the real notes.

    python benchmarks/audio_examples.py          # writes docs/audio/*.wav and docs/audio/notes.png

For each pair (forte, seed 0, the model's default sampler and steps) it writes the generated
note ``docs/audio/<instrument>-<note>.wav`` (its request in the file: ``destatic generate --from``
replays it), the real note ``…-real.wav``, and one PNG with both spectrograms per row; it
prints the README's table rows.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parents[1]))

OUT = Path(__file__).parents[1] / "docs" / "audio"
PAIRS = 6  # held-out instrument × pitch pairs shown


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9#]+", "-", text.lower()).strip("-").replace("#", "sharp")


def held_out_pairs(clips, count: int) -> list[int]:
    """Indices of ``count`` forte held-out notes, each a different instrument."""
    seen: set[str] = set()
    chosen = []
    for i in np.flatnonzero((clips.split == "heldout") & (np.array(clips.variant) == "forte")):
        if clips.label[i] not in seen:
            seen.add(clips.label[i])
            chosen.append(int(i))
    return chosen[:count]


def main() -> None:
    import destatic
    from destatic.data.notes import load_notes
    from destatic.io.audio import spectrogram_image, write_audio
    from destatic.pipelines import GenerationRequest

    pipe = destatic.load("notes")
    rate = pipe.sample_rate
    clips = load_notes(rate, progress=False)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in held_out_pairs(clips, PAIRS):
        caption = clips.captions[i]
        request = GenerationRequest(prompt=caption, model="notes", seed=0)
        wave = pipe.run(request)[0].numpy()
        name = slug(caption.rsplit(",", 1)[0])
        write_audio(OUT / f"{name}.wav", wave, rate, request.resolved(pipe).to_dict())
        write_audio(OUT / f"{name}-real.wav", clips.audio[i][None], rate)
        pictures = [spectrogram_image(w, rate, height=128) for w in (wave, clips.audio[i])]
        pictures = [p.resize((p.width * 3, p.height), Image.Resampling.NEAREST) for p in pictures]
        rows.append((caption, pictures))
        wav = f"docs/audio/{name}"
        print(f"| {caption} | [{name}.wav]({wav}.wav) | [real]({wav}-real.wav) |")
    sheet(rows).save(OUT / "notes.png")


def sheet(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """Rows of [generated, real] spectrograms under a caption."""
    width, height = rows[0][1][0].size
    label = 18
    out = Image.new("RGB", (2 * width + 30, len(rows) * (height + label) + label), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), "generated", fill="black")
    draw.text((width + 20, 2), "real (held out)", fill="black")
    for r, (caption, pictures) in enumerate(rows):
        top = label + r * (height + label)
        draw.text((4, top + 2), caption, fill="black")
        for c, picture in enumerate(pictures):
            out.paste(picture, (4 + c * (width + 16), top + label))
    return out


if __name__ == "__main__":
    main()
