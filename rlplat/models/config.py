"""``RingLinearConfig``: the Hugging Face ``config.json`` of BailingMoeLinearV2ForCausalLM, by its HF field names.

Fields the model does not use (``transformers_version``, ``auto_map``, ...) are kept in ``extra`` and written
back unchanged, so a checkpoint round-trips. One field is ours: ``linear_decay_convention`` picks the
linear-attention layer factor, 'engine' f_l = 1 − l/(L−1) + 1e-5 (what inference engines use, the default)
or 'hf' f_l = 1 − (l−1)/(L−1) + 1e-5 (the HF remote code).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
MODEL_TYPE = "bailing_moe_linear"


@dataclass
class RingLinearConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 0.5
    use_qk_norm: bool = True
    num_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    num_nextn_predict_layers: int = 0
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    linear_decay_convention: str = "engine"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # layer i is softmax attention when (i + 1) % layer_group_size == 0, else linear attention
    def is_softmax_layer(self, i: int) -> bool:
        return (i + 1) % self.layer_group_size == 0

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)

    @property
    def shared_expert_intermediate_size(self) -> int:
        if self.moe_shared_expert_intermediate_size is not None:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"RingLinearConfig: {msg}")

        if self.model_type != MODEL_TYPE or ARCHITECTURE not in (self.architectures or [ARCHITECTURE]):
            raise bad(
                f"this is a {self.model_type!r} / {self.architectures} config; rlplat's model is "
                f"{ARCHITECTURE} (model_type {MODEL_TYPE!r}). Point it at a Ring-linear-2.0 checkpoint."
            )
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "layer_group_size",
            "group_norm_size",
            "n_group",
            "topk_group",
            "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if (self.num_attention_heads * self.head_dim) % self.group_norm_size:
            raise bad(
                f"group_norm_size={self.group_norm_size} must divide num_attention_heads*head_dim="
                f"{self.num_attention_heads * self.head_dim}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise bad(
                f"partial_rotary_factor*head_dim = {self.rotary_dim} must be a positive even number ≤ head_dim"
            )
        if self.num_experts % self.n_group:
            raise bad(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise bad("group-limited routing needs ≥ 2 experts per group (num_experts / n_group)")
        if self.topk_group > self.n_group:
            raise bad(f"topk_group={self.topk_group} must be ≤ n_group={self.n_group}")
        eligible = (
            self.num_experts if self.n_group == 1 else self.topk_group * (self.num_experts // self.n_group)
        )
        if self.num_experts_per_tok > eligible:
            raise bad(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {eligible} experts in the "
                "kept groups (topk_group * num_experts / n_group)"
            )
        if self.hidden_act != "silu" or self.score_function != "sigmoid":
            raise bad(
                f"only hidden_act='silu' and score_function='sigmoid' exist in Ring-linear; got "
                f"{self.hidden_act!r}, {self.score_function!r}"
            )
        for name in ("use_qkv_bias", "use_bias", "linear_silu", "tie_word_embeddings"):
            if getattr(self, name):
                raise bad(f"{name}=true is not part of Ring-linear-2.0 and is not supported")
        if not self.use_qk_norm:
            raise bad("use_qk_norm=false is not supported (Ring-linear-2.0 uses QK RMSNorm)")
        if self.rope_scaling not in (None, {}):
            raise bad(f"rope_scaling={self.rope_scaling} is not supported yet; remove it or set it to null")
        if self.linear_decay_convention not in ("engine", "hf"):
            raise bad(
                f"linear_decay_convention must be 'engine' or 'hf', got {self.linear_decay_convention!r}"
            )

    # --- HF config.json I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RingLinearConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known and k != "extra"}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> RingLinearConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    def replace(self, **changes: Any) -> RingLinearConfig:
        return dataclasses.replace(self, **changes)
