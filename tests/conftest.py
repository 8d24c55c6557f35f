import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _reset_kernel_mode():
    """Every test starts in the default kernel mode, whatever the previous one set."""
    import kernels

    previous = kernels.set_mode("reference", True)
    yield
    kernels.set_mode(previous.backend, previous.batch_invariant)


@pytest.fixture(scope="session")
def tiny_model_fp32():
    from rlplat.models import RingLinearForCausalLM, preset

    torch.manual_seed(0)
    model = RingLinearForCausalLM(preset("tiny"))
    model.reset_parameters(seed=0)
    return model.eval()
