import pytest
import torch

from rlplat.models import RingLinearForCausalLM, preset
from rlplat.train import TrainBatch


def tiny_model(seed: int = 0) -> RingLinearForCausalLM:
    model = RingLinearForCausalLM(preset("tiny"))
    model.reset_parameters(seed=seed)
    # Spread the routing (random init routes almost uniformly) so expert choices vary between tokens.
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.expert_bias.copy_(torch.randn(16, generator=g) * 0.05)
    return model


def make_batch(B: int = 4, T: int = 12, group_size: int = 2, seed: int = 0, **kw) -> TrainBatch:
    """Random prompt (3 tokens) + response of random length, right-padded with 0; rollout log-probs random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 512, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(2, T - 3, (1,), generator=g))
        mask[b, 2 : 2 + n] = True  # targets ids[3 .. 2+n]
        ids[b, 3 + n :] = 0
    rewards = torch.tensor([float((b * 7 + seed) % 3 == 0) for b in range(B)])
    rewards[0], rewards[1] = 1.0, 0.0  # group 0 always has variance
    logp = torch.where(mask, -torch.rand(B, T, generator=g) * 4, 0.0)
    fields = dict(group_size=group_size, rewards_B=rewards)
    fields.update(kw)
    return TrainBatch(ids, mask, logp, **fields)


def on_policy(trainer, batch: TrainBatch) -> TrainBatch:
    """The batch with rollout log-probs equal to the trainer's own (what an exact rollout reports)."""
    logp, _ = trainer.compute_logprobs(batch)
    batch.rollout_logp_BT = torch.where(batch.response_mask_BT, logp, 0.0)
    return batch


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(name="tiny_model")
def _tiny_model():
    return tiny_model


@pytest.fixture(name="make_batch")
def _make_batch():
    return make_batch


@pytest.fixture(name="on_policy")
def _on_policy():
    return on_policy
