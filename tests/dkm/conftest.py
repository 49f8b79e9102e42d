import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The DKM tests are many small linear-algebra calls: on a shared 2-core machine one
    intra-op thread is ~20x faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
