"""Named model presets: the published Ring-linear-2.0 shapes and small ones of the same architecture.

``tiny`` (~1.8M parameters) is the debug model of the default run and the tests. It has 3 linear and 1
softmax layer, a dense first layer, 16 routed experts in 4 groups (2 kept) plus a shared expert, partial
RoPE, QK-norm and the group-norm gate. ``mid`` (~100M) is the benchmark size. ``ring-mini-linear-2.0``
(16.4B total, ~1.6B active) and ``ring-flash-linear-2.0`` (~104B, ~7.4B) match the released configs' counts.
"""

from __future__ import annotations

from rlplat.models.config import RingLinearConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=64,
        layer_group_size=4,
        group_norm_size=2,
        routed_scaling_factor=2.5,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        torch_dtype="float32",
    ),
    "mid": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=16384,
        num_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=192,
        layer_group_size=5,
        group_norm_size=4,
        pad_token_id=0,
        eos_token_id=1,
        torch_dtype="bfloat16",
    ),
    "ring-mini-linear-2.0": dict(
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        moe_intermediate_size=512,
        first_k_dense_replace=1,
        layer_group_size=5,
        group_norm_size=4,
        partial_rotary_factor=0.5,
        rope_theta=600000.0,
        max_position_embeddings=32768,
    ),
    "ring-flash-linear-2.0": dict(
        vocab_size=157184,
        hidden_size=4096,
        intermediate_size=9216,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        moe_intermediate_size=1024,
        first_k_dense_replace=1,
        layer_group_size=8,
        group_norm_size=8,
        partial_rotary_factor=0.5,
        rope_theta=600000.0,
        max_position_embeddings=32768,
    ),
}


def check_presets(*names: str) -> None:
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")


def preset(name: str, **overrides) -> RingLinearConfig:
    check_presets(name)
    return RingLinearConfig(**{**PRESETS[name], **overrides})
