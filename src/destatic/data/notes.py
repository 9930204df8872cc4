"""Instrument notes from Debian's General MIDI SoundFont, an NSynth-like captioned set.

Each note of ``programs`` × ``pitches`` × ``velocities`` is rendered from ``FluidR3_GM.sf2``
(Debian ``fluid-soundfont-gm``: sampled real instruments) with TinySoundFont (PyPI
``tinysoundfont``, installed ``--no-deps``): a note-on held for ``d`` seconds, ``d`` chosen per
note from :data:`HOLD_SECONDS` by a stable hash, then note-off and the instrument's release until
the clip ends (``samples`` samples at ``sample_rate`` Hz); the stereo output is averaged to mono.

Levels: the SoundFont's instruments differ in loudness by ~10× (piano peaks ~0.1, trumpet ~0.6
at the same velocity), which says nothing about the instrument. Each program therefore gets one
fixed gain, ``min(MAX_GAIN, REFERENCE_PEAK / peak(program, C4, velocity 110))``, from a reference
note rendered apart from the set (so it does not depend on the pitches or velocities asked for,
and across the 128 programs it lies in 0.46–10, contrabass's near-silent C4 aside); no clip is
normalised on its own, so piano and forte (and the pitch dependence) stay audible. The rare sample
above 1 is clipped.

Captions: ``"acoustic grand piano, C4, forte"`` — the General MIDI name (lower case), the pitch in
scientific notation with sharps (MIDI 60 = C4, 61 = C#4), the dynamics name. ``label`` is the
instrument name, ``variant`` the dynamics name, ``seconds`` = ``d``. About 10% of the
instrument × pitch pairs (all their velocities) are ``"heldout"``
(:func:`destatic.data.audio.split_of_key`). The set is cached
(:func:`destatic.data.audio.cached_clips`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from destatic.data.audio import AudioClips, cached_clips, split_of_key, stable_hash

__all__ = [
    "DEFAULT_PROGRAMS",
    "GM_PROGRAMS",
    "HOLD_SECONDS",
    "build_notes",
    "hold_seconds",
    "load_notes",
    "note_name",
    "program_number",
]

SOUNDFONT_PATH = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = "apt-get install fluid-soundfont-gm; pip install --no-deps tinysoundfont"

#: The 128 General MIDI program names (program number = index), lower case.
GM_PROGRAMS: tuple[str, ...] = (
    # pianos
    "acoustic grand piano", "bright acoustic piano", "electric grand piano", "honky-tonk piano",
    "electric piano 1", "electric piano 2", "harpsichord", "clavinet",
    # chromatic percussion
    "celesta", "glockenspiel", "music box", "vibraphone",
    "marimba", "xylophone", "tubular bells", "dulcimer",
    # organs
    "drawbar organ", "percussive organ", "rock organ", "church organ",
    "reed organ", "accordion", "harmonica", "tango accordion",
    # guitars
    "acoustic guitar (nylon)", "acoustic guitar (steel)", "electric guitar (jazz)",
    "electric guitar (clean)", "electric guitar (muted)", "overdriven guitar",
    "distortion guitar", "guitar harmonics",
    # basses
    "acoustic bass", "electric bass (finger)", "electric bass (pick)", "fretless bass",
    "slap bass 1", "slap bass 2", "synth bass 1", "synth bass 2",
    # strings
    "violin", "viola", "cello", "contrabass",
    "tremolo strings", "pizzicato strings", "orchestral harp", "timpani",
    # ensembles
    "string ensemble 1", "string ensemble 2", "synth strings 1", "synth strings 2",
    "choir aahs", "voice oohs", "synth voice", "orchestra hit",
    # brass
    "trumpet", "trombone", "tuba", "muted trumpet",
    "french horn", "brass section", "synth brass 1", "synth brass 2",
    # reeds
    "soprano sax", "alto sax", "tenor sax", "baritone sax",
    "oboe", "english horn", "bassoon", "clarinet",
    # pipes
    "piccolo", "flute", "recorder", "pan flute",
    "blown bottle", "shakuhachi", "whistle", "ocarina",
    # synth leads
    "lead 1 (square)", "lead 2 (sawtooth)", "lead 3 (calliope)", "lead 4 (chiff)",
    "lead 5 (charang)", "lead 6 (voice)", "lead 7 (fifths)", "lead 8 (bass + lead)",
    # synth pads
    "pad 1 (new age)", "pad 2 (warm)", "pad 3 (polysynth)", "pad 4 (choir)",
    "pad 5 (bowed)", "pad 6 (metallic)", "pad 7 (halo)", "pad 8 (sweep)",
    # synth effects
    "fx 1 (rain)", "fx 2 (soundtrack)", "fx 3 (crystal)", "fx 4 (atmosphere)",
    "fx 5 (brightness)", "fx 6 (goblins)", "fx 7 (echoes)", "fx 8 (sci-fi)",
    # ethnic
    "sitar", "banjo", "shamisen", "koto",
    "kalimba", "bagpipe", "fiddle", "shanai",
    # percussive
    "tinkle bell", "agogo", "steel drums", "woodblock",
    "taiko drum", "melodic tom", "synth drum", "reverse cymbal",
    # sound effects
    "guitar fret noise", "breath noise", "seashore", "bird tweet",
    "telephone ring", "helicopter", "applause", "gunshot",
)  # fmt: skip

#: 16 programs with clearly different timbres (struck, plucked, bowed, blown, reed, organ, synth).
DEFAULT_PROGRAMS: tuple[int, ...] = (
    0,  # acoustic grand piano
    6,  # harpsichord
    11,  # vibraphone
    12,  # marimba
    19,  # church organ
    21,  # accordion
    24,  # acoustic guitar (nylon)
    29,  # overdriven guitar
    40,  # violin
    42,  # cello
    46,  # orchestral harp
    56,  # trumpet
    65,  # alto sax
    68,  # oboe
    73,  # flute
    80,  # lead 1 (square)
)

DEFAULT_VELOCITIES: Mapping[str, int] = {"piano": 50, "forte": 110}
HOLD_SECONDS: tuple[float, ...] = (0.25, 0.5, 0.75)
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
REFERENCE_PITCH = 60  # C4
REFERENCE_VELOCITY = 110
REFERENCE_PEAK = 0.5  # each program's reference note peaks here; leaves headroom for others
MAX_GAIN = 12.0  # a program nearly silent at C4 (contrabass: gain 64) is not blown up
RENDER_VERSION = 1  # bump when the rendering changes: the cache key includes it


def note_name(pitch: int) -> str:
    """Scientific pitch name with sharps: 60 → ``"C4"``, 66 → ``"F#4"``, 21 → ``"A0"``."""
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def program_number(program: int | str) -> int:
    """A General MIDI program given by number (0–127) or name (as in :data:`GM_PROGRAMS`)."""
    if isinstance(program, str):
        try:
            return GM_PROGRAMS.index(program.strip().lower())
        except ValueError:
            raise ValueError(
                f"unknown General MIDI program {program!r} (names as in "
                f"destatic.data.notes.GM_PROGRAMS, e.g. 'acoustic grand piano')"
            ) from None
    if not 0 <= int(program) < 128:
        raise ValueError(f"General MIDI program must be 0–127, got {program}")
    return int(program)


def hold_seconds(program: int, pitch: int, dynamics: str) -> float:
    """How long the note is held before note-off: one of :data:`HOLD_SECONDS`, by stable hash."""
    key = f"{GM_PROGRAMS[program]} | {pitch} | {dynamics}"
    return HOLD_SECONDS[stable_hash(key) % len(HOLD_SECONDS)]


class _Renderer:
    """TinySoundFont on channel 0: one note at a time, silenced in between."""

    def __init__(self, sample_rate: int):
        try:
            import tinysoundfont
        except ImportError as e:
            raise ImportError(f"tinysoundfont is not installed: {INSTALL_HINT}") from e
        if not SOUNDFONT_PATH.is_file():
            raise FileNotFoundError(f"{SOUNDFONT_PATH} not found: {INSTALL_HINT}")
        self.sample_rate = sample_rate
        self.synth = tinysoundfont.Synth(samplerate=sample_rate)
        self.sfid = self.synth.sfload(str(SOUNDFONT_PATH))
        self.program = -1

    def _frames(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, np.float32)
        stereo = np.frombuffer(self.synth.generate(n), dtype=np.float32).reshape(-1, 2)
        return stereo.mean(axis=1)

    def note(self, program: int, pitch: int, velocity: int, hold: float, samples: int):
        """Mono float32 ``(samples,)``: note-on for ``hold`` s, then note-off and release."""
        if program != self.program:
            self.synth.program_select(0, self.sfid, 0, program)
            self.program = program
        self.synth.sounds_off(0)
        on = min(samples, round(hold * self.sample_rate))
        self.synth.noteon(0, pitch, velocity)
        held = self._frames(on)
        self.synth.noteoff(0, pitch)
        released = self._frames(samples - on)
        self.synth.sounds_off(0)
        return np.concatenate([held, released])

    def gain(self, program: int, samples: int) -> float:
        """The fixed gain that brings ``program``'s reference note to :data:`REFERENCE_PEAK`."""
        ref = self.note(program, REFERENCE_PITCH, REFERENCE_VELOCITY, HOLD_SECONDS[-1], samples)
        peak = float(np.abs(ref).max())
        return min(MAX_GAIN, REFERENCE_PEAK / peak) if peak > 0 else 1.0


def build_notes(
    sample_rate: int = 16000,
    samples: int = 16384,
    programs: Sequence[int | str] = DEFAULT_PROGRAMS,
    pitches: Sequence[int] = range(48, 73),
    velocities: Mapping[str, int] = DEFAULT_VELOCITIES,
    progress: bool = True,
) -> AudioClips:
    """Render the set (no cache; see the module docstring)."""
    from tqdm import tqdm

    numbers = [program_number(p) for p in programs]
    renderer = _Renderer(sample_rate)
    ref_samples = round((HOLD_SECONDS[-1] + 0.25) * sample_rate)
    jobs = [(p, pitch, dyn) for p in numbers for pitch in pitches for dyn in velocities]
    audio = np.zeros((len(jobs), samples), np.float32)
    captions, labels, variants, splits, pitch_of, seconds = [], [], [], [], [], []
    gains: dict[int, float] = {}
    for i, (program, pitch, dyn) in enumerate(
        tqdm(jobs, desc="notes", unit="note", disable=not progress)
    ):
        if program not in gains:
            gains[program] = renderer.gain(program, ref_samples)
        hold = hold_seconds(program, pitch, dyn)
        clip = renderer.note(program, pitch, velocities[dyn], hold, samples)
        audio[i] = np.clip(clip * gains[program], -1.0, 1.0)
        name = GM_PROGRAMS[program]
        captions.append(f"{name}, {note_name(pitch)}, {dyn}")
        labels.append(name)
        variants.append(dyn)
        splits.append(split_of_key(name, note_name(pitch)))
        pitch_of.append(pitch)
        seconds.append(min(hold, samples / sample_rate))
    return AudioClips(
        audio=audio,
        captions=captions,
        split=np.array(splits, dtype="<U7"),
        label=labels,
        pitch=np.array(pitch_of, dtype=np.int64),
        variant=variants,
        seconds=np.array(seconds, dtype=np.float32),
        sample_rate=sample_rate,
    )


def load_notes(
    sample_rate: int = 16000,
    samples: int = 16384,
    programs: Sequence[int | str] = DEFAULT_PROGRAMS,
    pitches: Sequence[int] = range(48, 73),
    velocities: Mapping[str, int] = DEFAULT_VELOCITIES,
    progress: bool = True,
    cache: bool = True,
) -> AudioClips:
    """The notes set (module docstring), from the cache when built before with these settings."""
    if sample_rate < 1 or samples < 1:
        raise ValueError(f"sample_rate and samples must be positive, got {sample_rate}, {samples}")
    if not pitches or not velocities or not programs:
        raise ValueError("programs, pitches and velocities must each name at least one")
    for p in pitches:
        if not 0 <= int(p) < 128:
            raise ValueError(f"MIDI pitch must be 0–127, got {p}")
    for dyn, v in velocities.items():
        if not 1 <= int(v) <= 127:
            raise ValueError(f"velocity for {dyn!r} must be 1–127, got {v}")
    numbers = [program_number(p) for p in programs]
    settings = {
        "render": RENDER_VERSION,
        "soundfont": str(SOUNDFONT_PATH),
        "soundfont_bytes": SOUNDFONT_PATH.stat().st_size if SOUNDFONT_PATH.is_file() else 0,
        "sample_rate": int(sample_rate),
        "samples": int(samples),
        "programs": numbers,
        "pitches": [int(p) for p in pitches],
        "velocities": {k: int(v) for k, v in velocities.items()},
    }
    return cached_clips(
        "notes",
        settings,
        lambda: build_notes(sample_rate, samples, numbers, pitches, velocities, progress),
        cache=cache,
    )
