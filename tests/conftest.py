"""Shared fixtures: a seeded rng (nilearn style), single-threaded maths for small-tensor tests,
and matplotlib without a display."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """torch and BLAS on one thread for the test (tiny tensors: threads only add overhead and
    run-to-run noise), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)
