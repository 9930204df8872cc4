import pytest
import torch

from destatic.lab import GaussianMixture

# The tests use tiny tensors: extra intra-op threads only add spin-waiting (100× slower when the
# machine is loaded), so run the whole suite single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    """The lab's 2-D problem: 8 modes of std 0.1 on a circle."""
    return GaussianMixture.standard(2)


@pytest.fixture(scope="session")
def smooth_mixture() -> GaussianMixture:
    """Broad, overlapping modes: a smooth ODE flow, for measuring convergence orders."""
    return GaussianMixture.standard(2, components=4, std=0.5)


@pytest.fixture
def noise() -> torch.Tensor:
    return torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
