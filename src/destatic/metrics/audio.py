"""Scores of a text → audio model against real sounds (``destatic eval`` on an audio model;
BENCHMARKS.md, "Audio").

Scorers:

* **pitch** (model-free): the f0 track of probabilistic YIN (Mauch & Dixon 2014, "pYIN",
  ``librosa.pyin``) over its voiced frames, as MIDI ``m = 69 + 12·log2(f0 / 440 Hz)``, median
  over the clip. A sound is *in tune* when ``|m − m_caption| ≤ 0.5`` (±50 cents of the
  caption's note and octave); an **octave error** is a sound out of tune by that test but
  within ±50 cents of the caption's pitch class in another octave (counted apart: pYIN and
  generators both make them); **unvoiced** sounds have no voiced frame at all. pYIN on the real
  notes is the ceiling a generator can reach.
* **label / note accuracy**: the audio evaluator's predicted label (instrument, word, effect)
  and, for pitched sounds, its predicted pitch class and octave
  (:mod:`destatic.models.audio_evaluator`, trained here on the real training sounds).
* **FAD**: the Fréchet distance (:func:`destatic.metrics.distances.frechet_distance`) between
  Gaussians fitted to the evaluator's embeddings of a set and of a reference set of real sounds
  (Kilgour et al. 2019's Fréchet Audio Distance, this evaluator in place of VGGish). FD is biased
  upwards at small n, so the real-vs-real baseline — a second, disjoint set of real sounds of
  the same size — is scored beside it.

For each split (compositions seen in training, and held-out compositions: instrument × pitch
pairs never trained on) the split's real sounds are shuffled with a fixed seed and cut into two
disjoint sets of n: the reference set A and the scored set B. Rows: B's real sounds (the
ceiling, and the FAD baseline), B's real sounds through the model's own autoencoder (encode →
decode: what the vocoder costs before any generation) and the model's sounds for B's captions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from destatic.bundled import DEFAULT_AUDIO_EVALUATOR
from destatic.metrics.distances import frechet_distance
from destatic.models.audio_evaluator import (
    AUDIO_CLASS_NAME,
    AudioClassifier,
    AudioEvaluatorConfig,
    load_reference_clips,
)

__all__ = [
    "DEFAULT_AUDIO_EVALUATOR",
    "AudioEvaluator",
    "AudioScores",
    "PitchScores",
    "audio_table",
    "estimate_midi",
    "evaluate_audio",
    "is_audio_evaluator_folder",
    "load_audio_classifier",
    "load_audio_evaluator",
    "pitch_scores",
    "save_audio_evaluator",
    "score_sounds",
    "spectrogram_sheet",
    "split_sets",
]

#: pYIN's search range: C1 … C8 (32.7 Hz … 4186 Hz), wide enough that an octave error off
#: the notes' C3 … C5 is still seen as a pitch.
PYIN_FMIN, PYIN_FMAX = 32.703, 4186.01
#: pYIN's pitch-bin width in semitones: its Viterbi pass costs ∝ bins², and ¼ semitone keeps
#: the f0 well inside the ±½-semitone tolerance (librosa's default, 0.1, is 6× slower).
PYIN_RESOLUTION = 0.25


def _mono(waveforms: Any) -> np.ndarray:
    """``(B, S)`` float32 from waveforms ``(B, S)`` or ``(B, 1, S)`` (array or tensor)."""
    x = waveforms.detach().cpu().numpy() if torch.is_tensor(waveforms) else np.asarray(waveforms)
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected mono waveforms (B, S) or (B, 1, S), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# pitch
# ---------------------------------------------------------------------------------------------


def estimate_midi(waveforms: Any, sample_rate: int) -> np.ndarray:
    """The median pYIN pitch (fractional MIDI) of each waveform's voiced frames ``(B,)``; NaN for
    a sound with no voiced frame. Frames of ~128 ms (a power of two samples)."""
    import librosa

    x = _mono(waveforms)
    frame = 2 ** round(math.log2(0.128 * sample_rate))
    if x.shape[1] < frame:
        x = np.pad(x, ((0, 0), (0, frame - x.shape[1])))
    fmax = min(PYIN_FMAX, 0.45 * sample_rate)
    f0, voiced, _ = librosa.pyin(
        x,
        fmin=PYIN_FMIN,
        fmax=fmax,
        sr=sample_rate,
        frame_length=frame,
        resolution=PYIN_RESOLUTION,
    )
    midi = np.where(voiced & np.isfinite(f0), librosa.hz_to_midi(np.where(f0 > 0, f0, 1.0)), np.nan)
    out = np.full(len(x), np.nan)
    for i, row in enumerate(midi):
        if np.isfinite(row).any():
            out[i] = np.nanmedian(row)
    return out


@dataclass
class PitchScores:
    """Shares of pitched sounds in tune (±50 cents), an octave off, and with no pitch found."""

    accuracy: float
    octave_errors: float
    unvoiced: float
    n: int


def pitch_scores(estimated: Sequence[float], target: Sequence[int]) -> PitchScores:
    """Score estimated MIDI pitches (NaN: none found) against the captions' (module doc); sounds
    whose target is −1 (unpitched) are left out."""
    est, tgt = np.asarray(estimated, dtype=float), np.asarray(target)
    if est.shape != tgt.shape:
        raise ValueError(f"{est.shape} estimates for {tgt.shape} targets")
    keep = tgt >= 0
    est, tgt = est[keep], tgt[keep]
    if len(tgt) == 0:
        return PitchScores(math.nan, math.nan, math.nan, 0)
    voiced = np.isfinite(est)
    d = np.where(voiced, est - tgt, 0.0)
    in_tune = voiced & (np.abs(d) <= 0.5)
    octave = voiced & ~in_tune & (np.abs(d - 12 * np.round(d / 12)) <= 0.5)
    return PitchScores(
        float(in_tune.mean()), float(octave.mean()), float((~voiced).mean()), len(tgt)
    )


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """The evaluator's reading of a batch of sounds."""

    label: list[str]
    midi: np.ndarray  # predicted pitch class + 12 · octave
    embedding: torch.Tensor  # (B, embed_dim), the FAD features


class AudioEvaluator:
    """An :class:`AudioClassifier` with the :class:`~destatic.models.mel.MelCodec` that makes
    its features: the user-facing scorer of sounds at any sample rate."""

    def __init__(self, model: AudioClassifier):
        from destatic.models.mel import MelCodec, MelCodecConfig

        self.model = model.eval()
        self.codec = MelCodec(MelCodecConfig.from_dict(dict(model.config.mel)))
        if self.codec.config.n_mels != model.config.n_mels:
            raise ValueError(
                f"the evaluator reads {model.config.n_mels} mel bands but its codec makes "
                f"{self.codec.config.n_mels}"
            )

    @property
    def config(self) -> AudioEvaluatorConfig:
        return self.model.config

    @property
    def sample_rate(self) -> int:
        return self.codec.config.sampling_rate

    def features(self, waveforms: Any, sample_rate: int) -> torch.Tensor:
        """Normalised log-mel ``(B, n_mels, frames)`` of waveforms at ``sample_rate``."""
        from destatic.data.audio import resample

        x = resample(_mono(waveforms), int(sample_rate), self.sample_rate)
        return self.codec.latents_from_waveforms(torch.from_numpy(x))

    @torch.no_grad()
    def predict(self, waveforms: Any, sample_rate: int, batch_size: int = 128) -> Predictions:
        """Labels, pitches and embeddings of waveforms ``(B, S)`` / ``(B, 1, S)``."""
        x = _mono(waveforms)
        labels, midi, emb = [], [], []
        for i in range(0, len(x), batch_size):
            e = self.model.embedding(self.features(x[i : i + batch_size], sample_rate))
            logits = self.model.heads(e)
            labels += [self.config.labels[int(k)] for k in logits.label.argmax(1)]
            midi.append(logits.pitch_class.argmax(1) + 12 * logits.octave.argmax(1))
            emb.append(e.float())
        return Predictions(labels, torch.cat(midi).numpy(), torch.cat(emb))

    def embeddings(self, waveforms: Any, sample_rate: int) -> torch.Tensor:
        """The FAD features ``(B, embed_dim)``."""
        return self.predict(waveforms, sample_rate).embedding


def save_audio_evaluator(
    model: AudioClassifier, folder: str | Path, dtype: torch.dtype | None = None
) -> None:
    """``config.json`` + safetensors weights, in the component-folder layout."""
    from destatic.models.registry import save_component

    save_component(
        model, folder, class_name=AUDIO_CLASS_NAME, config=model.config.to_dict(), dtype=dtype
    )


def is_audio_evaluator_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved :class:`AudioClassifier`."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return raw.get("_class_name") == AUDIO_CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def load_audio_classifier(folder: str | Path) -> AudioClassifier:
    """The bare :class:`AudioClassifier` of an evaluator folder, in float32."""
    from destatic.io import CheckpointError, load_weights, read_json
    from destatic.models.registry import load_into

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not an audio evaluator folder (no config.json)")
    raw = read_json(config_path)
    if raw.pop("_class_name", None) != AUDIO_CLASS_NAME:
        raise CheckpointError(f"{config_path} is not an {AUDIO_CLASS_NAME} config")
    try:
        config = AudioEvaluatorConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    model = AudioClassifier(config)
    load_into(model, load_weights(folder), where=str(folder))
    return model.eval()


def load_audio_evaluator(folder: str | Path | None = None) -> AudioEvaluator:
    """The audio evaluator in ``folder`` (default: the bundled notes evaluator)."""
    return AudioEvaluator(load_audio_classifier(folder or DEFAULT_AUDIO_EVALUATOR))


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


@dataclass
class AudioScores:
    """One row of the audio table (see the module docstring)."""

    name: str
    split: str  # "train" or "heldout" compositions
    n: int
    pitch_accuracy: float  # pYIN within ±50 cents of the caption's note
    octave_errors: float
    unvoiced: float
    label_accuracy: float  # the evaluator's label is the caption's
    note_accuracy: float  # the evaluator's pitch class and octave are the caption's
    fad: float  # against the split's reference set A

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_sounds(
    name: str,
    split: str,
    waveforms: Any,
    sample_rate: int,
    labels: Sequence[str],
    midi: Sequence[int],
    reference: torch.Tensor,
    evaluator: AudioEvaluator,
) -> AudioScores:
    """Score sounds made for items with ``labels`` and ``midi`` (−1: unpitched) against the
    reference embeddings ``reference`` (the evaluator's, of real sounds)."""
    x = _mono(waveforms)
    if not len(x) == len(labels) == len(midi):
        raise ValueError(f"{len(x)} sounds for {len(labels)} labels and {len(midi)} pitches")
    seen = evaluator.predict(x, sample_rate)
    pitch = pitch_scores(estimate_midi(x, sample_rate), midi)
    tgt = np.asarray(midi)
    note = (seen.midi == tgt)[tgt >= 0]  # pitch class and octave both right
    return AudioScores(
        name=name,
        split=split,
        n=len(x),
        pitch_accuracy=pitch.accuracy,
        octave_errors=pitch.octave_errors,
        unvoiced=pitch.unvoiced,
        label_accuracy=float(np.mean([a == b for a, b in zip(seen.label, labels, strict=True)])),
        note_accuracy=float(note.mean()) if len(note) else math.nan,
        fad=frechet_distance(reference, seen.embedding),
    )


def audio_table(rows: Sequence[AudioScores]) -> str:
    """The rows as a Markdown table."""
    head = (
        "| compositions | sounds | n | in tune (pYIN ±50¢) | octave errors | unvoiced | "
        "label acc. | note acc. (evaluator) | FAD |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.split} | {r.name} | {r.n} | {r.pitch_accuracy:.3f} | {r.octave_errors:.3f} | "
            f"{r.unvoiced:.3f} | {r.label_accuracy:.3f} | {r.note_accuracy:.3f} | {r.fad:.2f} |"
        )
    lines.append(
        "\nFAD: against a disjoint reference set of real sounds of the same split and size; the "
        "real row's FAD is the real-vs-real baseline."
    )
    return "\n".join(lines)


def split_sets(count: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets (A, B) of ``min(n, count // 2)`` items each (``n`` = 0: as many as
    there are), from a fixed-seed shuffle of ``range(count)``."""
    half = count // 2 if n == 0 else min(n, count // 2)
    if half < 2:
        raise ValueError(f"{count} real sounds are too few for two sets of at least 2")
    order = np.random.default_rng(seed).permutation(count)
    return order[:half], order[half : 2 * half]


def spectrogram_sheet(
    real: Any, generated: Any, sample_rate: int, captions: Sequence[str], columns: int = 8
):
    """A PIL image: per caption, the real sound's mel spectrogram (left) beside the generated
    one's (right), 96 rows, a column per 128 samples of 16 kHz audio; the caption underneath.
    ``columns``: as :func:`destatic.data.sheets.grid_image` (fewer for wide tiles)."""
    from destatic.data.sheets import grid_image
    from destatic.io.audio import spectrogram_image

    real, generated = _mono(real), _mono(generated)
    if not len(real) == len(generated) == len(captions):
        raise ValueError(f"{len(real)} real and {len(generated)} sounds for {len(captions)}")
    hop = max(1, round(128 * sample_rate / 16000))
    draw = [
        [np.asarray(spectrogram_image(w, sample_rate, hop_length=hop, height=96)) for w in pair]
        for pair in zip(real, generated, strict=True)
    ]
    width = max(s.shape[1] for pair in draw for s in pair)
    gap, margin = 4, 16  # white between the pair, and after it (between grid cells)

    def padded(s: np.ndarray, right: int) -> np.ndarray:
        return np.pad(s, ((0, 0), (0, width - s.shape[1] + right), (0, 0)), constant_values=255)

    tiles = [np.concatenate([padded(a, gap), padded(b, margin)], axis=1) for a, b in draw]
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    labels = [f"{c} (real | generated)" for c in captions]
    return grid_image(images, labels, columns=columns, scale=1)


def _draw(pipe: Any, captions: Sequence[str], seed: int, batch_size: int, **fields) -> np.ndarray:
    """One sound per caption (seeds ``seed``, ``seed + 1``, …), mono ``(B, S)``."""
    from destatic.pipelines import GenerationRequest

    out = []
    for i in range(0, len(captions), batch_size):
        part = list(captions[i : i + batch_size])
        seeds = list(range(seed + i, seed + i + len(part)))
        sounds = pipe.run(GenerationRequest(prompt=part, seed=seeds, **fields))
        out.append(_mono(sounds.float().mean(dim=1)))
    return np.concatenate(out)


def _round_trip(codec: Any, waveforms: np.ndarray, batch_size: int) -> np.ndarray:
    """``waveforms`` encoded and decoded by an audio autoencoder (the vocoder's cost)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(waveforms), batch_size):
            x = torch.from_numpy(waveforms[i : i + batch_size])[:, None]
            out.append(_mono(codec.waveforms_from_latents(codec.latents_from_waveforms(x))))
    return np.concatenate(out)


def evaluate_audio(
    pipe: Any,
    evaluator: AudioEvaluator,
    *,
    n: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    **fields: Any,
) -> tuple[list[AudioScores], Any]:
    """The audio table's rows for ``pipe`` on the evaluator's dataset, held-out compositions
    first, and the spectrogram sheet of the held-out ones (module doc). ``n``: sounds per set
    (at most half a split; 0 = half); ``fields``: sampling settings of the requests."""
    from destatic.data.audio import resample

    clips = load_reference_clips(evaluator.config.dataset)
    rate = int(pipe.sample_rate)
    rows, sheet = [], None
    for split, part in (("heldout", clips.heldout()), ("train", clips.train())):
        a, b = split_sets(len(part), n, seed)
        reference = evaluator.embeddings(part.audio[a], part.sample_rate)
        real = resample(part.audio[b], part.sample_rate, rate)
        captions = [part.captions[i] for i in b]
        target = {"labels": [part.label[i] for i in b], "midi": part.pitch[b]}
        common = {"split": split, "sample_rate": rate, "reference": reference, **target}
        generated = _draw(pipe, captions, seed, batch_size, **fields)
        rows += [
            score_sounds("real", waveforms=real, evaluator=evaluator, **common),
            score_sounds(
                "real, autoencoder round trip",
                waveforms=_round_trip(pipe.autoencoder, real, batch_size),
                evaluator=evaluator,
                **common,
            ),
            score_sounds("generated", waveforms=generated, evaluator=evaluator, **common),
        ]
        if sheet is None:
            k = min(16, len(b))
            sheet = spectrogram_sheet(real[:k], generated[:k], rate, captions[:k])
    return rows, sheet
