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


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The federation tests' three synthetic sites (`test_federation_support.cohort`)."""
    from test_federation_support import cohort

    return cohort(tmp_path_factory)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The federation tests' tiny config file, as a string path (`test_federation_support.tiny_config`)."""
    from test_federation_support import tiny_config

    return str(tiny_config(tmp_path_factory))
