import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean():
    """Every test starts from the same seed and an empty Pyro param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def f64():
    return torch.float64
