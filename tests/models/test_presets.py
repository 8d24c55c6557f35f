"""Presets: published parameter counts (meta device), and the tiny preset exercises every architectural feature."""

import pytest

from rlplat.models import RingLinearConfig, count_parameters, preset


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        # Ring-mini-linear-2.0: 16.4B total, ~1.6B active including embeddings
        ("ring-mini-linear-2.0", 16.4e9, 1.6e9),
        # Ring-flash-linear-2.0: ~104B total, ~7.4B active including embeddings
        ("ring-flash-linear-2.0", 104e9, 7.4e9),
    ],
)
def test_published_parameter_counts(name, total, active):
    got_total, got_active = count_parameters(preset(name))
    assert abs(got_total - total) / total < 0.01, f"{name}: {got_total / 1e9:.2f}B total"
    assert abs(got_active - active) / active < 0.02, f"{name}: {got_active / 1e9:.2f}B active"


def test_tiny_preset_has_every_feature():
    cfg = preset("tiny")
    kinds = [cfg.is_softmax_layer(i) for i in range(cfg.num_hidden_layers)]
    assert kinds.count(False) >= 2 and kinds.count(True) >= 1
    assert cfg.num_experts >= 8 and cfg.num_shared_experts >= 1
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group  # group-limited routing is active
    assert cfg.rotary_dim < cfg.head_dim  # partial RoPE
    assert cfg.use_qk_norm and cfg.group_norm_size > 1
    total, _ = count_parameters(cfg)
    assert 1e6 < total < 5e6
    assert 80e6 < count_parameters(preset("mid"))[0] < 130e6


def test_mini_layer_pattern():
    cfg = preset("ring-mini-linear-2.0")
    assert [i for i in range(20) if cfg.is_softmax_layer(i)] == [4, 9, 14, 19]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "divisible by num_key_value_heads"),
        ({"group_norm_size": 3}, "group_norm_size"),
        ({"num_experts": 10, "n_group": 4}, "divisible by n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 100}, "num_experts_per_tok"),
        ({"partial_rotary_factor": 0.3}, "even"),
        ({"model_type": "llama"}, "BailingMoeLinearV2ForCausalLM"),
        ({"linear_decay_convention": "other"}, "linear_decay_convention"),
    ],
)
def test_bad_settings_say_what_to_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny", **changes)


def test_unknown_hf_fields_are_kept():
    cfg = RingLinearConfig.from_dict({**preset("tiny").to_dict(), "transformers_version": "4.56.0"})
    assert cfg.to_dict()["transformers_version"] == "4.56.0"
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
