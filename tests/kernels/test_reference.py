"""Reference kernels against each other and against the definitions, plus the public functions' input checks."""

import pytest
import torch

import kernels
from kernels.batch_invariant import linear, tree_sum
from kernels.fp8 import dequantize_blockwise, fp8_linear, quantize_blockwise
from kernels.linear_attention import linear_attention
from kernels.linear_attention.reference import chunk_linear_attention, recurrent_step
from kernels.lm_head import lm_head_logprobs
from kernels.moe_routing import expert_rows, group_limited_topk
from kernels.rmsnorm import rms_norm
from kernels.softmax_attention import softmax_attention
from kernels.softmax_attention.reference import values_with_ones


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_plain_chunked_form_continues_a_state_like_token_by_token_steps(T):
    g = torch.Generator().manual_seed(T)
    B, H, D = 2, 3, 48
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    log_decay = -torch.rand(H, generator=g) * 0.3
    s0 = torch.randn(B, H, D, D, generator=g)
    o1, s1 = chunk_linear_attention(q, k, v, log_decay, D**-0.5, s0, chunk_size=64)
    steps, s2 = [], s0
    for t in range(T):
        o, s2 = recurrent_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], log_decay, D**-0.5, s2)
        steps.append(o)
    assert rel_err(o1, torch.cat(steps, 1)) < 1e-5 and rel_err(s1, s2) < 1e-5


def test_plain_chunked_final_state_respects_lengths():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 70, 2, 8, generator=g) for _ in range(3))
    log_decay = torch.tensor([-0.2, -0.05])
    _, state = chunk_linear_attention(
        q, k, v, log_decay, 1.0, chunk_size=16, lengths_B=torch.tensor([37, 70])
    )
    _, alone = chunk_linear_attention(q[:1, :37], k[:1, :37], v[:1, :37], log_decay, 1.0, chunk_size=16)
    assert rel_err(state[0], alone[0]) < 1e-6


def test_softmax_attention_modes_agree_and_match_definition():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 21, 4, 16, generator=g)
    k, v = torch.randn(2, 21, 2, 16, generator=g), torch.randn(2, 21, 2, 16, generator=g)
    pos = torch.arange(21).expand(2, 21)
    inv = softmax_attention(q, k, v, pos, 0.25)
    with kernels.kernel_mode(batch_invariant=False):
        plain = softmax_attention(q, k, v, pos, 0.25)
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * 0.25
    s = s.masked_fill(torch.ones(21, 21, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", s.softmax(-1), vv)
    assert rel_err(inv, ref) < 1e-6 and rel_err(plain, ref) < 1e-6


def test_softmax_attention_takes_values_as_the_cache_keeps_them():
    """Values followed by their ones (the KV cache's layout, read in place by the block-aligned form) give the
    output of the plain values, bitwise in both modes, for a prefill and for a decode step; other widths are
    refused."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 16, generator=g)
    k, v = torch.randn(2, 300, 2, 16, generator=g), torch.randn(2, 300, 2, 16, generator=g)
    for pos in (torch.arange(295, 300).expand(2, 5), torch.tensor([[7], [299]])):
        for invariant in (True, False):
            with kernels.kernel_mode(batch_invariant=invariant):
                qp = q[:, : pos.shape[1]]
                want = softmax_attention(qp, k, v, pos, 0.25)
                assert torch.equal(softmax_attention(qp, k, values_with_ones(v), pos, 0.25), want)
    with pytest.raises(ValueError, match="followed by ones"):
        softmax_attention(q, k, torch.randn(2, 300, 2, 17), torch.arange(295, 300).expand(2, 5), 0.25)


def test_tree_sum_ignores_zero_padding_and_batch():
    x = torch.randn(5, 37)
    padded = torch.nn.functional.pad(x, (0, 91))
    assert torch.equal(tree_sum(x), tree_sum(padded))
    assert torch.equal(tree_sum(x)[2:3], tree_sum(x[2:3]))
    torch.testing.assert_close(tree_sum(x), x.sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    w = torch.randn(96, 80).to(dtype)
    x = torch.randn(41, 80).to(dtype)
    full = linear(x, w)
    for m in (1, 2, 3, 5, 17):
        assert torch.equal(linear(x[:m], w), full[:m])
        assert torch.equal(linear(x[m : m + 1], w), full[m : m + 1])


def test_rms_norm_definition():
    x, w = torch.randn(3, 48), torch.rand(48)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want)


def test_routing_definition_and_group_limit():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0, 3.5, -2.0, -3.0]])
    bias = torch.zeros(8)
    bias[0] = 10.0  # a bias changes the selection, not the weight
    w, ids = group_limited_topk(logits, bias, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    # group scores (top-2 biased): g0 = 10.5 + σ(5), g1 = σ(4) + σ(-1), g2 = σ(3) + σ(3.5), g3 small → keep g0, g2
    assert ids.tolist() == [[0, 1]]
    s = torch.sigmoid(torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(w, (s / s.sum() * 2.0)[None])


def test_fp8_quantize_roundtrip_and_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g) * 3
    q, scale = quantize_blockwise(x, 1, 128)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 3)
    back = dequantize_blockwise(q, scale, 1, 128)
    # e4m3 rounds to 3 mantissa bits (relative error ≤ 2^-4) down to 2^-6; below that it is subnormal with a
    # fixed step of 2^-9, so the error there is at most half a step in the block's scaled units.
    per_elem_scale = scale.repeat_interleave(128, dim=1)[:, :300]
    bound = torch.maximum(x.abs() * 2**-4, per_elem_scale * 2**-10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    w = torch.randn(64, 300, generator=g)
    out = fp8_linear(x, w)
    assert rel_err(out, x @ w.t()) < 0.05
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_blockwise(torch.tensor([[float("inf")]]), 1, 128)


def test_fused_lm_head_backward_matches_autograd():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    logp, ent = lm_head_logprobs(h, w, t, temperature=0.8, chunk_rows=16)
    z = (h @ w.t()) / 0.8
    ref_lp = z.log_softmax(-1)
    ref_logp, ref_ent = ref_lp.gather(1, t[:, None])[:, 0], -(ref_lp.exp() * ref_lp).sum(-1)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    a, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
    got = torch.autograd.grad((logp * a + ent * b).sum(), (h, w))
    want = torch.autograd.grad((ref_logp * a + ref_ent * b).sum(), (h, w))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: linear_attention(
                *(torch.randn(1, 4, 2, 8) for _ in range(2)), torch.randn(1, 4, 2, 7), torch.zeros(2), 1.0
            ),
            "v must have shape",
        ),
        (lambda: linear_attention(*(torch.randn(4, 2, 8) for _ in range(3)), torch.zeros(2), 1.0), "4-D"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6), r"weight must have shape \(8,\)"),
        (lambda: rms_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8), 1e-6), "dtype int64"),
        (
            lambda: softmax_attention(
                torch.randn(1, 2, 3, 8),
                torch.randn(1, 2, 2, 8),
                torch.randn(1, 2, 2, 8),
                torch.zeros(1, 2, dtype=torch.long),
                1.0,
            ),
            "not divisible",
        ),
        (
            lambda: group_limited_topk(torch.randn(2, 10), torch.zeros(10), 2, 4, 2, 1.0),
            "divisible by n_group",
        ),
        (
            lambda: lm_head_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 9])),
            "vocabulary",
        ),
        (lambda: kernels.set_mode("cuda"), "unknown kernel backend"),
    ],
)
def test_bad_input_errors_say_what_to_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_expert_rows_gathers_and_sums_each_tokens_slot_gradients():
    N, k, C = 50, 4, 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(16, generator=gen)[:k] for _ in range(N)])
    order = ids.flatten().argsort(stable=True)  # grouped by expert, as the MoE does
    x = torch.randn(N, C, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(N * k, C, generator=gen, dtype=torch.float64)
    rows = expert_rows(x, order, k)
    assert torch.equal(rows, x[order // k])
    rows.backward(grad)
    # token n's gradient: the sum of the gradients of its k rows, wherever the permutation put them
    expected = torch.zeros(N, C, dtype=torch.float64).index_add_(0, order // k, grad)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="N·k = 200 pair ids"):
        expert_rows(x, order[:-1], k)
