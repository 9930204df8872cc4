"""Choose a token model's guidance and decoding on *train* prompts, so the held-out table that
reports it is not also the set it was tuned on: FID against the train images of those prompts
(another n train images give the real-vs-real floor) and top-1 retrieval among those prompts.

    python benchmarks/token_guidance.py runs/emoji_ar/model --scales 1,1.5,2,3,4 --n 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import numpy as np
import torch

import destatic
from destatic.data.select import load_split
from destatic.metrics.sweep import Reference, Setting, evaluate, markdown_table


def train_reference(n: int, seed: int) -> Reference:
    """n train prompts with their images, and n other train images for the floor."""
    train = load_split("emoji", 32, "train")
    pick = np.random.default_rng(seed).permutation(len(train))
    own, other = pick[:n], pick[n : 2 * n]
    prompts = [train.captions[i][0] for i in own]
    return Reference(prompts, train.images[own], train.images[other], "emoji")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--scales", default="1,1.5,2,3,4")
    p.add_argument("--options", default="", help="e.g. top_k=64 (one decoding for every row)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seed", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(2)
    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import InceptionFeatures

    pipe = destatic.load(args.model)
    d = pipe.sampling_defaults
    options = tuple(
        (k, float(v) if "." in v else int(v))
        for k, v in (o.split("=") for o in args.options.split(",") if o)
    )
    settings = [
        Setting(d["sampler"], d["steps"], float(w), None, options) for w in args.scales.split(",")
    ]
    reference = train_reference(args.n, args.seed)
    real, rows = evaluate(
        pipe,
        settings,
        reference,
        evaluator=load_evaluator(),
        inception=InceptionFeatures(),
        metrics=["fid", "kid", "retrieval"],
        seed=args.seed,
    )
    print(markdown_table(real, rows))


if __name__ == "__main__":
    main()
