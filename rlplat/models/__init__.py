"""The Ring-linear-2.0 model (BailingMoeLinearV2ForCausalLM): config, architecture, presets, HF checkpoints."""

from rlplat.models.cache import LayerCache, ModelCache
from rlplat.models.checkpoint import load_pretrained, save_pretrained
from rlplat.models.config import ARCHITECTURE, MODEL_TYPE, RingLinearConfig
from rlplat.models.fp8 import enable_fp8
from rlplat.models.precision import PRECISIONS, precision_of, to_precision
from rlplat.models.presets import PRESETS, preset
from rlplat.models.ring_linear import RingLinearForCausalLM, count_parameters
from rlplat.models.tokenizer import load_tokenizer

__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPE",
    "PRECISIONS",
    "PRESETS",
    "LayerCache",
    "ModelCache",
    "RingLinearConfig",
    "RingLinearForCausalLM",
    "count_parameters",
    "enable_fp8",
    "load_pretrained",
    "load_tokenizer",
    "precision_of",
    "preset",
    "save_pretrained",
    "to_precision",
]
