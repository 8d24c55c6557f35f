"""Bad model inputs fail before any heavy work, with what to do."""

import pytest
import torch


def test_bad_token_ids(tiny_model_fp32):
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        tiny_model_fp32(torch.tensor([[3, 600]]))
    with pytest.raises(ValueError, match="integer"):
        tiny_model_fp32(torch.zeros(1, 3))


def test_too_long(tiny_model_fp32):
    cache = tiny_model_fp32.new_cache(1)
    cache.lengths_B[:] = 4095
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_model_fp32(torch.tensor([[3, 4]]), cache=cache)


def test_fused_logprobs_match_log_softmax(tiny_model_fp32):
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        logits = tiny_model_fp32(ids[:, :-1])
        logp, entropy = tiny_model_fp32.token_logprobs(ids[:, :-1], ids[:, 1:], temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(logp, ref.gather(-1, ids[:, 1:, None])[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)
