import math

import pytest
import torch

from rlplat.algos.aggregation import aggregate_loss
from rlplat.algos.losses import gspo_loss, lpo_loss, ppo_clip_loss, unit_mean_log_ratio

F64 = torch.float64
NAN = float("nan")


def _logp(log_ratios_BT):
    """Current log-probs (leaf, with grad) and old log-probs 0, so logp - old = the given log-ratios."""
    logp_BT = torch.tensor(log_ratios_BT, dtype=F64, requires_grad=True)
    return logp_BT, torch.zeros_like(logp_BT)


def test_ppo_clip_low_high_and_dual_clip():
    # eps_low 0.2, eps_high 0.28, dual c = 3. loss = max(-A r, -A clip(r, 0.8, 1.28)), then for A < 0
    # min(loss, -A c). d loss / d logp = -A r on the unclipped branch, 0 on a clipped one.
    #   r=1.1, A=+1: max(-1.1, -1.1) = -1.1                      grad -1.1
    #   r=1.5, A=+2: max(-3.0, -2.56) = -2.56 (high clip)          grad 0
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5                        grad -0.5
    #   r=0.5, A=-1: max(0.5, 0.8) = 0.8 (low clip)                grad 0
    #   r=2.0, A=-1: max(2.0, 1.28) = 2.0, min(2.0, 3) = 2.0       grad 2.0
    #   r=4.0, A=-1: max(4.0, 1.28) = 4.0, min(4.0, 3) = 3 (dual)  grad 0
    # Row 1 is padding (NaN log-probs must be ignored).
    ratios = [1.1, 1.5, 0.5, 0.5, 2.0, 4.0]
    logp_BT = torch.tensor([[math.log(r) for r in ratios], [NAN] * 6], dtype=F64, requires_grad=True)
    old_BT = torch.zeros(2, 6, dtype=F64)
    adv_BT = torch.tensor([[1.0, 2, 1, -1, -1, -1], [0] * 6], dtype=F64)
    mask_BT = torch.tensor([[1] * 6, [0] * 6])
    out = ppo_clip_loss(logp_BT, old_BT, adv_BT, mask_BT, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(out.loss_BT[0], torch.tensor([-1.1, -2.56, -0.5, 0.8, 2.0, 3.0], dtype=F64))
    torch.testing.assert_close(out.loss_BT[1], torch.zeros(6, dtype=F64))
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad[0], torch.tensor([-1.1, 0, -0.5, 0, 2.0, 0], dtype=F64))
    torch.testing.assert_close(logp_BT.grad[1], torch.zeros(6, dtype=F64))
    assert out.clipped_low_BT[0].tolist() == [False, False, False, True, False, False]
    assert out.clipped_high_BT[0].tolist() == [False, True, False, False, False, False]
    assert out.clipped_dual_BT[0].tolist() == [False, False, False, False, False, True]
    assert not (out.clipped_low_BT[1] | out.clipped_high_BT[1] | out.clipped_dual_BT[1]).any()


def test_ppo_without_dual_clip_keeps_large_negative_loss():
    # Default eps 0.2, r = 4, A = -1: max(-A r, -A clip(r, 0.8, 1.2)) = max(4, 1.2) = 4 (no cap at c).
    logp_BT, old_BT = _logp([[math.log(4.0)]])
    out = ppo_clip_loss(logp_BT, old_BT, torch.tensor([[-1.0]], dtype=F64), torch.ones(1, 1))
    torch.testing.assert_close(out.loss_BT, torch.tensor([[4.0]], dtype=F64))


def test_gspo_one_ratio_per_sequence():
    # Row 0: log-ratios (0.1, 0.3, pad) -> mean 0.2, s = e^0.2 = 1.2214 > 1 + 0.1, A = +1: clipped,
    #   loss -1.1 on both tokens, no gradient.
    # Row 1: log-ratios (0, -0.02, 0.02) -> mean 0, s = 1, A = -2: loss -A * s = 2 per token and
    #   d/d logp_t = -A * s = 2 for every token (GSPO-token gradient s * grad log pi).
    logp_BT = torch.tensor([[0.1, 0.3, NAN], [0.0, -0.02, 0.02]], dtype=F64, requires_grad=True)
    old_BT = torch.zeros(2, 3, dtype=F64)
    adv_BT = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]], dtype=F64)
    mask_BT = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = gspo_loss(logp_BT, old_BT, adv_BT, mask_BT, clip_low=0.1, clip_high=0.1)
    torch.testing.assert_close(out.loss_BT, torch.tensor([[-1.1, -1.1, 0.0], [2.0, 2.0, 2.0]], dtype=F64))
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.0, 0, 0], [2, 2, 2]], dtype=F64))
    assert out.clipped_high_BT.tolist() == [[True, True, False], [False, False, False]]
    torch.testing.assert_close(out.ratio_BT[0, :2], torch.full((2,), math.exp(0.2), dtype=F64))


def test_gspo_gradient_is_shared_across_tokens_when_unclipped():
    # Row log-ratios (0.1, 0.3): s = e^0.2, A = +1, wide clip -> loss -e^0.2 per token and the gradient
    # of every token is -A * s = -e^0.2, even though the token ratios differ.
    logp_BT, old_BT = _logp([[0.1, 0.3]])
    out = gspo_loss(
        logp_BT, old_BT, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), clip_low=0.5, clip_high=0.5
    )
    out.loss_BT.sum().backward()
    e = math.exp(0.2)
    torch.testing.assert_close(out.loss_BT, torch.tensor([[-e, -e]], dtype=F64))
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-e, -e]], dtype=F64))


def test_lpo_sentence_level_ratio_and_clip():
    # eps = 0.03 (default). Row 0, A = +1:
    #   sentence 0 = tokens 0-1, log-ratios (0.02, 0.04): mean 0.03, r = e^0.03 = 1.03045 > 1.03 -> clipped:
    #     loss -1.03 per token, grad 0 (token-level PPO would NOT clip token 0: e^0.02 = 1.0202).
    #   sentence 1 = tokens 2-4, (0.01, -0.02, 0.04): mean 0.01, r = e^0.01, unclipped:
    #     loss -e^0.01 per token, grad -A r = -e^0.01 per token.
    # Row 1, A = -1, one sentence with id 0 (a different unit from row 0's sentence 0):
    #   (-0.06, 0, 0, pad, pad): mean -0.02, r = e^-0.02 = 0.9802 inside [0.97, 1.03]:
    #   loss -A r = 0.9802, grad -A r = 0.9802 per token.
    logp_BT = torch.tensor(
        [[0.02, 0.04, 0.01, -0.02, 0.04], [-0.06, 0.0, 0.0, NAN, NAN]], dtype=F64, requires_grad=True
    )
    old_BT = torch.zeros(2, 5, dtype=F64)
    adv_BT = torch.tensor([[1.0] * 5, [-1.0] * 5], dtype=F64)
    mask_BT = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sentence_ids_BT = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    out = lpo_loss(logp_BT, old_BT, adv_BT, mask_BT, sentence_ids_BT)
    a, b = math.exp(0.01), math.exp(-0.02)
    torch.testing.assert_close(
        out.loss_BT, torch.tensor([[-1.03, -1.03, -a, -a, -a], [b, b, b, 0, 0]], dtype=F64)
    )
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0, 0, -a, -a, -a], [b, b, b, 0, 0]], dtype=F64))
    assert out.clipped_high_BT[0].tolist() == [True, True, False, False, False]


def test_unit_mean_log_ratio_non_contiguous_ids():
    # ids (0, 2, 0, 2, pad): unit 0 mean (1 + 3) / 2 = 2, unit 2 mean (2 + 4) / 2 = 3.
    x_BT = torch.tensor([[1.0, 2, 3, 4, 100]])
    m_BT = torch.tensor([[True, True, True, True, False]])
    out_BT = unit_mean_log_ratio(x_BT, m_BT, torch.tensor([[0, 2, 0, 2, 7]]))
    torch.testing.assert_close(out_BT, torch.tensor([[2.0, 3, 2, 3, 0]]))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_huge_log_ratio_on_negative_advantage_is_finite(dual_clip):
    # float32, as the trainer computes: exp(99.5) = 1.6e43 overflows (float32 max 3.4e38), so without the
    # clamp the loss is inf (no dual clip) and the gradient NaN either way (exp's backward is 0 * inf even
    # where dual-clip selects the constant branch). Clamped to 20: ratio e^20, loss -A e^20 or -A c = 3,
    # and no gradient through that token. The second token (log-ratio 0.1, A = +1, unclipped) is untouched:
    # loss -e^0.1, gradient -e^0.1.
    logp_BT = torch.tensor([[99.5, 0.1]], requires_grad=True)
    old_BT = torch.zeros(1, 2)
    adv_BT = torch.tensor([[-1.0, 1.0]])
    out = ppo_clip_loss(logp_BT, old_BT, adv_BT, torch.ones(1, 2), dual_clip=dual_clip)
    first = torch.tensor(math.exp(20.0)) if dual_clip is None else torch.tensor(3.0)
    torch.testing.assert_close(out.loss_BT, torch.stack([first, -torch.tensor(0.1).exp()])[None])
    aggregate_loss(out.loss_BT, torch.ones(1, 2), "token-mean", 2).backward()
    assert torch.isfinite(logp_BT.grad).all(), logp_BT.grad
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.0, -math.exp(0.1) / 2]]))
    assert out.clipped_dual_BT.tolist() == [[dual_clip is not None, False]]


def test_clamp_leaves_log_ratios_within_20_exact():
    # Just inside the bound the ratio and its gradient are the unclamped ones (float64: exp(19.9) is exact).
    logp_BT, old_BT = _logp([[19.9, -19.9]])
    out = ppo_clip_loss(logp_BT, old_BT, torch.tensor([[-1.0, 1.0]], dtype=F64), torch.ones(1, 2))
    out.loss_BT.sum().backward()
    expected = torch.tensor([[math.exp(19.9), -math.exp(-19.9)]], dtype=F64)
    torch.testing.assert_close(out.loss_BT, expected)
    torch.testing.assert_close(logp_BT.grad, expected)


@pytest.mark.parametrize("loss_fn", [gspo_loss, lpo_loss])
def test_unit_ratio_huge_log_ratio_is_finite(loss_fn):
    # One unit (the whole row) with mean log-ratio (199 + 0) / 2 = 99.5, A = -1, float32: the unit ratio
    # e^99.5 overflows without the clamp. Clamped: ratio e^20 on both tokens, no gradient.
    logp_BT = torch.tensor([[199.0, 0.0]], requires_grad=True)
    args = (logp_BT, torch.zeros(1, 2), torch.full((1, 2), -1.0), torch.ones(1, 2))
    extra = (torch.zeros(1, 2, dtype=torch.long),) if loss_fn is lpo_loss else ()
    out = loss_fn(*args, *extra)
    torch.testing.assert_close(out.loss_BT, torch.full((1, 2), math.exp(20.0)))
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("loss_fn", [ppo_clip_loss, gspo_loss, lpo_loss])
def test_all_masked_gives_zero_loss_and_zero_grad(loss_fn):
    logp_BT = torch.full((2, 3), NAN, dtype=F64, requires_grad=True)
    args = (logp_BT, torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64), torch.zeros(2, 3))
    extra = (torch.zeros(2, 3, dtype=torch.long),) if loss_fn is lpo_loss else ()
    out = loss_fn(*args, *extra)
    out.loss_BT.sum().backward()
    torch.testing.assert_close(out.loss_BT, torch.zeros(2, 3, dtype=F64))
    torch.testing.assert_close(logp_BT.grad, torch.zeros(2, 3, dtype=F64))


@pytest.mark.parametrize("name", ["logp_BT", "old_logp_BT", "adv_BT"])
def test_non_finite_valid_inputs_raise(name):
    tensors = {"logp_BT": torch.zeros(1, 2), "old_logp_BT": torch.zeros(1, 2), "adv_BT": torch.ones(1, 2)}
    tensors[name] = torch.tensor([[0.0, float("-inf")]])
    with pytest.raises(ValueError, match=name):
        ppo_clip_loss(tensors["logp_BT"], tensors["old_logp_BT"], tensors["adv_BT"], torch.ones(1, 2))


def test_bad_arguments_raise():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(z, z, z, torch.ones(1, 2), dual_clip=1.0)
    with pytest.raises(ValueError, match="old_logp_BT"):
        ppo_clip_loss(z, torch.zeros(1, 3), z, torch.ones(1, 2))
    with pytest.raises(ValueError, match="sentence_ids_BT"):
        lpo_loss(z, z, z, torch.ones(1, 2), torch.tensor([[0, -1]]))
