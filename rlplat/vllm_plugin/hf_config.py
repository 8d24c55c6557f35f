"""A ``transformers`` config class for ``model_type: bailing_moe_linear``, so vLLM can read config.json.

Released Ring-linear checkpoints ship this class as remote code (``auto_map``); registering our own lets vLLM
load them, and rlplat's own checkpoints, without ``trust_remote_code``. Every field of
:class:`rlplat.models.RingLinearConfig` becomes an attribute with the same default, and ``layer_types`` tells
vLLM which layers hold a KV cache ("full_attention") and which a recurrent state ("linear_attention").
"""

from __future__ import annotations

import dataclasses

from transformers import AutoConfig, PretrainedConfig

from rlplat.models.config import MODEL_TYPE, RingLinearConfig

# PretrainedConfig owns these (token ids, dtype, tying); the rest of RingLinearConfig's fields are ours to set.
_OWNED_BY_PRETRAINED = {
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "torch_dtype",
    "architectures",
}
_FIELDS = {f.name: f for f in dataclasses.fields(RingLinearConfig) if f.name not in {"extra", "model_type"}}


class RingLinearHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        for name, f in _FIELDS.items():
            if name in _OWNED_BY_PRETRAINED:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, name, kwargs.pop(name, default))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs.setdefault(name, _FIELDS[name].default)
        kwargs.setdefault("architectures", _FIELDS["architectures"].default_factory())
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.layer_types = [
            "full_attention" if (i + 1) % self.layer_group_size == 0 else "linear_attention"
            for i in range(self.num_hidden_layers)
        ]


def ring_linear_config(hf_config: PretrainedConfig) -> RingLinearConfig:
    """The validated :class:`RingLinearConfig` of a vLLM ``hf_config``."""
    data = hf_config.to_dict()
    fields = {k: data[k] for k in _FIELDS if k in data}
    dtype = data.get("torch_dtype") or data.get("dtype")  # transformers 5 renamed torch_dtype to dtype
    if isinstance(dtype, str):
        fields["torch_dtype"] = dtype
    return RingLinearConfig.from_dict(fields | {"model_type": MODEL_TYPE})


def register_hf_config() -> None:
    AutoConfig.register(MODEL_TYPE, RingLinearHFConfig, exist_ok=True)
