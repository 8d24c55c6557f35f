import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for a test module (2 CPUs, as on the CI machine)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # put back after the module
        ray.init(num_cpus=2, include_dashboard=False)
        yield
        ray.shutdown()
