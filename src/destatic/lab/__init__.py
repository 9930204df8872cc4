"""The exact-score lab: a Gaussian mixture's closed-form denoiser as ground truth for samplers."""

from destatic.lab.metrics import rms, sliced_wasserstein
from destatic.lab.mixture import GaussianMixture
from destatic.lab.reference import reference_solution, reference_trajectory
from destatic.lab.runner import LabProblem, LabRow, format_table, run_lab

__all__ = [
    "GaussianMixture",
    "LabProblem",
    "LabRow",
    "format_table",
    "reference_solution",
    "reference_trajectory",
    "rms",
    "run_lab",
    "sliced_wasserstein",
]
