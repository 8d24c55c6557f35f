import pytest
import torch

from rlplat.train import TrainBatch
from rlplat.train.batch import SampleGroups


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


def padded_by_hand(prompts, responses, logprobs, n):
    """The batch as the loop used to build it on the driver, row by row."""
    rows = [(prompts[i // n], r, lp) for i, (r, lp) in enumerate(zip(responses, logprobs, strict=True))]
    T = max(len(p) + len(r) for p, r, _ in rows)
    ids, mask, logp = (
        torch.zeros(len(rows), T, dtype=torch.long),
        torch.zeros(len(rows), T, dtype=torch.bool),
        torch.zeros(len(rows), T),
    )
    for b, (p, r, lp) in enumerate(rows):
        ids[b, : len(p)], ids[b, len(p) : len(p) + len(r)] = (
            torch.tensor(p),
            torch.tensor(r, dtype=torch.long),
        )
        mask[b, len(p) - 1 : len(p) - 1 + len(r)] = True
        logp[b, len(p) - 1 : len(p) - 1 + len(r)] = lp
    return ids, mask, logp


def test_from_groups_is_the_padded_batch_of_its_parts():
    gen = torch.Generator().manual_seed(0)
    n, prompts, responses, logprobs, parts = 3, [], [], [], []
    for num_prompts in (2, 1, 3):  # three rollout shards
        ps = [
            torch.randint(2, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(num_prompts)
        ]
        rs = [
            torch.randint(2, 50, (int(torch.randint(0, 5, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(num_prompts * n)
        ]
        rs[0] = rs[0] or [7]  # at least one response token in the batch
        lps = [-torch.rand(len(r), generator=gen) for r in rs]
        parts.append(SampleGroups.pack(ps, rs, lps, [5 + len(parts)] * len(rs), ["x"] * len(rs)))
        prompts, responses, logprobs = prompts + ps, responses + rs, logprobs + lps
    rewards = torch.rand(len(responses), generator=gen)
    batch = TrainBatch.from_groups(parts, rewards, correctness_B=rewards > 0.5)
    ids, mask, logp = padded_by_hand(prompts, responses, logprobs, n)
    assert torch.equal(batch.input_ids_BT, ids) and torch.equal(batch.response_mask_BT, mask)
    assert torch.equal(batch.rollout_logp_BT, logp)
    assert batch.group_size == n and batch.policy_version == 5 and torch.equal(batch.rewards_B, rewards)
    assert parts[1].responses() == responses[6:9]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt_lengths_G=torch.tensor([0, 3])), "non-empty prompts"),
        (dict(response_lengths_S=torch.tensor([1, 1, 1])), "n samples each"),
        (dict(versions_S=torch.tensor([0])), "one version"),
        (dict(response_logp_R=torch.zeros(1)), "does not add up"),
    ],
)
def test_sample_groups_refuse_inconsistent_parts(change, message):
    good = dict(
        prompt_ids_P=torch.tensor([1, 2, 3]),
        prompt_lengths_G=torch.tensor([1, 2]),
        response_ids_R=torch.tensor([4, 5, 6, 7]),
        response_logp_R=torch.zeros(4),
        response_lengths_S=torch.tensor([1, 1, 2, 0]),
        versions_S=torch.tensor([0, 0, 0, 0]),
    )
    SampleGroups(**good)
    with pytest.raises(ValueError, match=message):
        SampleGroups(**{**good, **change})
