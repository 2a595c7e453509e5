"""Suite-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a small shared machine, more threads than free cores stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
