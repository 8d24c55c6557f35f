import os

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for a test module (2 CPUs, as on the CI machine)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
