import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The Kalman recursions are many tiny ops: one intra-op thread (see tests/conftest.py)."""
