import math

import torch

from rlplat.algos.losses import ppo_clip_loss
from rlplat.algos.metrics import (
    approx_kl,
    clip_fractions,
    entropy_mean,
    icepop_masked_fraction,
    kl_to_ref,
    masked_mean,
    mismatch_metrics,
)

LN2 = math.log(2.0)
NAN = float("nan")


def test_clip_fractions_over_valid_tokens():
    # Same six tokens as test_losses.test_ppo_clip_low_high_and_dual_clip, plus one padded token:
    # low 1/6, high 1/6, dual 1/6, any 3/6.
    ratios = [1.1, 1.5, 0.5, 0.5, 2.0, 4.0]
    logp_BT = torch.tensor([[math.log(r) for r in ratios] + [NAN]])
    adv_BT = torch.tensor([[1.0, 2, 1, -1, -1, -1, 5]])
    mask_BT = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    out = ppo_clip_loss(
        logp_BT, torch.zeros(1, 7), adv_BT, mask_BT, clip_low=0.2, clip_high=0.28, dual_clip=3.0
    )
    fracs = clip_fractions(out, mask_BT)
    expected = {"clip_frac_low": 1 / 6, "clip_frac_high": 1 / 6, "clip_frac_dual": 1 / 6, "clip_frac": 0.5}
    for name, value in expected.items():
        torch.testing.assert_close(fracs[name], torch.tensor(value), msg=name)


def test_approx_kl_and_kl_to_ref():
    # approx KL(pi_old || pi), samples from pi_old: pi 0.5, pi_old 0.25 -> r = pi / pi_old = 2,
    # k3 = r - 1 - ln r = 1 - ln 2 = 0.3069. Padding ignored.
    logp_BT = torch.tensor([[math.log(0.5), NAN]], dtype=torch.float64)
    old_BT = torch.tensor([[math.log(0.25), 0.0]], dtype=torch.float64)
    mask_BT = torch.tensor([[1, 0]])
    torch.testing.assert_close(
        approx_kl(logp_BT, old_BT, mask_BT), torch.tensor(1 - LN2, dtype=torch.float64)
    )
    # KL(pi || ref) with ref = old: r = pi_ref / pi = 0.5, k3 = 0.5 - 1 + ln 2 = 0.1931; k1 = ln 2.
    torch.testing.assert_close(
        kl_to_ref(logp_BT, old_BT, mask_BT), torch.tensor(LN2 - 0.5, dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_to_ref(logp_BT, old_BT, mask_BT, "k1"), torch.tensor(LN2, dtype=torch.float64)
    )


def test_mismatch_kl_and_max_abs_dlogp():
    # train (0.5, 0.2), rollout (0.25, 0.4). KL(rollout || train) with samples from rollout:
    # r = pi_train / pi_rollout = (2, 0.5): k3 = (1 - ln 2, -0.5 + ln 2), mean 0.25.
    # |dlogp| = (ln 2, ln 2); the padded token's huge difference is ignored.
    train_BT = torch.tensor([[math.log(0.5), math.log(0.2), 50.0]], dtype=torch.float64)
    rollout_BT = torch.tensor([[math.log(0.25), math.log(0.4), -50.0]], dtype=torch.float64)
    out = mismatch_metrics(train_BT, rollout_BT, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out["mismatch_kl"], torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(out["max_abs_dlogp"], torch.tensor(LN2, dtype=torch.float64))


def test_mismatch_kl_is_finite_for_a_wild_token():
    # float32: train - rollout = 99, exp(99) overflows; the k3 term is bounded at a log-ratio of 20 (one token
    # of two: mean (e^20 - 21) / 2), so the metric stays a number and masked_mean does not raise.
    train_BT, rollout_BT = torch.tensor([[-0.5, -1.0]]), torch.tensor([[-99.5, -1.0]])
    out = mismatch_metrics(train_BT, rollout_BT, torch.ones(1, 2))
    torch.testing.assert_close(out["mismatch_kl"], torch.tensor((math.expm1(20.0) - 20.0) / 2))
    torch.testing.assert_close(out["max_abs_dlogp"], torch.tensor(99.0))


def test_entropy_and_icepop_fraction():
    # Entropy mean of (1, 3) with a padded 100: 2.
    torch.testing.assert_close(
        entropy_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])), torch.tensor(2.0)
    )
    # Valid tokens (0,0), (0,1), (0,2), (1,0); IcePop removed (0,1) and (1,0) -> 2 / 4.
    keep_BT = torch.tensor([[1, 0, 1], [0, 0, 0]])
    mask_BT = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(icepop_masked_fraction(keep_BT, mask_BT), torch.tensor(0.5))


def test_all_masked_metrics_are_zero():
    mask_BT = torch.zeros(2, 2)
    nan_BT = torch.full((2, 2), NAN)
    zero = torch.tensor(0.0)
    torch.testing.assert_close(masked_mean(nan_BT, mask_BT), zero)
    torch.testing.assert_close(approx_kl(nan_BT, nan_BT, mask_BT), zero)
    out = mismatch_metrics(nan_BT, nan_BT, mask_BT)
    torch.testing.assert_close(out["mismatch_kl"], zero)
    torch.testing.assert_close(out["max_abs_dlogp"], zero)
    torch.testing.assert_close(icepop_masked_fraction(torch.zeros(2, 2), mask_BT), zero)
    loss_out = ppo_clip_loss(nan_BT, nan_BT, nan_BT, mask_BT)
    for value in clip_fractions(loss_out, mask_BT).values():
        torch.testing.assert_close(value, zero)
