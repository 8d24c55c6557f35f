import math

import pytest
import torch

from rlplat.algos.corrections import (
    icepop_mask,
    select_old_logp,
    sequence_rejection_mask,
    sequence_tis_weights,
    token_tis_weights,
)

F64 = torch.float64
NAN = float("nan")


def _ratios(ratios_BT):
    """(old_logp, rollout_logp) with pi_old / pi_rollout = the given ratios; None marks padding."""
    old_BT = torch.tensor(
        [[math.log(r) if r is not None else NAN for r in row] for row in ratios_BT], dtype=F64
    )
    rollout_BT = torch.where(torch.isnan(old_BT), NAN, 0.0).to(F64)
    mask_BT = ~torch.isnan(old_BT)
    return old_BT, rollout_BT, mask_BT


# Row 0 ratios (1.5, 3, 0.5): product 2.25, geometric mean 2.25^(1/3) = 1.310.
# Row 1 ratios (0.5, 0.8, pad): product 0.4, geometric mean sqrt(0.4) = 0.632.
# Row 2 ratios (1.2, 1.5, pad): product 1.8, geometric mean sqrt(1.8) = 1.342.
# Row 3 empty.
RATIOS = [[1.5, 3.0, 0.5], [0.5, 0.8, None], [1.2, 1.5, None], [None, None, None]]


def test_token_tis_truncates_each_token():
    old_BT, rollout_BT, mask_BT = _ratios(RATIOS)
    w_BT = token_tis_weights(old_BT, rollout_BT, mask_BT, cap=2.0)
    # min(r, 2) per valid token, 0 at padding.
    expected = [[1.5, 2.0, 0.5], [0.5, 0.8, 0], [1.2, 1.5, 0], [0, 0, 0]]
    torch.testing.assert_close(w_BT, torch.tensor(expected, dtype=F64))


def test_sequence_tis_truncates_the_product():
    old_BT, rollout_BT, mask_BT = _ratios(RATIOS)
    w_BT = sequence_tis_weights(old_BT, rollout_BT, mask_BT, cap=2.0)
    # min(2.25, 2) = 2, 0.4, 1.8, broadcast to valid tokens.
    expected = [[2.0, 2.0, 2.0], [0.4, 0.4, 0], [1.8, 1.8, 0], [0, 0, 0]]
    torch.testing.assert_close(w_BT, torch.tensor(expected, dtype=F64))


def test_sequence_tis_does_not_overflow_on_long_sequences():
    # 1000 tokens at ratio e: the product e^1000 overflows float32/64 but is capped at 2 in log space.
    old_BT = torch.ones(1, 1000)
    w_BT = sequence_tis_weights(old_BT, torch.zeros(1, 1000), torch.ones(1, 1000), cap=2.0)
    torch.testing.assert_close(w_BT, torch.full((1, 1000), 2.0))


def test_extreme_log_ratios_stay_finite_and_keep_their_decisions():
    # float32 deltas of ±99.5 (exp overflows / underflows): TIS weights are the cap and 0, finite. IcePop and
    # MIS compare in log space, unclamped: with bounds far beyond e^20 (1e10 = e^23) a delta of 99.5 is still
    # outside them (a ±20 clamp would wrongly keep it), and -99.5 is below any lower bound.
    old_BT = torch.tensor([[99.5, -99.5]])
    rollout_BT, mask_BT = torch.zeros(1, 2), torch.ones(1, 2)
    torch.testing.assert_close(
        token_tis_weights(old_BT, rollout_BT, mask_BT, cap=2.0), torch.tensor([[2.0, 0]])
    )
    seq_BT = sequence_tis_weights(old_BT[:, :1], rollout_BT[:, :1], mask_BT[:, :1], cap=2.0)
    torch.testing.assert_close(seq_BT, torch.tensor([[2.0]]))
    keep_BT, _ = icepop_mask(old_BT, rollout_BT, mask_BT, alpha=1e-10, beta=1e10)
    assert keep_BT.tolist() == [[False, False]]
    mis = sequence_rejection_mask(old_BT.T, rollout_BT.T, mask_BT.T, low=1e-10, high=1e10)
    assert mis.keep_B.tolist() == [False, False]


def test_icepop_mask_and_fraction():
    # [alpha, beta] = [0.5, 2] -> (0.6 keep, 3 drop, 1.9 keep), (0.4 drop, 0.8 keep); 2 of 5 valid masked.
    old_BT, rollout_BT, mask_BT = _ratios([[0.6, 3.0, 1.9], [0.4, 0.8, None]])
    keep_BT, frac = icepop_mask(old_BT, rollout_BT, mask_BT, alpha=0.5, beta=2.0)
    assert keep_BT.tolist() == [[True, False, True], [False, True, False]]
    torch.testing.assert_close(frac, torch.tensor(0.4))


def test_icepop_all_masked():
    keep_BT, frac = icepop_mask(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    assert not keep_BT.any()
    torch.testing.assert_close(frac, torch.tensor(0.0))


def test_sequence_rejection_product_and_geometric():
    old_BT, rollout_BT, mask_BT = _ratios(RATIOS)
    # Product in [0.5, 2]: 2.25 out, 0.4 out, 1.8 in; the empty row is kept and not counted -> 2/3 rejected.
    keep_B, keep_BT, frac = sequence_rejection_mask(old_BT, rollout_BT, mask_BT, low=0.5, high=2.0)
    assert keep_B.tolist() == [False, False, True, True]
    assert keep_BT.tolist() == [[False] * 3, [False] * 3, [True, True, False], [False] * 3]
    torch.testing.assert_close(frac, torch.tensor(2 / 3))
    # Geometric means 1.310, 0.632, 1.342 are all inside [0.5, 2].
    keep_B, _, frac = sequence_rejection_mask(
        old_BT, rollout_BT, mask_BT, low=0.5, high=2.0, ratio="geometric"
    )
    assert keep_B.all()
    torch.testing.assert_close(frac, torch.tensor(0.0))


def test_select_old_logp():
    rollout_BT, recomputed_BT = torch.zeros(1, 2), torch.ones(1, 2)
    assert torch.equal(select_old_logp(rollout_BT, recomputed_BT, use_rollout_logp=True), rollout_BT)
    assert torch.equal(select_old_logp(rollout_BT, recomputed_BT, use_rollout_logp=False), recomputed_BT)
    assert torch.equal(select_old_logp(rollout_BT, None, use_rollout_logp=True), rollout_BT)
    with pytest.raises(ValueError, match="recomputed_logp_BT"):
        select_old_logp(rollout_BT, None, use_rollout_logp=False)


def test_non_finite_and_bad_bounds_raise():
    bad_BT = torch.tensor([[0.0, float("inf")]])
    with pytest.raises(ValueError, match="rollout_logp_BT"):
        token_tis_weights(torch.zeros(1, 2), bad_BT, torch.ones(1, 2))
    with pytest.raises(ValueError, match="train_logp_BT"):
        icepop_mask(bad_BT, torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="alpha"):
        icepop_mask(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), alpha=2.0, beta=5.0)
    with pytest.raises(ValueError, match="low"):
        sequence_rejection_mask(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), low=1.5)
