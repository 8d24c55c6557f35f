import math

import pytest
import torch

from rlplat.algos.kl import (
    entropy_bonus,
    entropy_from_logits,
    fold_kl_into_sequence_rewards,
    fold_kl_into_token_rewards,
    kl_estimate,
)

F64 = torch.float64
LN2 = math.log(2.0)

# Token 0: pi 0.5, pi_ref 0.25 -> x = ln 2, r = pi_ref / pi = 0.5.
# Token 1: pi 0.2, pi_ref 0.4  -> x = -ln 2, r = 2.
# Token 2: padding (NaN must be ignored).
LOGP_BT = [[math.log(0.5), math.log(0.2), float("nan")]]
REF_BT = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]], dtype=F64)
MASK_BT = torch.tensor([[1, 1, 0]])


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", [LN2, -LN2, 0.0]),  # x
        ("k2", [LN2**2 / 2, LN2**2 / 2, 0.0]),  # x^2 / 2 = 0.2402
        ("k3", [0.5 - 1 + LN2, 2 - 1 - LN2, 0.0]),  # r - 1 - ln r = 0.1931, 0.3069
    ],
)
def test_kl_estimators(estimator, expected):
    logp_BT = torch.tensor(LOGP_BT, dtype=F64)
    kl_BT = kl_estimate(logp_BT, REF_BT, MASK_BT, estimator)
    torch.testing.assert_close(kl_BT, torch.tensor([expected], dtype=F64))


def test_k3_as_loss_term_gradient():
    # d k3 / d logp = d/dx (e^-x - 1 + x) = 1 - r: 1 - 0.5 = 0.5 and 1 - 2 = -1; padding 0.
    logp_BT = torch.tensor(LOGP_BT, dtype=F64, requires_grad=True)
    kl_estimate(logp_BT, REF_BT, MASK_BT, "k3").sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.5, -1.0, 0.0]], dtype=F64))


def test_k3_is_finite_when_pi_is_far_below_the_reference():
    # float32, x = log pi - log pi_ref = -99.5: e^-x = e^99.5 overflows (inf, and NaN gradient) without the
    # bound; bounded at x = -20: k3 = e^20 - 1 - 20, no gradient. x = +99.5 is not bounded: e^-x underflows to
    # 0, k3 = 98.5 and the gradient 1 - e^-x = 1 keep pulling pi down toward pi_ref.
    logp_BT = torch.tensor([[-99.5, 99.5]], requires_grad=True)
    kl_BT = kl_estimate(logp_BT, torch.zeros(1, 2), torch.ones(1, 2), "k3")
    torch.testing.assert_close(kl_BT, torch.tensor([[math.expm1(20.0) - 20.0, 98.5]]))
    kl_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.0, 1.0]]))


def test_fold_kl_into_token_and_sequence_rewards():
    # Tokens: (0, 1) - 0.1 * (0.5, 0.25) = (-0.05, 0.975).
    out_BT = fold_kl_into_token_rewards(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), beta=0.1
    )
    torch.testing.assert_close(out_BT, torch.tensor([[-0.05, 0.975]]))
    # Sequences: 1 - 0.1 * (0.5 + 0.25) = 0.925; 2 - 0.1 * 1.0 = 1.9 (NaN padding ignored).
    kl_BT = torch.tensor([[0.5, 0.25], [1.0, float("nan")]])
    out_B = fold_kl_into_sequence_rewards(
        torch.tensor([1.0, 2.0]), kl_BT, torch.tensor([[1, 1], [1, 0]]), 0.1
    )
    torch.testing.assert_close(out_B, torch.tensor([0.925, 1.9]))


def test_entropy_from_logits():
    # Uniform over 2: ln 2. p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.34657 + 0.21576.
    # One banned token (-inf): entropy of the single remaining token is 0, with finite gradient.
    logits_BTV = torch.tensor(
        [[[0.0, 0.0], [0.0, math.log(3.0)], [0.0, float("-inf")]]], dtype=F64, requires_grad=True
    )
    h_BT = entropy_from_logits(logits_BTV)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(h_BT, torch.tensor([[LN2, expected, 0.0]], dtype=torch.float32))
    h_BT.sum().backward()
    assert torch.isfinite(logits_BTV.grad).all()
    with pytest.raises(ValueError, match="logits_BTV"):
        entropy_from_logits(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match="every logit is -inf"):
        entropy_from_logits(torch.full((1, 1, 2), float("-inf")))


def test_entropy_bonus_term():
    # -0.01 * 2.0 = -0.02 at the valid token, 0 at padding.
    out_BT = entropy_bonus(torch.tensor([[2.0, 1.0]]), torch.tensor([[1, 0]]), coef=0.01)
    torch.testing.assert_close(out_BT, torch.tensor([[-0.02, 0.0]]))


def test_non_finite_and_unknown_estimator_raise():
    with pytest.raises(ValueError, match="ref_logp_BT"):
        kl_estimate(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k4")
    with pytest.raises(ValueError, match="rewards_B"):
        fold_kl_into_sequence_rewards(torch.tensor([float("inf")]), torch.zeros(1, 2), torch.ones(1, 2), 0.1)


def test_all_masked_kl_is_zero():
    kl_BT = kl_estimate(torch.full((1, 2), float("nan")), torch.zeros(1, 2), torch.zeros(1, 2))
    torch.testing.assert_close(kl_BT, torch.zeros(1, 2))
