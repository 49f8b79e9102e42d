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


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored afterwards): for many small
    tensor ops (Kalman recursions, small dense solves), extra threads only add
    contention on a 2-core runner. Sub-packages request it from an autouse fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
