import pytest
import torch

from rlplat.algos.aggregation import AGG_MODES, aggregate_loss, global_normalizer

F64 = torch.float64
NAN = float("nan")

# Five sequences, T = 3 (NaN marks padding):
#   row 0: 1 2 3   n=3  sum 6   mean 2
#   row 1: 4 . .   n=1  sum 4   mean 4
#   row 2: 5 6 .   n=2  sum 11  mean 5.5
#   row 3: . . .   n=0  (empty: counts neither as tokens nor as a sequence)
#   row 4: 3 3 3   n=3  sum 9   mean 3
# Tokens 9, token sum 30, non-empty sequences S = 4, max_len 4.
LOSS_BT = torch.tensor([[1, 2, 3], [4, NAN, NAN], [5, 6, NAN], [NAN, NAN, NAN], [3, 3, 3]], dtype=F64)
MASK_BT = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
MAX_LEN = 4

# mode: (normaliser, loss, d loss / d L_bt per row at valid tokens)
EXPECTED = {
    "token-mean": (9, 30 / 9, [1 / 9] * 5),  # 30 / 9
    "seq-mean-token-sum": (4, 30 / 4, [1 / 4] * 5),  # 30 / 4
    # (2 + 4 + 5.5 + 3) / 4 = 3.625; gradient 1 / (S n_b)
    "seq-mean-token-mean": (4, 3.625, [1 / 12, 1 / 4, 1 / 8, 0.0, 1 / 12]),
    "seq-mean-token-sum-norm": (16, 30 / 16, [1 / 16] * 5),  # 30 / (4 * 4)
}


def _expected_grad_BT(per_row):
    return torch.where(MASK_BT, torch.tensor(per_row, dtype=F64)[:, None].expand(5, 3), 0.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_full_batch_value_and_gradient(mode):
    norm, value, per_row = EXPECTED[mode]
    normalizer = global_normalizer([MASK_BT], mode, max_len=MAX_LEN)
    assert normalizer.dtype == torch.long and int(normalizer) == norm
    loss_BT = LOSS_BT.clone().requires_grad_(True)
    total = aggregate_loss(loss_BT, MASK_BT, mode, normalizer)
    total.backward()
    torch.testing.assert_close(total, torch.tensor(value, dtype=F64))
    torch.testing.assert_close(loss_BT.grad, _expected_grad_BT(per_row))


# Two simulated data-parallel ranks holding uneven micro-batches of rows.
RANK_SPLITS = [[(0, 1), (1, 2)], [(2, 5)]]


@pytest.mark.parametrize("mode", AGG_MODES)
def test_uneven_micro_batches_and_ranks_sum_to_the_full_batch(mode):
    _, value, per_row = EXPECTED[mode]
    # Each rank counts its own micro-batches; the SUM all-reduce is a plain sum here.
    normalizer = sum(
        global_normalizer([MASK_BT[a:b] for a, b in rank], mode, max_len=MAX_LEN) for rank in RANK_SPLITS
    )
    loss_BT = LOSS_BT.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for rank in RANK_SPLITS:
        for a, b in rank:
            micro = aggregate_loss(loss_BT[a:b], MASK_BT[a:b], mode, normalizer)
            micro.backward()  # gradient accumulation: grads add up across micro-batches
            total = total + micro.detach()
    torch.testing.assert_close(total, torch.tensor(value, dtype=F64))
    torch.testing.assert_close(loss_BT.grad, _expected_grad_BT(per_row))


def test_mean_of_means_would_fail_the_split_test():
    # token-mean with micro-batches rows [0, 2) and [2, 5): (1+2+3+4)/4 = 2.5 and (5+6+3+3+3)/5 = 4,
    # mean of means 3.25 != 30 / 9. seq-mean-token-mean with [0,1), [1,4), [4,5): 2, (4 + 5.5)/2, 3
    # -> mean 3.25 != 3.625. The global normaliser gets both right (test above).
    local = [
        aggregate_loss(
            LOSS_BT[a:b], MASK_BT[a:b], "token-mean", global_normalizer([MASK_BT[a:b]], "token-mean")
        )
        for a, b in [(0, 2), (2, 5)]
    ]
    assert abs(float(sum(local)) / 2 - 3.25) < 1e-12
    local = [
        aggregate_loss(
            LOSS_BT[a:b],
            MASK_BT[a:b],
            "seq-mean-token-mean",
            global_normalizer([MASK_BT[a:b]], "seq-mean-token-mean"),
        )
        for a, b in [(0, 1), (1, 4), (4, 5)]
    ]
    assert abs(float(sum(local)) / 3 - 3.25) < 1e-12


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_is_zero_loss_zero_grad(mode):
    mask_BT = torch.zeros(2, 3, dtype=torch.bool)
    normalizer = global_normalizer([mask_BT], mode, max_len=MAX_LEN)
    assert int(normalizer) == 0
    loss_BT = torch.full((2, 3), NAN, dtype=F64, requires_grad=True)
    total = aggregate_loss(loss_BT, mask_BT, mode, normalizer)
    total.backward()
    torch.testing.assert_close(total, torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(loss_BT.grad, torch.zeros(2, 3, dtype=F64))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="aggregation mode"):
        global_normalizer([MASK_BT], "mean-of-means")
    with pytest.raises(ValueError, match="max_len"):
        global_normalizer([MASK_BT], "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="normalizer"):
        aggregate_loss(LOSS_BT, MASK_BT, "token-mean", float("nan"))
    bad_BT = LOSS_BT.clone()
    bad_BT[0, 0] = float("inf")
    with pytest.raises(ValueError, match="loss_BT"):
        aggregate_loss(bad_BT, MASK_BT, "token-mean", 9)
