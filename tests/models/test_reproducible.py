"""A seed's run is reproducible: the same batch gives bitwise the same gradients every time, with several threads.

Threads racing to accumulate into one element (a gather with repeated indices has such a backward) add in
whatever order they finish, so the gradients, and from them a whole run, drift apart after a few dozen steps.
This holds for any batch on one thread, so the test runs on two.
"""

import pytest
import torch

from rlplat.models import RingLinearForCausalLM, preset


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("trial", range(2))
def test_backward_is_bitwise_reproducible(two_threads, trial):
    cfg = preset("tiny")
    model = RingLinearForCausalLM(cfg)
    model.reset_parameters(seed=trial)
    # enough tokens that each expert of every MoE layer sees many, and k > 1 rows per token
    ids = torch.randint(0, cfg.vocab_size, (32, 40), generator=torch.Generator().manual_seed(trial))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        logp, _ = model.token_logprobs(ids[:, :-1], ids[:, 1:])
        logp.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = gradients()
    for _ in range(3):
        again = gradients()
        differs = [n for n in first if not torch.equal(first[n], again[n])]
        assert not differs, f"{len(differs)} gradients differ between identical backwards, e.g. {differs[:3]}"
