import pytest
import torch

from rlplat.train import TrainBatch


def parts(B=4, T=6):
    ids = torch.randint(2, 100, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 1:4] = True
    return ids, mask, torch.full((B, T), -1.0)


def test_valid_batch_and_derived_views():
    ids, mask, logp = parts()
    mask[3] = False  # an empty response is legal
    b = TrainBatch(ids, mask, logp, group_size=2, rewards_B=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(b.targets_BT[:, :-1], ids[:, 1:])
    assert b.lengths_B.tolist() == [5, 5, 5, 0]
    assert b.num_response_tokens == 9
    assert not b.bad_rows().any()
    sub = b.select(torch.tensor([2, 3]))
    assert sub.group_size == 2 and sub.batch_size == 2
    assert b.select(torch.tensor([1, 2])).group_size == 1  # not whole groups


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(response_mask_BT=torch.zeros(4, 5, dtype=torch.bool)), "expected"),
        (dict(rollout_logp_BT=torch.zeros(4, 5)), "rollout_logp_BT has shape"),
        (dict(rewards_B=torch.zeros(3)), "rewards_B has shape"),
        (dict(rewards_B=None), "exactly one of"),
        (dict(advantages_BT=torch.zeros(4, 6)), "exactly one of"),
        (dict(group_size=3), "whole groups"),
        (dict(input_ids_BT=torch.zeros(4, 6)), "integer"),
        (dict(sentence_ids_BT=torch.zeros(4, 6)), "sentence_ids_BT"),
        (dict(policy_version=-1), "policy_version"),
    ],
)
def test_structural_errors(change, message):
    ids, mask, logp = parts()
    fields = dict(
        input_ids_BT=ids, response_mask_BT=mask, rollout_logp_BT=logp, group_size=2, rewards_B=torch.ones(4)
    )
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        TrainBatch(**fields)


def test_all_masked_and_last_column_are_errors():
    ids, mask, logp = parts()
    with pytest.raises(ValueError, match="no response token"):
        TrainBatch(ids, torch.zeros_like(mask), logp, rewards_B=torch.ones(4))
    mask[:, -1] = True
    with pytest.raises(ValueError, match="shift the response mask"):
        TrainBatch(ids, mask, logp, rewards_B=torch.ones(4))


def test_bad_rows_only_look_at_response_tokens():
    ids, mask, logp = parts()
    logp[0, 5] = float("nan")  # padding: ignored
    logp[1, 2] = float("-inf")
    rewards = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    b = TrainBatch(ids, mask, logp, group_size=2, rewards_B=rewards)
    assert b.bad_rows().tolist() == [False, True, True, False]
