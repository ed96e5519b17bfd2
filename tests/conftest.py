"""Suite-wide test settings and fixtures."""

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Property tests check correctness, not speed: on a shared, loaded CI machine a single example
# can take longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile("fleetfl", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fleetfl")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: two on a shared 2-core machine are ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
