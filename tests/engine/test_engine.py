"""The embedded engine: batch-independent sampling, continuous batching, stops, n > 1, weights, bad input."""

import copy

import pytest
import torch

from rlplat.engine import NativeEngine, RolloutBackend, SamplingParams, make_backend, sample_token
from rlplat.engine.engine import sample_tokens

A = [5, 17, 300, 42, 9]
OTHERS = [[7] * 12, [400], [33, 8, 260, 91, 3, 77, 2]]


def sampled(**kw):
    return SamplingParams(**{"seed": 11, "temperature": 0.9, "top_k": 100, "max_new_tokens": 6, **kw})


def assert_same_samples(a, b):
    assert [s.tokens for s in a] == [s.tokens for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x.logprobs, y.logprobs), "log-probs differ bitwise"
        assert (x.finish_reason, x.prompt_index, x.sample_index) == (
            y.finish_reason,
            y.prompt_index,
            y.sample_index,
        )


@pytest.mark.parametrize("top_k", [100, None], ids=["top-k", "whole-vocabulary"])
def test_samples_do_not_depend_on_batch_companions(policy_fp32, monkeypatch, top_k):
    sp = sampled(n=2, top_k=top_k)
    (alone,) = NativeEngine(policy_fp32, max_batch_size=8).generate([A], sp, prompt_indices=[3])

    calls = []  # (batch size, cached lengths before the call, new tokens) of every forward
    forward = policy_fp32.hidden_states

    def spy(ids, cache=None, lengths_B=None):
        calls.append((ids.shape[0], cache.lengths_B.tolist(), ids.shape[1]))
        return forward(ids, cache=cache, lengths_B=lengths_B)

    monkeypatch.setattr(policy_fp32, "hidden_states", spy)
    crowd = NativeEngine(policy_fp32, max_batch_size=3)
    params = [sampled(n=2, max_new_tokens=2, top_k=top_k), sp, sampled(n=2, max_new_tokens=4), sampled(n=2)]
    out = crowd.generate([OTHERS[0], A, OTHERS[1], OTHERS[2]], params, prompt_indices=[0, 3, 1, 2])
    monkeypatch.undo()

    assert_same_samples(alone, out[1])
    assert [len(s.tokens) for s in out[0]] == [2, 2] and all(s.prompt_index == 0 for s in out[0])
    # continuous batching: never more than 3 rows, and prompts prefilled while others were mid-decode
    assert max(b for b, _, _ in calls) <= 3
    prefills = [i for i, (_, cached, _) in enumerate(calls) if max(cached) == 0]
    decodes = [i for i, (_, cached, _) in enumerate(calls) if max(cached) > 0]
    assert any(p > decodes[0] for p in prefills), "no sequence joined a running batch"
    assert any(len(set(cached)) > 1 for _, cached, _ in calls), "rows never sat at different positions"


def test_seed_and_prompt_index_pick_the_samples(engine):
    first = engine.generate([A], sampled(n=3))[0]
    assert_same_samples(first, engine.generate([A], sampled(n=3))[0])
    assert [s.sample_index for s in first] == [0, 1, 2]
    assert len({tuple(s.tokens) for s in first}) == 3
    moved = engine.generate([A], sampled(n=3), prompt_indices=[1])[0]
    assert [s.tokens for s in moved] != [s.tokens for s in first]


def test_greedy_is_deterministic_and_scored_at_temperature_one(engine, policy_fp32):
    a, b = engine.generate([A], SamplingParams(greedy=True, temperature=0, n=2, max_new_tokens=5))[0]
    assert a.tokens == b.tokens and torch.equal(a.logprobs, b.logprobs)
    seq = torch.tensor([A + a.tokens])
    with torch.no_grad():
        logp, _ = policy_fp32.token_logprobs(seq[:, :-1], seq[:, 1:], 1.0)
    assert torch.equal(logp[0, len(A) - 1 :], a.logprobs)
    logits = policy_fp32(seq[:, :-1])[0, len(A) - 1 :]
    assert a.tokens == logits.argmax(-1).tolist()


def test_stop_token_ids_and_eos(engine, policy_fp32):
    (full,) = engine.generate([A], sampled(max_new_tokens=8))[0]
    stop = full.tokens[3]
    end = full.tokens.index(stop) + 1
    (cut,) = engine.generate([A], sampled(max_new_tokens=8, stop_token_ids=[stop]))[0]
    assert cut.tokens == full.tokens[:end] and torch.equal(cut.logprobs, full.logprobs[:end])
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert full.finish_reason == "length"

    eos_engine = NativeEngine(policy_fp32, max_batch_size=8, eos_token_ids=[stop])
    (eos,) = eos_engine.generate([A], sampled(max_new_tokens=8))[0]
    assert eos.tokens == full.tokens[:end] and eos.finish_reason == "eos"
    (ignored,) = eos_engine.generate([A], sampled(max_new_tokens=8, ignore_eos=True))[0]
    assert ignored.tokens == full.tokens and ignored.finish_reason == "length"


def test_stop_strings(engine, char_tokenizer):
    (full,) = engine.generate([A], sampled(max_new_tokens=8))[0]
    assert full.text == char_tokenizer.decode(full.tokens) and len(full.text) == 8
    stop = full.text[3:5]
    end = next(j for j in range(1, 9) if stop in char_tokenizer.decode(full.tokens[:j]))
    (cut,) = engine.generate([A], sampled(max_new_tokens=8, stop=["never-seen", stop]))[0]
    assert cut.tokens == full.tokens[:end]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop) and cut.text.endswith(stop)


def test_text_and_chat_prompts(engine, char_tokenizer):
    chat = [{"role": "user", "content": "2+2="}]
    out = engine.generate_text(["2+2=", chat], SamplingParams(greedy=True, max_new_tokens=3))
    assert out[0][0].prompt_tokens == char_tokenizer.encode("2+2=")
    rendered = "<bos><|user|>2+2=<eos><|assistant|>"
    assert out[1][0].prompt_tokens == char_tokenizer.encode(rendered)
    assert out[1][0].text == char_tokenizer.decode(out[1][0].tokens)
    with pytest.raises(ValueError, match="no tokenizer"):
        NativeEngine(engine.model).generate_text(["2+2="])


def test_update_weights(policy_fp32):
    model = copy.deepcopy(policy_fp32)
    engine = NativeEngine(model, max_batch_size=4)
    greedy = SamplingParams(greedy=True, max_new_tokens=4)
    before = engine.generate([A], greedy)[0][0]
    assert before.version == engine.version == 0

    new_head = torch.randn_like(model.lm_head.weight) * 0.5
    engine.update_weights({"lm_head.weight": new_head.bfloat16()}, version=1)  # cast to the model's dtype
    after = engine.generate([A], greedy)[0][0]
    assert after.version == engine.version == 1 and after.tokens != before.tokens
    assert torch.equal(model.lm_head.weight, new_head.bfloat16().float())

    norm = "model.layers.0.input_layernorm.weight"
    refusals = [
        ({"lm_head.weight": new_head, "model.nope.weight": new_head}, "unknown name 'model.nope.weight'"),
        ({norm: torch.ones(7)}, rf"{norm}: shape \(7,\), the model has \(128,\)"),
        ({norm: torch.ones(128, dtype=torch.long)}, "floating-point"),
        ({norm: torch.full((128,), float("nan"))}, "NaN"),
        (
            {"model.embed_tokens.weight": new_head, "model.layers.0.self_attn.q_proj.weight": new_head},
            "another architecture",
        ),
        ({}, "no tensors"),
    ]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for tensors, match in refusals:
        with pytest.raises(ValueError, match=match):
            engine.update_weights(tensors, version=2)
    assert engine.version == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items()), (
        "a refusal changed weights"
    )
    with pytest.raises(ValueError, match="version"):
        engine.update_weights({"lm_head.weight": new_head}, version=-1)

    request = engine.add_request(A, greedy)
    with pytest.raises(RuntimeError, match="in flight"):
        engine.update_weights({"lm_head.weight": new_head}, version=2)
    while engine.has_unfinished():
        engine.step()
    assert engine.collect(request)[0].tokens == after.tokens


BAD = [
    ([], {}, ValueError, "empty"),
    ([5] * 4096, {}, ValueError, "context"),
    ([5, 512], {}, ValueError, "outside the vocabulary"),
    ("2+2=", {}, TypeError, "generate_text"),
    (A, {"n": 0}, ValueError, "greater than or equal to 1"),
    (A, {"temperature": 0.0}, ValueError, "greedy=true"),
    (A, {"stop": ["\u00e9"]}, ValueError, "unknown stop string"),
    (A, {"stop": [""]}, ValueError, "non-empty"),
    (A, {"stop_token_ids": [600]}, ValueError, "outside the vocabulary"),
]


def test_bad_input_is_refused_and_the_engine_keeps_serving(engine):
    good = engine.add_request(A, sampled(n=2), prompt_index=0)
    for prompt, sampling, error, match in BAD:
        with pytest.raises(error, match=match):
            engine.generate([A, prompt], {"seed": 1, "max_new_tokens": 2, **sampling})
        with pytest.raises(error, match=match):
            engine.add_request(prompt, {"seed": 1, **sampling})
    health = engine.health()
    assert (health["waiting"], health["running"], health["requests_rejected"]) == (2, 0, 2 * len(BAD))
    # The good request and a new generate call are both served.
    out = engine.generate([OTHERS[1]], sampled())
    assert out[0][0].finish_reason == "length"
    while engine.has_unfinished():
        engine.step()
    expected = NativeEngine(engine.model).generate([A], sampled(n=2))[0]
    assert_same_samples(engine.collect(good), expected)
    assert engine.health()["requests_served"] == 2


def test_stop_strings_need_a_tokenizer(policy_fp32):
    with pytest.raises(ValueError, match="need a tokenizer"):
        NativeEngine(policy_fp32).generate([A], SamplingParams(stop=["x"]))


def test_sample_token():
    z = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    assert sample_token(z, 0.0, top_k=1) == 1  # ties keep the first index
    assert sample_token(z, 0.999, top_p=1e-6) == 1
    assert {sample_token(z, u / 100, top_k=2) for u in range(100)} == {1, 3}
    # inverse CDF: the frequency of each token over an even grid of u is its probability
    p = torch.softmax(z.double(), 0)
    counts = torch.bincount(
        torch.tensor([sample_token(z, (u + 0.5) / 2000) for u in range(2000)]), minlength=5
    )
    assert torch.allclose(counts.double() / 2000, p, atol=1e-3)


@pytest.mark.parametrize("threads", [1, 2, 16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_batched_sampling_draws_each_rows_own_token(temperature, threads):
    """The engine draws full-vocabulary rows together; each must get the token ``sample_token`` gives it alone,
    including rows with masked (-inf) logits, ties, a near-one-hot row, and u at the edges of [0, 1). An odd
    vocabulary and batch put rows at every alignment of the vectorised exp and of the threads' split."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(37, 1003, generator=gen) * 4
    z[1, 500:] = float("-inf")
    z[2] = 0.0
    z[3, 7] = 80.0
    z = z / temperature
    u = torch.rand(37, generator=gen, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5, 0.999999])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = sample_tokens(z, u)
    finally:
        torch.set_num_threads(before)
    assert got == [sample_token(z[b], float(u[b])) for b in range(37)]
    assert got[1] < 500 and got[3] == 7


def test_batched_sampling_refuses_a_row_without_a_token():
    z = torch.zeros(3, 10)
    z[1] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample_tokens(z, torch.full((3,), 0.5, dtype=torch.float64))


def test_mixed_sampling_settings_in_one_batch(policy_fp32):
    """Greedy, two temperatures over the whole vocabulary and a top-p row decoded together: every prompt gets
    the samples it gets alone, in its own place."""
    params = [
        sampled(greedy=True, temperature=0.0, top_k=None),
        sampled(n=2, top_k=None),
        sampled(n=2, top_k=None, temperature=1.3),
        sampled(n=2, top_k=None, top_p=0.9),
    ]
    prompts = [OTHERS[0], A, OTHERS[1], OTHERS[2]]
    together = NativeEngine(policy_fp32, max_batch_size=8).generate(prompts, params)
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        (alone,) = NativeEngine(policy_fp32, max_batch_size=8).generate([prompt], sp, prompt_indices=[i])
        assert_same_samples(alone, together[i])


def test_backend_interface_and_factory(engine, policy_fp32, char_tokenizer, tmp_path):
    from rlplat.config import load_config
    from rlplat.engine import RolloutConfig
    from rlplat.models import save_pretrained

    assert isinstance(engine, RolloutBackend)
    assert set(engine.health()) >= {"backend", "ok", "version", "precision", "running", "waiting"}
    save_pretrained(policy_fp32, tmp_path / "ckpt")
    char_tokenizer.tokenizer.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    cfg = load_config(None, [f"model.path={tmp_path / 'ckpt'}", "model.preset=null"])
    backend = make_backend(cfg, rollout=RolloutConfig(max_batch_size=2))
    assert backend.tokenizer is not None and backend.max_batch_size == 2
    greedy = SamplingParams(greedy=True, max_new_tokens=3)
    assert_same_samples(backend.generate([A], greedy)[0], engine.generate([A], greedy)[0])
    # rollout.backend=vllm is covered by tests/vllm/test_vllm_backend.py (marker vllm)
