import math

import pytest
import torch

from rlplat.algos.advantages import (
    grpo_advantages,
    reinforce_pp_advantages,
    rewards_at_last_token,
    rloo_advantages,
)

F64 = torch.float64


def test_grpo_unbiased_std_with_eps_on_std_and_broadcast():
    # Group 0 rewards (1, 0, 0, 0): mean 0.25, deviations (0.75, -0.25, -0.25, -0.25),
    # unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5; eps 0.5 on the std -> divide by 1.0.
    # (eps on the variance would divide by sqrt(0.75) = 0.866 instead.)
    # Group 1 rewards all 2: deviations 0 -> advantages 0.
    rewards_B = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2], dtype=F64)
    mask_BT = torch.ones(8, 2, dtype=torch.bool)
    mask_BT[1, 1] = False
    adv_BT = grpo_advantages(rewards_B, mask_BT, group_size=4, eps=0.5)
    expected_B = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=F64)
    expected_BT = expected_B[:, None].expand(8, 2).clone()
    expected_BT[1, 1] = 0.0  # padding
    torch.testing.assert_close(adv_BT, expected_BT)


def test_grpo_eps_zero_gives_plain_z_score():
    # Same group 0 as above with eps 0: 0.75 / 0.5 = 1.5, -0.25 / 0.5 = -0.5.
    adv_BT = grpo_advantages(torch.tensor([1.0, 0, 0, 0]), torch.ones(4, 1), group_size=4, eps=0.0)
    torch.testing.assert_close(adv_BT[:, 0], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_dr_grpo_no_std_and_groups_are_contiguous():
    # Contiguous groups (1, 3) and (5, 6): means 2 and 5.5 -> (-1, 1, -0.5, 0.5).
    # An interleaved layout {1, 5}, {3, 6} would give (-2, -1.5, 2, 1.5).
    adv_BT = grpo_advantages(torch.tensor([1.0, 3, 5, 6]), torch.ones(4, 1), group_size=2, norm_by_std=False)
    torch.testing.assert_close(adv_BT[:, 0], torch.tensor([-1.0, 1.0, -0.5, 0.5]))


def test_rloo_leave_one_out():
    # (2, 4, 6): baselines (4+6)/2 = 5, (2+6)/2 = 4, (2+4)/2 = 3 -> (-3, 0, 3).
    # (1, 0, 0): baselines 0, 0.5, 0.5 -> (1, -0.5, -0.5).
    mask_BT = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0], [1, 1]])
    adv_BT = rloo_advantages(torch.tensor([2.0, 4, 6, 1, 0, 0]), mask_BT, group_size=3)
    expected_BT = torch.tensor([[-3.0, -3.0], [0, 0], [3, 3], [1, 1], [0, 0], [-0.5, -0.5]])
    torch.testing.assert_close(adv_BT, expected_BT)


def test_rewards_at_last_token():
    mask_BT = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    r_BT = rewards_at_last_token(torch.tensor([2.0, 3.0, 4.0]), mask_BT)
    torch.testing.assert_close(r_BT, torch.tensor([[0.0, 2, 0], [3, 0, 0], [0, 0, 0]]))


def test_reinforce_pp_returns_to_go_then_token_whitening():
    # Row 0 rewards (0, 0, 1) -> returns (1, 1, 1); row 1 (0.5, -1, pad) -> returns (-0.5, -1).
    # Valid returns 1, 1, 1, -0.5, -1: mean 1.5 / 5 = 0.3, deviations (0.7, 0.7, 0.7, -0.8, -1.3),
    # sum of squares 3 * 0.49 + 0.64 + 1.69 = 3.8, unbiased var 3.8 / 4 = 0.95.
    token_rewards_BT = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, float("nan")]], dtype=F64)
    mask_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv_BT = reinforce_pp_advantages(token_rewards_BT, mask_BT, eps=0.0)
    std = math.sqrt(0.95)
    expected_BT = torch.tensor([[0.7, 0.7, 0.7], [-0.8, -1.3, 0.0]], dtype=F64) / std
    torch.testing.assert_close(adv_BT, expected_BT)


def test_reinforce_pp_degenerate_batches_are_zero():
    one_token = reinforce_pp_advantages(torch.tensor([[5.0, 0.0]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(one_token, torch.zeros(1, 2))
    none = reinforce_pp_advantages(torch.tensor([[5.0, 1.0]]), torch.zeros(1, 2))
    torch.testing.assert_close(none, torch.zeros(1, 2))


def test_all_masked_grpo_is_zero_not_nan():
    adv_BT = grpo_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2, 3), group_size=2)
    torch.testing.assert_close(adv_BT, torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_raise(bad):
    rewards_B = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match="rewards_B"):
        grpo_advantages(rewards_B, torch.ones(2, 1), group_size=2)
    with pytest.raises(ValueError, match="rewards_B"):
        rloo_advantages(rewards_B, torch.ones(2, 1), group_size=2)
    with pytest.raises(ValueError, match="token_rewards_BT"):
        reinforce_pp_advantages(rewards_B[:, None], torch.ones(2, 1))


def test_bad_group_layout_raises():
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo_advantages(torch.zeros(5), torch.ones(5, 1), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(2), torch.ones(2, 1), group_size=1)
    with pytest.raises(ValueError, match="shape"):
        grpo_advantages(torch.zeros(4), torch.ones(2, 1), group_size=2)
