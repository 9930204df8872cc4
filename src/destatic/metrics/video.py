"""Scores of a text → video model on held-out motion captions (``destatic eval`` on a video
model; BENCHMARKS.md, "Video").

For each held-out caption (an emoji × motion pair never trained on,
:class:`destatic.data.motion.MotionClips` ``"heldout"``) one clip is drawn and scored by:

* **motion accuracy**: the motion estimated from the frames (:mod:`destatic.metrics.motion`)
  is the caption's; the same estimate on the real rendered clips of those captions is the
  ceiling, 1/10 the chance level;
* **emoji retrieval**: the object cut out of each frame (:func:`~destatic.metrics.motion.
  object_crops`) retrieves the caption's emoji among all emoji names with the evaluator (top-1,
  mean over frames);
* **identity**: the share of frames whose best emoji name is frame 0's (the object stays the
  same emoji over time);
* **flicker**: mean |frame difference|, against the real clips' (a frozen clip scores 0);
* **frame FID/KID**: Fréchet and kernel distance between the generated and the real frames in
  the evaluator's image-embedding space (the Inception network is not used here: it needs
  299² inputs, and the evaluator was trained on these very emoji), with the real-vs-real
  baseline at the same n (two disjoint renderings of the held-out captions).

The baseline ``per-frame image model`` draws each frame independently with an image model from
the same noise (the clip's noise, frame by frame), which shows what the temporal model adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from destatic.metrics.distances import frechet_distance, kernel_distance
from destatic.metrics.evaluator import Evaluator
from destatic.metrics.motion import classify_motion, flicker, object_crops, track

__all__ = [
    "VideoScores",
    "draw_clips",
    "draw_frames_independently",
    "evaluate_video",
    "heldout_captions",
    "score_clips",
    "video_table",
]


@dataclass
class VideoScores:
    """One row of the video table (see the module docstring)."""

    name: str
    n: int
    motion_accuracy: float
    emoji_top1: float
    identity: float
    flicker: float
    fid: float
    kid: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _emoji_and_motion(caption: str) -> tuple[str, str]:
    from destatic.data.motion import parse_caption

    objects = parse_caption(caption)
    if len(objects) != 1:
        raise ValueError(f"score one-object motion captions only, got {caption!r}")
    return objects[0]


def _frames(clips: torch.Tensor) -> torch.Tensor:
    """``(B, 3, F, H, W)`` → ``(B·F, 3, H, W)``, clip-major."""
    b, c, f, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def score_clips(
    name: str,
    clips: torch.Tensor,
    captions: Sequence[str],
    real: torch.Tensor,
    evaluator: Evaluator,
    emoji_names: Sequence[str],
) -> VideoScores:
    """Score ``clips`` ``(B, 3, F, H, W)`` in [0, 1] drawn for one-object ``captions`` against
    ``real`` clips (in [0, 1]); ``emoji_names``: the retrieval candidates."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips for {len(captions)} captions")
    pairs = [_emoji_and_motion(c) for c in captions]
    found = classify_motion(track(clips))
    motion = sum(f == m for f, (_, m) in zip(found, pairs, strict=True)) / len(pairs)
    b, _, f = clips.shape[:3]
    crops = object_crops(clips)
    names = list(dict.fromkeys(emoji_names))
    scores = evaluator.image_features(crops) @ evaluator.text_features(names).T  # (B·F, K)
    best = scores.argmax(1).view(b, f)
    own = torch.tensor([names.index(e) for e, _ in pairs]).view(b, 1)
    fake_features = evaluator.image_features(_frames(clips))
    real_features = evaluator.image_features(_frames(real))
    return VideoScores(
        name=name,
        n=len(captions),
        motion_accuracy=motion,
        emoji_top1=float((best == own).float().mean()),
        identity=float((best == best[:, :1]).float().mean()),
        flicker=flicker(clips),
        fid=frechet_distance(real_features, fake_features),
        kid=kernel_distance(real_features, fake_features).mean,
    )


def video_table(rows: Sequence[VideoScores]) -> str:
    """The rows as a Markdown table."""
    head = "| | n | motion acc. | emoji top-1 | identity | flicker | frame FID | frame KID |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.n} | {r.motion_accuracy:.3f} | {r.emoji_top1:.3f} | "
            f"{r.identity:.3f} | {r.flicker:.4f} | {r.fid:.2f} | {r.kid:.4f} |"
        )
    return "\n".join(lines)


def heldout_captions(clips: Any, n: int = 0) -> tuple[list[str], torch.Tensor]:
    """The main captions of the one-object items of ``clips`` (a ``MotionClips`` split) and
    their item indices; ``n`` > 0 keeps the first n in a fixed shuffled order."""
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))
    keep = [int(i) for i in order if int(clips.objects[i, 1, 0]) < 0]
    keep = keep[:n] if n else keep
    return [clips.captions[i][0] for i in keep], torch.tensor(keep)


def draw_clips(
    pipe: Any, captions: Sequence[str], seed: int, batch_size: int, **fields
) -> torch.Tensor:
    """One clip per caption (seeds ``seed``, ``seed + 1``, …) in [0, 1], batch by batch."""
    from destatic.pipelines import GenerationRequest

    out = []
    for i in range(0, len(captions), batch_size):
        part = list(captions[i : i + batch_size])
        seeds = list(range(seed + i, seed + i + len(part)))
        out.append(pipe.run(GenerationRequest(prompt=part, seed=seeds, **fields)).cpu())
    return torch.cat(out)


def draw_frames_independently(
    image_pipe: Any,
    video_pipe: Any,
    captions: Sequence[str],
    seed: int,
    batch_size: int = 16,
    **fields: Any,
) -> torch.Tensor:
    """The per-frame baseline: each frame drawn by the image model ``image_pipe`` from the
    frame's slice of the noise the video model starts from (same seeds), ``(B, 3, F, H, W)``;
    ``batch_size`` clips' frames per call."""
    from destatic.pipelines import GenerationRequest
    from destatic.sampling import generators, randn

    side = video_pipe.default_size
    clips = []
    for lo in range(0, len(captions), batch_size):
        part = list(captions[lo : lo + batch_size])
        seeds = list(range(seed + lo, seed + lo + len(part)))
        noise = randn(video_pipe.latent_shape(len(part), side, side), generators(seeds))
        frames = noise.shape[2]
        noise = noise.transpose(1, 2).flatten(0, 1)  # (B·F, C, H, W), clip-major
        prompts = [c for c in part for _ in range(frames)]
        request = GenerationRequest(prompt=prompts, seed=seed, **fields)
        drawn = image_pipe.run(request, noise=noise).cpu()  # (B·F, 3, H, W)
        clips.append(drawn.view(len(part), frames, *drawn.shape[1:]).transpose(1, 2))
    return torch.cat(clips)


def evaluate_video(
    pipe: Any,
    evaluator: Evaluator,
    *,
    n: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    image_pipe: Any = None,
    **fields: Any,
) -> list[VideoScores]:
    """The video table's rows for ``pipe`` on the held-out motion captions (``n``: how many;
    0 = all): the real clips rendered a second time (the floor of every distance), the video
    model, and with ``image_pipe`` the per-frame image-model baseline. ``fields``: sampling
    settings of the requests (steps, sampler, guidance, …)."""
    from destatic.data.motion import MotionClips

    frames = int(pipe.network.config.num_frames)
    held = MotionClips(pipe.default_size, frames, "heldout", progress=False)
    captions, index = heldout_captions(held, n)
    real = held.render(index, torch.Generator().manual_seed(seed)) / 2 + 0.5
    again = held.render(index, torch.Generator().manual_seed(seed + 1)) / 2 + 0.5
    score = {"real": real, "evaluator": evaluator, "emoji_names": held.names}
    rows = [score_clips("real clips, second rendering", again, captions, **score)]
    fake = draw_clips(pipe, captions, seed, batch_size, **fields)
    rows.append(score_clips("video model", fake, captions, **score))
    if image_pipe is not None:
        per_frame = draw_frames_independently(
            image_pipe, pipe, captions, seed, batch_size, **fields
        )
        rows.append(score_clips("image model, frame by frame", per_frame, captions, **score))
    return rows
