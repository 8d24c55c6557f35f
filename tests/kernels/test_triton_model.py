"""The whole model on the Triton backend (interpreter on CPU): still batch-invariant, and close to the reference."""

import os

import pytest
import torch

import kernels
import kernels._buffers
from rlplat.models import RingLinearForCausalLM, preset

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")
pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"  # compiled kernels read only GPU memory


def test_model_on_triton_backend_is_invariant_and_matches_reference():
    torch.manual_seed(0)
    model = RingLinearForCausalLM(preset("tiny", num_hidden_layers=4)).eval().to(DEVICE)
    seq = torch.randint(2, 512, (7,)).to(DEVICE)
    with torch.no_grad():
        ref, _ = model.token_logprobs(seq[None, :-1], seq[None, 1:])
        with kernels.kernel_mode(backend="triton"):
            full, _ = model.token_logprobs(seq[None, :-1], seq[None, 1:])
            cache = model.new_cache(1)
            steps = [
                model.token_logprobs(seq[None, t : t + 1], seq[None, t + 1 : t + 2], cache=cache)[0][0]
                for t in range(6)
            ]
    assert torch.equal(full[0], torch.cat(steps)), "triton backend: prefill and decode differ"
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
