"""Test set-up: this pytest process simulates 8 ranks (8 virtual CPU devices)."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def devices():
    return sorted(jax.devices(), key=lambda d: d.id)


def simulated(n: int):
    """Make this process a simulated job of ``n`` ranks (re-usable with a smaller n)."""
    import dinb

    return dinb.init_ranks("cpu", simulate=n)
