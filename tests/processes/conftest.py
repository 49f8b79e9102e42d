import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # small dense problems: intra-op threads only add contention on a 2-core runner
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
