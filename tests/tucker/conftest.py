import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # the Kalman recursions are many tiny ops: intra-op threads only add contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
