"""Test set-up: this pytest process simulates 8 ranks (8 virtual CPU devices)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def devices():
    return sorted(jax.devices(), key=lambda d: d.id)


def simulated(n: int):
    """Make this process a simulated job of ``n`` ranks (re-usable with a smaller n)."""
    import dinb

    return dinb.init_ranks("cpu", simulate=n)


@pytest.fixture
def python():
    return sys.executable
