import pytest
from pydantic import BaseModel, ValidationError

from rlplat.engine import AlignmentConfig, RolloutConfig, SamplingParams


def test_sampling_needs_explicit_greedy():
    with pytest.raises(ValueError, match="greedy=true"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0, greedy=True)
    assert SamplingParams(greedy=True, temperature=0).logprob_temperature == 1.0
    assert SamplingParams(greedy=True, temperature=0.5).logprob_temperature == 0.5
    assert SamplingParams(temperature=0.7).logprob_temperature == 0.7


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n", 0, "greater than or equal to 1"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("top_k", 0, "greater than or equal to 1"),
        ("max_new_tokens", 0, "greater than or equal to 1"),
        ("stop", [""], "non-empty"),
        ("stop_token_ids", [-1], "token ids"),
        ("temprature", 1.0, "Extra inputs"),
    ],
)
def test_bad_sampling_is_a_value_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_assignment_is_validated():
    sp = SamplingParams()
    with pytest.raises(ValidationError):
        sp.temperature = 0.0


def test_rollout_section_is_closed_and_documented():
    cfg = RolloutConfig.model_validate({"backend": "native", "sampling": {"n": 4}, "alignment": {"n": 2}})
    assert cfg.sampling.n == 4 and cfg.max_batch_size == 32
    with pytest.raises(ValidationError, match="backend"):
        RolloutConfig(backend="sglang")
    with pytest.raises(ValidationError, match="Extra inputs"):
        RolloutConfig.model_validate({"alignment": {"prompts": 3}})
    with pytest.raises(ValidationError, match="1 ≤ min ≤ max"):
        AlignmentConfig(prompt_length=(8, 4))

    def walk(model: type[BaseModel]):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            assert not f.is_required(), f"{model.__name__}.{name} has no default"
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation)

    walk(RolloutConfig)
