import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small dense problems: one intra-op thread (see tests/conftest.py)."""
