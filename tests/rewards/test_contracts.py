"""Contract tests: the plugin signatures other code (and other packages) build on."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest
from pydantic import ValidationError

from rewards import RewardResult, RewardRunner, RewardsConfig, RewardSpec, Sample, reward
from rewards.judges import Judge, TextGenerator
from rewards.registry import resolve


def test_sample_and_result_fields():
    assert [f.name for f in dataclasses.fields(Sample)] == [
        "prompt",
        "response",
        "response_tokens",
        "label",
        "metadata",
    ]
    assert [f.name for f in dataclasses.fields(RewardResult)] == [
        "score",
        "extracted",
        "verdict",
        "error",
        "info",
    ]
    assert Sample().metadata == {} and RewardResult(1.0).info == {}


def test_reward_decorator_and_call_shapes():
    assert list(inspect.signature(reward).parameters) == ["name", "group"]
    for name, group in (
        ("math", False),
        ("code", False),
        ("think_format", False),
        ("evo_cot_length", True),
        ("gar", True),
    ):
        d = resolve(name)
        assert d.group is group, name
        params = list(inspect.signature(d.fn.__call__ if d.is_class else d.fn).parameters)
        first = params[1] if d.is_class else params[0]
        assert first == ("samples" if group else "sample"), (name, params)


def test_runner_entry_points():
    assert list(inspect.signature(RewardRunner.score).parameters) == ["self", "samples"]
    assert inspect.iscoroutinefunction(RewardRunner.ascore)


def test_protocols():
    assert list(inspect.signature(Judge.judge).parameters) == ["self", "prompts"]
    assert list(inspect.signature(TextGenerator.generate_text).parameters) == [
        "self",
        "prompts",
        "max_new_tokens",
    ]


def test_config_is_closed_and_documented():
    for model in (RewardsConfig, RewardSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} needs a description"
            assert not field.is_required(), f"{model.__name__}.{name} needs a default"
    with pytest.raises(ValidationError, match="extra"):
        RewardsConfig.model_validate({"terms": [{"name": "math", "wieght": 2}]})
    with pytest.raises(ValidationError, match="duplicate"):
        RewardsConfig.model_validate({"terms": [{"name": "math"}, {"name": "math"}]})


def test_cli_register_contract():
    from rewards.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["reward", "x.jsonl", "--reward", "math", "--args", "correct=2"])
    assert callable(args.func) and args.reward == "math" and args.args == ["correct=2"]
