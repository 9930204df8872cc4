"""Quality of a text → image model against sampler, steps and guidance, on held-out prompts.

For each setting (sampler × steps × guidance) the model draws one image per held-out prompt (the
main caption of each held-out image, seeds ``seed + i``) and is scored against the held-out real
images of the same dataset at the model's resolution:

* prompt adherence with an :class:`~destatic.metrics.evaluator.Evaluator`: top-1 / top-5
  retrieval of each image's prompt among all held-out prompts, and the CLIP-style score;
* distribution quality on FID-Inception features: FID, unbiased KID, precision and recall.

FID is biased upwards at small n, so the report carries the same numbers for real images: the
*real-vs-real* row compares n train images with the n held-out ones, and the evaluator's
retrieval on the real held-out images is the ceiling a generator can reach.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from destatic.metrics.flops import flops_per_image

__all__ = [
    "Reference",
    "Result",
    "Setting",
    "evaluate",
    "reference_set",
    "score_images",
    "write_report",
]

METRICS = ("retrieval", "clip", "fid", "kid", "pr")


@dataclass(frozen=True)
class Setting:
    """One way of drawing: a sampler (or a token model's decoder: ``autoregressive``, ``beam``,
    ``maskgit``), its steps, the guidance scale, the grid, and ``options``: further request
    fields as ``(name, value)`` pairs (a token model's ``temperature``, ``top_k``, ``top_p``,
    ``beams``)."""

    sampler: str
    steps: int
    guidance: float
    grid: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def nfe(self) -> int:
        """Model evaluations (a guided evaluation, batched over cond and uncond, counts once;
        a token decoder's steps are its network passes: one per code with a KV cache, or
        MaskGIT's passes)."""
        from destatic.sampling import sampler_info
        from destatic.sampling.tokens import DECODERS

        if self.sampler in DECODERS:
            return self.steps
        return sampler_info(self.sampler).nfe(self.steps)

    @property
    def label(self) -> str:
        grid = f" {self.grid}" if self.grid else ""
        extra = "".join(f" {k.replace('_', '-')} {v:g}" for k, v in self.options)
        return f"{self.sampler}{grid} {self.steps} steps cfg {self.guidance:g}{extra}"

    def fields(self) -> dict[str, Any]:
        """The :class:`~destatic.pipelines.GenerationRequest` fields this setting sets."""
        base = {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance}
        return {**base, "grid": self.grid, **dict(self.options)}


@dataclass
class Result:
    setting: Setting | None  # None: the real-data row
    nfe: int
    n: int
    top1: float | None = None
    top5: float | None = None
    clip_score: float | None = None
    fid: float | None = None
    kid: float | None = None  # ×10³ in tables; raw here
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    seconds: float = 0.0  # generation time of the n images
    # compositions never trained (an emoji concept in a new skin tone): how often the evaluator
    # picks the asked variant among the concept's variants (Reference.compositions)
    composition: float | None = None
    flops: float | None = None  # network FLOPs of one image (torch.utils.flop_counter)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["label"] = self.setting.label if self.setting else "real images (ceiling / baseline)"
        return d


@dataclass
class Reference:
    """Held-out prompts and real images (uint8 NHWC), and n train images for the baseline."""

    prompts: list[str]
    images: np.ndarray
    train_images: np.ndarray
    dataset: str = ""
    # held-out row → the candidate captions of its composition (its own among them): an emoji
    # in a skin tone its concept was never trained in, against the five tones
    compositions: dict[int, list[str]] = field(default_factory=dict)


def reference_set(
    dataset: str = "emoji", size: int = 32, path: str = "", n: int = 0, seed: int = 0
) -> Reference:
    """The held-out split of a dataset at ``size``² (the first ``n`` items; 0 = all) and as many
    train images drawn at random (``seed``) for the real-vs-real baseline."""
    from destatic.data.select import load_split

    held = load_split(dataset, size, "heldout", path=path)
    if len(held) == 0:
        raise ValueError(f"the {dataset} dataset has no held-out images to evaluate on")
    count = len(held) if n <= 0 else min(n, len(held))
    train = load_split(dataset, size, "train", path=path)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train), size=min(count, len(train)), replace=False))
    prompts = [caps[0] for caps in held.captions[:count]]
    return Reference(
        prompts=prompts,
        images=held.images[:count],
        train_images=train.images[pick],
        dataset=dataset,
        compositions=_unseen_tones(prompts, train.captions) if dataset == "emoji" else {},
    )


def _unseen_tones(prompts: list[str], train_captions: list[list[str]]) -> dict[int, list[str]]:
    """Held-out prompts naming one skin tone whose concept (the name before the colon) the train
    split has in other tones: each with its five tone variants."""
    from destatic.data.emoji import tone_variants

    trained = {c.split(":")[0] for caps in train_captions for c in caps if "skin tone" in c}
    out = {}
    for i, prompt in enumerate(prompts):
        variants = tone_variants(prompt)
        if variants is not None and prompt.split(":")[0] in trained:
            out[i] = variants
    return out


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _distribution_scores(
    result: Result, real: np.ndarray, fake: np.ndarray, metrics: Sequence[str]
) -> None:
    from destatic.metrics.distances import frechet_distance, kernel_distance, precision_recall

    if "fid" in metrics:
        result.fid = float(frechet_distance(real, fake))
    if "kid" in metrics:
        result.kid, result.kid_std = (float(v) for v in kernel_distance(real, fake))
    if "pr" in metrics:
        result.precision, result.recall = (float(v) for v in precision_recall(real, fake))


def _adherence_scores(
    result: Result,
    evaluator,
    images: torch.Tensor,
    prompts: list[str],
    metrics: Sequence[str],
    compositions: dict[int, list[str]] | None = None,
) -> None:
    if "retrieval" in metrics:
        r = evaluator.retrieval(images, prompts)
        result.top1, result.top5 = r.top1, r.top5
        if compositions:
            rows = sorted(compositions)
            right = [
                int(evaluator.ranks(images[i : i + 1], [prompts[i]], compositions[i])[0]) == 0
                for i in rows
            ]
            result.composition = sum(right) / len(rows)
    if "clip" in metrics:
        result.clip_score = evaluator.clip_score(images, prompts)


def _check_metrics(metrics: Sequence[str], evaluator, inception) -> tuple[list, list]:
    """(the prompt-adherence metrics, the distribution metrics) asked for, or a clear error."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    adherence = [m for m in metrics if m in ("retrieval", "clip")]
    distribution = [m for m in metrics if m in ("fid", "kid", "pr")]
    if adherence and evaluator is None:
        raise ValueError(f"metrics {adherence} need an evaluator")
    if distribution and inception is None:
        raise ValueError(f"metrics {distribution} need the Inception network")
    return adherence, distribution


def score_images(
    images: torch.Tensor,
    reference: Reference,
    *,
    evaluator=None,
    inception=None,
    metrics: Sequence[str] = METRICS,
) -> Result:
    """Score images [n, 3, H, W] in [0, 1], row i drawn for ``reference.prompts[i]``, against
    the reference (its real features are cached); the row has no setting: :func:`evaluate` fills
    it in, a caller scoring other images (a tokenizer's round trip) names the row itself."""
    from destatic.metrics.reference import cached_features

    adherence, distribution = _check_metrics(metrics, evaluator, inception)
    if len(images) != len(reference.prompts):
        raise ValueError(f"{len(images)} images for {len(reference.prompts)} prompts")
    result = Result(None, 0, len(images))
    _adherence_scores(
        result, evaluator, images, reference.prompts, adherence, reference.compositions
    )
    if distribution:
        real = cached_features(reference.images, inception, progress=False)
        _distribution_scores(result, real, inception(images), distribution)
    return result


def evaluate(
    pipeline,
    settings: Sequence[Setting],
    reference: Reference,
    *,
    evaluator=None,
    inception=None,
    metrics: Sequence[str] = METRICS,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    flops: bool = False,
    resize: bool = False,
) -> tuple[Result, list[Result]]:
    """(the real-data row, one row per setting). ``evaluator`` is needed for "retrieval" and
    "clip", ``inception`` (an :class:`InceptionFeatures`) for "fid", "kid" and "pr";
    ``flops``: also count the network FLOPs of one image per setting. The reference must have
    the model's resolution unless ``resize``: then the drawn images are resized to the
    reference's (Lanczos, through 8 bits: a 32² model scored against real 64² images, as a user
    would upscale it, beside a 64² model)."""
    from tqdm.auto import tqdm

    from destatic.metrics.reference import cached_features
    from destatic.pipelines.pipeline import lanczos

    adherence, distribution = _check_metrics(metrics, evaluator, inception)
    if not settings:
        raise ValueError("no settings to evaluate")
    side = pipeline.default_size
    target = reference.images.shape[1]
    if reference.images.shape[1:3] != (side, side) and not resize:
        raise ValueError(
            f"the reference images are {reference.images.shape[1]}² but the model draws {side}²;"
            " compare at the same resolution"
        )
    prompts = reference.prompts
    n = len(prompts)

    real = Result(None, 0, n)
    _adherence_scores(
        real, evaluator, _to_float(reference.images), prompts, adherence, reference.compositions
    )
    if distribution:
        real_feats = cached_features(reference.images, inception, progress=progress)
        train_feats = cached_features(reference.train_images, inception, progress=progress)
        _distribution_scores(real, real_feats, train_feats, distribution)

    results = []
    batches = math.ceil(n / batch_size)
    bar = tqdm(total=len(settings) * batches, desc="evaluating", disable=not progress)
    for setting in settings:
        bar.set_postfix_str(setting.label)
        start = time.perf_counter()
        images = []
        for b in range(batches):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            images.append(
                pipeline.generate(
                    prompts[lo:hi], **setting.fields(), seed=list(range(seed + lo, seed + hi))
                )
                .float()
                .cpu()
            )
            if images[-1].shape[-1] != target:
                images[-1] = lanczos(images[-1], target, target)
            bar.update()
        seconds = time.perf_counter() - start
        result = score_images(
            torch.cat(images), reference, evaluator=evaluator, inception=inception, metrics=metrics
        )
        result.setting, result.nfe, result.seconds = setting, setting.nfe, seconds
        if flops:
            result.flops = flops_per_image(pipeline, setting.fields(), prompts[0], seed)
        results.append(result)
    bar.close()
    return real, results


# ---------------------------------------------------------------------------------------------
# Report: JSON, a markdown table and plots


COLUMNS = (  # (field, header, format)
    ("top1", "top-1 %", lambda v: f"{100 * v:.1f}"),
    ("top5", "top-5 %", lambda v: f"{100 * v:.1f}"),
    ("clip_score", "CLIP-style score", lambda v: f"{v:.1f}"),
    ("fid", "FID", lambda v: f"{v:.1f}"),
    ("kid", "KID ×10³", lambda v: f"{1e3 * v:.2f}"),
    ("precision", "precision", lambda v: f"{v:.2f}"),
    ("recall", "recall", lambda v: f"{v:.2f}"),
    ("composition", "unseen tone top-1 %", lambda v: f"{100 * v:.1f}"),
    ("flops", "GFLOP / image", lambda v: f"{v / 1e9:.2f}"),
)


def markdown_table(real: Result, results: Sequence[Result]) -> str:
    """One row per setting, the real-data row first."""
    rows = [real, *results]
    cols = [c for c in COLUMNS if any(getattr(r, c[0]) is not None for r in rows)]
    head = ["setting", "NFE", *(c[1] for c in cols), "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = r.setting.label if r.setting else f"real held-out images (n = {r.n})"
        cells = [label, str(r.nfe) if r.setting else "–"]
        for name, _, fmt in cols:
            v = getattr(r, name)
            cells.append(fmt(v) if v is not None else "–")
        cells.append(f"{r.seconds / max(r.n, 1):.3f}" if r.setting else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(ax, xs, ys, label, marker="o"):
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker=marker, label=label)


def _panels(rows: Sequence[Result]) -> list[tuple[str, str, float]]:
    """(field, title, scale) of the metrics present."""
    wanted = [
        ("top1", "prompt retrieval top-1 (%)", 100.0),
        ("clip_score", "CLIP-style score", 1.0),
        ("fid", "FID (lower is better)", 1.0),
        ("kid", "KID ×10³ (lower is better)", 1e3),
    ]
    return [w for w in wanted if any(getattr(r, w[0]) is not None for r in rows)]


def plot_curves(
    real: Result, results: Sequence[Result], path: Path, *, x: str, group: str, title: str
) -> bool:
    """One panel per metric, one line per ``group`` value ("sampler" or "steps") against ``x``
    ("nfe" or "guidance"); the real-data value as a dashed line. False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(results)
    if not panels or len(results) < 2:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    groups: dict[str, list[Result]] = {}
    for r in results:
        key = r.setting.sampler if group == "sampler" else f"{r.setting.sampler} {r.setting.steps}"
        groups.setdefault(key, []).append(r)
    for ax, (name, label, scale) in zip(axes[0], panels, strict=True):
        for key, rows in groups.items():
            rows = sorted(rows, key=lambda r: r.nfe if x == "nfe" else r.setting.guidance)
            xs = [r.nfe if x == "nfe" else r.setting.guidance for r in rows]
            ys = [None if getattr(r, name) is None else scale * getattr(r, name) for r in rows]
            _plot(ax, xs, ys, key)
        ref = getattr(real, name)
        if ref is not None:
            ax.axhline(scale * ref, color="k", ls="--", lw=1, label="real images")
        if x == "nfe":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE" if x == "nfe" else "guidance scale")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(
    real: Result,
    step_results: Sequence[Result],
    guidance_results: Sequence[Result],
    out: Path,
    *,
    title: str = "",
    meta: dict | None = None,
) -> list[Path]:
    """``results.json``, ``results.md`` and the plots ``quality_vs_nfe.png`` and
    ``quality_vs_guidance.png`` under ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta or {},
        "real": real.to_dict(),
        "steps": [r.to_dict() for r in step_results],
        "guidance": [r.to_dict() for r in guidance_results],
    }
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    md = f"# {title}\n\n" if title else ""
    if step_results:
        md += "## Quality against steps\n\n" + markdown_table(real, step_results) + "\n"
    if guidance_results:
        md += "## Quality against guidance\n\n" + markdown_table(real, guidance_results)
    written[1].write_text(md, encoding="utf-8")
    for rows, name, x, group, what in (
        (step_results, "quality_vs_nfe.png", "nfe", "sampler", "against NFE"),
        (guidance_results, "quality_vs_guidance.png", "guidance", "steps", "against guidance"),
    ):
        path = out / name
        if rows and plot_curves(real, rows, path, x=x, group=group, title=f"{title} {what}"):
            written.append(path)
    return written
